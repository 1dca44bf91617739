"""Pallas kernels, one module per kernel family (backend: Pallas Triton).

Kernels import nothing from ``jaxquant.primitives`` or ``jaxquant.flax``. Each family has a
frozen ``Config``, a pure ``heuristics`` function and a ``name=`` on every ``pallas_call``.
"""
