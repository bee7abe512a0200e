"""The demul_fast benchmark harness: ``python benchmarks/run.py --help``."""
