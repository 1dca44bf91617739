"""Benchmarks: ``python -m jaxquant.bench`` (PERF.md's method). Sections live in their own modules."""
