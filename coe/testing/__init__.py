"""Helpers for tests and benchmarks: an in-process server runner and a named stub upstream."""
