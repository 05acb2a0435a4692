"""The `cortex` command line: main.py builds the parser from the core command modules and from every
`register(commands)` in the `cortex.cli` entry-point group (registry.py); output.py holds what commands share."""

from cortex.cli.main import main

__all__ = ["main"]
