"""Helpers the tests and the examples share (importable as ``support`` with tests/ on the path)."""
