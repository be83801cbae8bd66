"""Benchmarks: speed and memory, reported beside a baseline measured in the same run."""
