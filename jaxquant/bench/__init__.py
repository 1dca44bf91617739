"""Benchmarks: ``python -m jaxquant.bench`` (docs/performance.md). Sections live in their own modules."""
