"""Benchmarks and the load strategies they compare."""
