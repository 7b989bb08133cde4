"""Benchmark harness for multifd-migrate: ``python bench/run.py --help``."""
