"""Helpers shared by the Pallas Triton kernels (in-kernel numerics, block arithmetic).

Pallas Triton has no lowering for ``jnp.round``; ``rne`` below is round-half-to-even built from
``floor`` and compares, which lowers for Triton and runs in interpret mode (PALLAS_NOTES.md §3).
It is exact: for ``|v| < 2**23`` both ``floor(v)`` and ``v - floor(v)`` are exact; larger
floats are integers already (``d == 0``). NaN and +-Inf come out as NaN and +-Inf.
"""

from __future__ import annotations

import jax.numpy as jnp


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def rne(v):
    """Round half to even, for float32/float64 arrays inside kernels."""
    f = jnp.floor(v)
    d = v - f
    half = jnp.asarray(0.5, v.dtype)
    one = jnp.asarray(1.0, v.dtype)
    # f is odd iff f - 2 * floor(f / 2) == 1 (exact for all floats).
    odd = (f - 2 * jnp.floor(f * half)) == one
    up = (d > half) | ((d == half) & odd)
    return jnp.where(up, f + one, f)


def to_code(v, qmin: int, qmax: int):
    """clamp(v, qmin, qmax) with NaN -> qmin; written with compares so NaN handling is explicit."""
    lo = jnp.asarray(qmin, v.dtype)
    hi = jnp.asarray(qmax, v.dtype)
    c = jnp.where(v < lo, lo, jnp.where(v > hi, hi, plus_zero(v)))
    return jnp.where(v != v, lo, c)


def plus_zero(v):
    """-0.0 -> +0.0 (integer-valued floats; see jaxquant.reference.plus_zero)."""
    return jnp.where(v == 0, jnp.zeros((), v.dtype), v)


def recip(a):
    """1 / a (IEEE division: correctly rounded; checked bit-exact against XLA on the GPU)."""
    return jnp.asarray(1, a.dtype) / a
