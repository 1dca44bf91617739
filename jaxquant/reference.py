"""Plain-jnp definition of every jaxquant op: the specification, the CPU lowering and the oracle.

Numerics (DESIGN.md §1). All arithmetic is float32 (float64 for float64 inputs); ``rne`` is
round-half-to-even (``jnp.round``)::

    inv_scale = 1 / scale                                   # one correctly rounded reciprocal
    v         = rne(x * inv_scale) + zp                     # round first, then add zp
    q         = clamp(v, qmin, qmax)                        # stored in the code dtype
    x_hat     = (q - zp) * scale                            # dequantize
    m         = qmin <= v <= qmax                           # STE mask, on the unclamped v
    fake_quantize(x)            = dequantize(quantize(x))   # in x's dtype
    d fake_quantize / dx        = dy * m
    d quantize / dx  (float q)  = dy * inv_scale * m

Special values: a NaN ``v`` gives the code ``qmin``; ``+Inf`` saturates to ``qmax`` and ``-Inf``
to ``qmin``; the mask is False for all three (their gradient is 0). This equals PyTorch's CPU
``fake_quantize_per_tensor_affine`` (PyTorch's per-channel kernel maps ``+Inf`` to ``qmin``
through an undefined float->int cast; we saturate). Scales must be finite and > 0; a zero,
negative-zero, Inf or NaN scale follows the rules above (e.g. ``scale = 0`` makes every
code of a non-zero x saturate and 0 * Inf = NaN give ``qmin``).

Dynamic parameters (per row of the last axis, or per tensor), with ``2**-126`` the smallest
normal float32 (``TINY``) and every constant a rounded float32 reciprocal, multiplied::

    symmetric:   scale = max(amax * f32(1 / qmax), TINY),            zp = 0
    asymmetric:  lo = min(min(x), 0);  hi = max(max(x), 0)
                 scale = max((hi - lo) * f32(1 / (qmax - qmin)), TINY)
                 zp    = clamp(qmin - rne(lo * (1 / scale)), qmin, qmax)   (NaN -> qmin)

A row containing NaN gets a NaN scale (so its codes are ``qmin`` and it dequantizes to NaN:
the NaN stays visible); a row containing Inf gets an Inf scale.

The functions with a ``_bf`` suffix work on the *broadcast form* (``granularity.py``): the
parameters have x's rank and broadcast against it. They are the CPU lowering of the primitives.
The public-style functions without the suffix take a granularity, like ``jaxquant``'s API.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran

TINY = float(np.finfo(np.float32).tiny)  # 2**-126

__all__ = [
    "compute_dtype",
    "affine_codes",
    "quantize_bf",
    "dequantize_bf",
    "fake_quantize_bf",
    "fake_quantize_backward_bf",
    "quantize_backward_bf",
    "dynamic_qparams_rows",
    "dynamic_quantize_rows",
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_backward",
    "fake_quantize_backward",
    "choose_qparams",
    "dynamic_quantize",
    "int8_epilogue",
]


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


def affine_codes(x, scale, zp, qmin, qmax):
    """Returns ``(q, m)``: codes ``clamp(rne(x * (1/scale)) + zp)`` as floats, and the STE mask.

    ``x``, ``scale`` are in the compute dtype, ``zp`` is already converted to it.
    """
    v = jnp.round(x * recip(scale)) + zp
    m = (v >= qmin) & (v <= qmax)
    return to_code(v, qmin, qmax), m


def _params(x_dtype, scale, zp):
    ct = compute_dtype(x_dtype)
    s = scale.astype(ct)
    z = jnp.zeros((), ct) if zp is None else zp.astype(ct)
    return ct, s, z


def quantize_bf(x, scale, zp, *, qmin, qmax, dtype):
    """Codes of x in ``dtype`` (an int container, or a float dtype for real-valued codes)."""
    ct, s, z = _params(x.dtype, scale, zp)
    q, _ = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return q.astype(dtype)


def dequantize_bf(q, scale, zp, *, dtype):
    """``(q - zp) * scale`` in the compute dtype of ``dtype``, cast to ``dtype``."""
    ct, s, z = _params(dtype, scale, zp)
    return (plus_zero(q.astype(ct) - z) * s).astype(dtype)


def fake_quantize_bf(x, scale, zp, *, qmin, qmax):
    """``dequantize(quantize(x))`` in x's dtype."""
    ct, s, z = _params(x.dtype, scale, zp)
    q, _ = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return (plus_zero(q - z) * s).astype(x.dtype)


def ste(g, m):
    """``g * m`` for a boolean mask m, written ``where(m, g, g * 0)``: the same value for every g
    (``-g * 0 = -0.0`` and ``Inf * 0 = NaN``, as PyTorch's ``dY * mask``), in a form XLA does not
    simplify into ``select(m, g, +0.0)``."""
    return jnp.where(m, g, g * jnp.asarray(0, g.dtype))


def fake_quantize_backward_bf(dy, x, scale, zp, *, qmin, qmax):
    """STE of fake_quantize: ``dy * m``, in x's dtype."""
    ct, s, z = _params(x.dtype, scale, zp)
    _, m = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return ste(dy.astype(ct), m).astype(x.dtype)


def quantize_backward_bf(dy, x, scale, zp, *, qmin, qmax):
    """STE of quantize with real-valued codes: ``dy * (1/scale) * m``, in x's dtype."""
    ct, s, z = _params(x.dtype, scale, zp)
    _, m = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return ste(dy.astype(ct) * recip(s), m).astype(x.dtype)


def _extrema(xf, has_nan, *, axis, keepdims):
    """``lo = min(min xf, 0)``, ``hi = max(max xf, 0)`` over ``axis``, both NaN where ``has_nan``."""
    lo = jnp.minimum(jnp.min(xf, axis=axis, keepdims=keepdims, initial=0), 0)
    hi = jnp.maximum(jnp.max(xf, axis=axis, keepdims=keepdims, initial=0), 0)
    return jnp.where(has_nan, jnp.nan, lo), jnp.where(has_nan, jnp.nan, hi)


def dynamic_qparams_rows(x, *, qmin, qmax, symmetric, axis=-1, keepdims=True):
    """Dynamic (scale, zp) reduced over ``axis`` (an int or tuple); scale float32, zp int32."""
    ct = compute_dtype(x.dtype)
    xf = x.astype(ct)
    has_nan = jnp.any(jnp.isnan(xf), axis=axis, keepdims=keepdims)
    if symmetric:
        amax = jnp.max(jnp.abs(xf), axis=axis, keepdims=keepdims, initial=0)
        amax = jnp.where(has_nan, jnp.nan, amax)  # explicit: NaN-propagating max
        scale = jnp.maximum(amax * np.asarray(1 / qmax, ct), ct.type(TINY))
        zp = jnp.zeros(scale.shape, jnp.int32)
        return scale.astype(ct), zp
    lo, hi = _extrema(xf, has_nan, axis=axis, keepdims=keepdims)
    scale = jnp.maximum((hi - lo) * np.asarray(1 / (qmax - qmin), ct), ct.type(TINY))
    zp = to_code(qmin - jnp.round(lo * recip(scale)), qmin, qmax)
    return scale.astype(ct), zp.astype(jnp.int32)


def dynamic_quantize_rows(x, *, qmin, qmax, symmetric, dtype):
    """Dynamic quantization of each row of the last axis: ``(q, scale[..., 1], zp[..., 1])``."""
    scale, zp = dynamic_qparams_rows(x, qmin=qmin, qmax=qmax, symmetric=symmetric)
    q = quantize_bf(x, scale, zp, qmin=qmin, qmax=qmax, dtype=dtype)
    return q, scale, zp


# ----------------------------------------------------------------------------------------
# Granularity-level reference API (same meaning as the public jaxquant functions).
# ----------------------------------------------------------------------------------------


def _range(dtype, qmin, qmax):
    if qmin is None or qmax is None:
        info = jnp.iinfo(dtype)
        qmin = info.min if qmin is None else qmin
        qmax = info.max if qmax is None else qmax
    return int(qmin), int(qmax)


def _bf(x, scale, zero_point, granularity):
    gran.check_granularity(granularity, x.shape)
    xb, sb = gran.to_broadcast_form(x, jnp.asarray(scale), granularity)
    zb = None
    if zero_point is not None:
        _, zb = gran.to_broadcast_form(x, jnp.asarray(zero_point), granularity)
    return xb, sb, zb


def quantize(x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, dtype=jnp.int8):
    qmin, qmax = _range(dtype, qmin, qmax)
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    return gran.from_broadcast_form(quantize_bf(xb, sb, zb, qmin=qmin, qmax=qmax, dtype=dtype), x.shape)


def dequantize(q, scale, zero_point=None, *, granularity, dtype=jnp.float32):
    qb, sb, zb = _bf(q, scale, zero_point, granularity)
    return gran.from_broadcast_form(dequantize_bf(qb, sb, zb, dtype=dtype), q.shape)


def fake_quantize(x, scale, zero_point=None, *, granularity, qmin, qmax):
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    return gran.from_broadcast_form(fake_quantize_bf(xb, sb, zb, qmin=qmin, qmax=qmax), x.shape)


def fake_quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin, qmax):
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    dyb = jnp.reshape(dy, xb.shape)
    out = fake_quantize_backward_bf(dyb, xb, sb, zb, qmin=qmin, qmax=qmax)
    return gran.from_broadcast_form(out, x.shape)


def quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin, qmax):
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    dyb = jnp.reshape(dy, xb.shape)
    out = quantize_backward_bf(dyb, xb, sb, zb, qmin=qmin, qmax=qmax)
    return gran.from_broadcast_form(out, x.shape)


def _reduce_axes(granularity, x):
    """Axes of the broadcast-form x reduced to get one parameter per scale element."""
    nd = x.ndim
    if isinstance(granularity, gran.PerTensor):
        return x, tuple(range(nd))
    if isinstance(granularity, gran.PerChannel):
        axis = granularity.axis % nd
        return x, tuple(a for a in range(nd) if a != axis)
    if isinstance(granularity, gran.PerToken):
        return x, (nd - 1,)
    g = granularity.group_size
    return jnp.reshape(x, x.shape[:-1] + (x.shape[-1] // g, g)), (nd,)


def reduce_extrema(x, *, granularity):
    """``(lo, hi)`` of each parameter of ``granularity`` (``param_shape``, x's compute dtype):
    ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, both NaN where the reduced elements hold a NaN.
    ``dynamic_qparams_rows`` of the rows ``[lo, hi]`` equals ``choose_qparams`` of x."""
    gran.check_granularity(granularity, x.shape)
    xr, axes = _reduce_axes(granularity, x)
    xf = xr.astype(compute_dtype(x.dtype))
    lo, hi = _extrema(xf, jnp.any(jnp.isnan(xf), axis=axes), axis=axes, keepdims=False)
    shape = gran.param_shape(granularity, x.shape)
    return jnp.reshape(lo, shape), jnp.reshape(hi, shape)


def choose_qparams(x, *, granularity, qmin, qmax, symmetric=True):
    """(scale float32 of ``param_shape``, zero_point int32 of ``param_shape``) from data."""
    gran.check_granularity(granularity, x.shape)
    xr, axes = _reduce_axes(granularity, x)
    scale, zp = dynamic_qparams_rows(xr, qmin=qmin, qmax=qmax, symmetric=symmetric, axis=axes, keepdims=False)
    shape = gran.param_shape(granularity, x.shape)
    return jnp.reshape(scale, shape), jnp.reshape(zp, shape)


def dynamic_quantize(x, *, granularity=gran.PerToken(), dtype=jnp.int8, symmetric=True, qmin=None, qmax=None):
    """``choose_qparams`` then ``quantize``: returns ``(q, scale, zero_point)``."""
    qmin, qmax = _range(dtype, qmin, qmax)
    scale, zp = choose_qparams(x, granularity=granularity, qmin=qmin, qmax=qmax, symmetric=symmetric)
    q = quantize(x, scale, zp, granularity=granularity, qmin=qmin, qmax=qmax, dtype=dtype)
    return q, scale, zp


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
        y = y * a_scale.astype(jnp.float32)
    if w_scale is not None:
        y = y * jnp.reshape(w_scale, (1, -1)).astype(jnp.float32)
    if bias is not None:
        # The product is rounded to float32 before the bias add (two roundings, as the kernel's
        # mul.rn + add); the barrier stops XLA:CPU from contracting them into one FMA.
        y = jax.lax.optimization_barrier(y)
        y = y + jnp.reshape(bias, (1, -1)).astype(jnp.float32)
    return y.astype(out_dtype)
