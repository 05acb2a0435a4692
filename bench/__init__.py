"""Benchmark harness: Cortex vs. etcd with the same client pattern."""
