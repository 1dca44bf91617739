"""Helpers shared by the Pallas Triton kernels (in-kernel numerics, block arithmetic).

Two implementations of the same exact numerics, chosen per kernel by ``fast``:

* portable (interpret mode, and the specification's shape): Pallas Triton has no lowering for
  ``jnp.round``; ``rne`` is round-half-to-even from ``floor`` and compares (PALLAS_NOTES.md §3),
  exact: for ``|v| < 2**23`` ``floor(v)`` and ``v - floor(v)`` are exact, larger floats are
  integers (``d == 0``); the clamp is written with selects so NaN handling does not depend on
  how a backend treats NaN in max/min.
* fast (real GPU kernels): the kernels are ALU-bound with the portable forms (~25 instructions an
  element measured at 0.8 G elements/ms on an H200), so ``rne`` is the hardware's
  ``cvt.rni.f32.f32`` (IEEE round-half-even, one instruction) and the clamp is
  ``min(max(v, qmin), qmax)``: Pallas Triton lowers float max/min to IEEE maxNum/minNum, which
  return the non-NaN operand, so NaN -> qmin, +Inf -> qmax, -Inf -> qmin for free. -0.0 -> +0.0
  stays a compare and select (``v + 0.0`` was folded away on the GPU).

The GPU test suite checks the fast forms against the CPU reference bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton


from jaxquant.core.numerics import rounded


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def check_pow2(family: str, name: str, v, lo: int = 1) -> None:
    """Config validation shared by the kernel families: ``v`` is a power of two >= ``lo``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or v & (v - 1):
        raise ValueError(f"{family} Config.{name}: expected a power of two >= {lo}, got {v!r}")


def check_positive(family: str, name: str, v, lo: int = 1) -> None:
    """Config validation shared by the kernel families: ``v`` is an int >= ``lo`` (default 1)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{family} Config.{name}: expected an int >= {lo}, got {v!r}")


def _ptx_unary(f32_asm: str, f64_asm: str, v):
    """One PTX instruction applied elementwise (float32 or float64 operand and result)."""
    f64 = v.dtype == jnp.float64
    return pltriton.elementwise_inline_asm(
        f64_asm if f64 else f32_asm, args=[v], constraints="=d,d" if f64 else "=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])[0]


def rne(v, fast: bool = False):
    """Round half to even, for float32/float64 arrays inside kernels."""
    if fast:
        return _ptx_unary("cvt.rni.f32.f32 $0, $1;", "cvt.rni.f64.f64 $0, $1;", v)
    f = jnp.floor(v)
    d = v - f
    half = jnp.asarray(0.5, v.dtype)
    one = jnp.asarray(1.0, v.dtype)
    # f is odd iff f - 2 * floor(f / 2) == 1 (exact for all floats).
    odd = (f - 2 * jnp.floor(f * half)) == one
    up = (d > half) | ((d == half) & odd)
    return jnp.where(up, f + one, f)


def to_code(v, qmin: int, qmax: int, fast: bool = False):
    """clamp(v, qmin, qmax) with NaN -> qmin and -0.0 -> +0.0."""
    lo = jnp.asarray(qmin, v.dtype)
    hi = jnp.asarray(qmax, v.dtype)
    if fast:  # maxNum / minNum (see the module docstring)
        return plus_zero(jnp.minimum(jnp.maximum(v, lo), hi))
    c = jnp.where(v < lo, lo, jnp.where(v > hi, hi, plus_zero(v)))
    return jnp.where(v != v, lo, c)


def plus_zero(v):
    """-0.0 -> +0.0 (integer-valued floats; see jaxquant.core.numerics.plus_zero).

    A select on every path: ``v + 0.0`` was measured to keep -0.0 in a Triton kernel on the H200
    (the compiler folded it), so the sign is fixed with a compare instead."""
    return jnp.where(v == 0, jnp.zeros((), v.dtype), v)


def finite_or_zero(x):
    """x with +-Inf replaced by 0 (NaN kept): dynamic statistics ignore infinities
    (docs/numerics.md), so a row holding +Inf keeps a finite scale and +Inf gets the code qmax."""
    return jnp.where(jnp.abs(x) == jnp.inf, jnp.zeros((), x.dtype), x)


def abs_max_bits(x):
    """Row max of |x| (axis 1, keepdims) as int32 bit patterns, NaN-propagating, in ONE reduction.

    Float max reductions drop NaN in Triton (maxNum); the bit patterns of |x| as int32 order
    NaN > +Inf > every finite value, so an integer max keeps NaN. Partial results combine with
    an integer ``jnp.maximum``; ``bits_to_float`` turns the result back. float32 only.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)
    return jnp.max(bits, axis=1, keepdims=True)


def bits_to_float(b):
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def recip(a, fast: bool = False):
    """The correctly rounded reciprocal ``1 / a``.

    On the GPU a plain ``1 / a`` in a Triton kernel is NOT correctly rounded (measured on an
    H200, jax 0.11.2: 16 of 64 float32 reciprocals off by an ulp, which flips codes near .5
    ties), so the fast path uses PTX ``rcp.rn`` (IEEE round-to-nearest reciprocal)."""
    if fast:
        return _ptx_unary("rcp.rn.f32 $0, $1;", "rcp.rn.f64 $0, $1;", a)
    return jnp.asarray(1, a.dtype) / a


def mul_rn(a, b, fast: bool = False):
    """``a * b`` (float32) that the compiler never fuses into an FMA: PTX ``mul.rn`` on the GPU."""
    if fast:
        return pltriton.elementwise_inline_asm(
            "mul.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, a.dtype)])[0]
    return rounded(a * b)  # interpret mode: XLA:CPU contracts through optimization_barrier (core.numerics.rounded)
