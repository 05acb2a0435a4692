"""Cortex: a self-managing compute cluster for personal and small-lab infrastructure."""

__version__ = "0.1.0"
