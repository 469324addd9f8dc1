"""Benchmarks: measuring logic that experiments/bench_*.py call with explicit arguments."""
