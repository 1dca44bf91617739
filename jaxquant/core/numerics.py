"""Numerics helpers shared by every op's reference (plain jnp) and by the kernels' XLA epilogues.

All arithmetic is float32 (float64 for float64 inputs). Every formula is written as a product
with an explicit, correctly rounded reciprocal: XLA rewrites ``x / y`` with a broadcast divisor
into ``x * (1 / y)`` on the CPU and the GPU, so a reference that divides would not be correctly
rounded, while one that multiplies by ``recip(y)`` equals the kernels everywhere.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

__all__ = ["TINY", "FP8_DTYPES", "is_fp8", "fp8_max", "fp8_clamp", "to_fp8", "compute_dtype", "recip", "to_code", "plus_zero",
           "ste", "rounded", "int8_epilogue"]

TINY = float(np.finfo(np.float32).tiny)  # 2**-126, the smallest normal float32

# fp8 code formats and their largest finite values (fmax): 448 and 57344.
FP8_DTYPES = (np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.float8_e5m2))


def is_fp8(dtype) -> bool:
    """Whether ``dtype`` is one of the fp8 code formats (``float8_e4m3fn``, ``float8_e5m2``)."""
    return dtype is not None and np.dtype(dtype) in FP8_DTYPES


def fp8_max(dtype) -> float:
    """The largest finite value of an fp8 format: 448.0 (e4m3fn) or 57344.0 (e5m2)."""
    return float(jnp.finfo(dtype).max)


def fp8_clamp(v, fmax: float):
    """``clamp(v, -fmax, fmax)`` keeping NaN (selects: a max/min could drop or keep NaN by backend).

    The cast of the result to the format rounds half to even and never overflows (jnp / ml_dtypes
    casts would turn 500 into NaN for e4m3fn, Inf for e5m2; PyTorch's saturate)."""
    hi, lo = jnp.asarray(fmax, v.dtype), jnp.asarray(-fmax, v.dtype)  # (no negation: Pallas Triton has no
    return jnp.where(v > hi, hi, jnp.where(v < lo, lo, v))                # lowering for -constant)


# An fp8 NaN of both formats (e4m3fn S.1111.111, e5m2 S.11111.11 with S = 0); ``to_fp8`` maps it to itself.
_FP8_NAN_BITS = 0x7F


def to_fp8(v, code):
    """``v.astype(code)`` (round half to even), in a form XLA keeps when the codes are cast back.

    XLA:GPU removes a cast to a narrower float followed by a cast back to the wider one
    (``convert(convert(x, f8), f32) -> x``: its default ``xla_allow_excess_precision``), so a
    fake-quantize written ``v.astype(f8).astype(f32) * s`` and jitted returned x unrounded on an
    H100 (jax 0.11.2), and so would a quantize-then-dequantize in one jitted function. A select
    whose both branches are bit-identical to the codes (as ``rounded``) sits between the casts.
    """
    q = v.astype(code)
    bits = jax.lax.bitcast_convert_type(q, jnp.uint8)
    nan = jax.lax.bitcast_convert_type(jnp.uint8(_FP8_NAN_BITS), code)
    return jnp.where(bits == _FP8_NAN_BITS, nan, q)


# A float32 NaN bit pattern; ``rounded`` maps it to itself.
_NAN_BITS = 0x7FC00001


def compute_dtype(dtype) -> np.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def recip(a):
    """The correctly rounded reciprocal ``1 / a`` in a's dtype."""
    return jnp.asarray(1, a.dtype) / a


def to_code(v, qmin, qmax):
    """``clamp(v, qmin, qmax)`` with NaN -> qmin and -0.0 -> +0.0 (v is a float array)."""
    v = plus_zero(v)
    return jnp.where(jnp.isnan(v), jnp.asarray(qmin, v.dtype), jnp.clip(v, qmin, qmax))


def plus_zero(v):
    """-0.0 -> +0.0. Codes and ``q - zp`` are integers: a zero is always +0.0 (as in PyTorch,
    where they are int64). Written out because XLA folds ``v + 0.0`` to ``v``, which would keep
    the -0.0 that ``rne`` gives for small negative ``x * inv_scale``."""
    return jnp.where(v == 0, jnp.zeros((), v.dtype), v)


def ste(g, m):
    """``g * m`` for a boolean mask m, written ``where(m, g, g * 0)``: the same value for every g
    (``-g * 0 = -0.0`` and ``Inf * 0 = NaN``, as PyTorch's ``dY * mask``), in a form XLA does not
    simplify into ``select(m, g, +0.0)``."""
    return jnp.where(m, g, g * jnp.asarray(0, g.dtype))


def rounded(y):
    """``y`` as a materialised float32 value: a product passed through it is rounded before the
    next operation, so ``rounded(a * b) + c`` rounds twice (as the kernels' ``mul.rn`` + add).

    Under ``jax.jit`` XLA:CPU drops ``optimization_barrier`` and bitcast round trips and contracts
    ``a * b + c`` into one FMA (one rounding): ``int8_matmul`` of 1 x 1 codes with scale 1/3, w_scale
    3 and bias -1 gave 2.98e-08 instead of 0.0. A select whose both branches are bit-identical to
    ``y`` (the only pattern it replaces is the NaN it puts back) is opaque to that contraction.
    """
    bits = jax.lax.bitcast_convert_type(y, jnp.int32)
    same = jax.lax.bitcast_convert_type(jnp.int32(_NAN_BITS), jnp.float32)
    return jnp.where(bits == _NAN_BITS, same, y)


def int8_epilogue(acc, a_scale, w_scale, bias, out_dtype):
    """The W8A8 epilogue: ``(f32(acc) * a_scale) * w_scale (+ f32(bias))`` cast to ``out_dtype``.

    ``acc`` is the exact int32 accumulator ``[M, N]``; ``a_scale`` ``[M, 1]`` or ``[1, 1]``,
    ``w_scale`` ``[N]`` (any shape with N elements), ``bias`` ``[N]``; with none of them the int32
    accumulator is returned as is (cast to ``out_dtype``). The GEMM kernel computes the same
    products in the same order (``mul.rn``, then the bias add); its split-K path applies this
    function to the summed int32 partials.
    """
    if a_scale is None and w_scale is None and bias is None:
        return acc.astype(out_dtype)
    y = acc.astype(jnp.float32)
    if a_scale is not None:
        # rounded: with scales known when jitted (closed-over constants) XLA reassociates
        # (acc * s_a) * s_w into acc * (s_a * s_w), 1 ulp off in ~35% of outputs
        y = rounded(y * a_scale.astype(jnp.float32))
    if w_scale is not None:
        y = y * jnp.reshape(w_scale, (1, -1)).astype(jnp.float32)
    if bias is not None:
        # The product is rounded to float32 before the bias add (two roundings, as the kernel's
        # mul.rn + add): see ``rounded``.
        y = rounded(y)
        y = y + jnp.reshape(bias, (1, -1)).astype(jnp.float32)
    return y.astype(out_dtype)
