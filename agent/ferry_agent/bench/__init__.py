"""Benchmarks: separate from tests, print JSON, measure against a same-run baseline."""
