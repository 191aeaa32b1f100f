"""Throughput benchmarks, each runnable as `python -m rrt.benchmarks.<name>`."""
