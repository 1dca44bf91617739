"""Plain-jnp reference of dynamic quantization: parameters computed from the data.

Dynamic parameters (per row of the last axis, per group, per channel or per tensor), with
``TINY = 2**-126`` the smallest normal float32 and every constant a rounded float32 reciprocal,
multiplied::

    symmetric:   scale = max(amax * f32(1 / qmax), TINY),            zp = 0
    asymmetric:  lo = min(min(x), 0);  hi = max(max(x), 0)
                 scale = max((hi - lo) * f32(1 / (qmax - qmin)), TINY)
                 zp    = clamp(qmin - rne(lo * (1 / scale)), qmin, qmax)   (NaN -> qmin)

A row containing NaN gets a NaN scale (its codes are ``qmin`` and it dequantizes to NaN: the NaN
stays visible). The statistics ignore infinities: ``amax``, ``lo`` and ``hi`` are taken over the
finite values (and NaN), so a row holding +-Inf keeps the scale of its finite values and its
+Inf / -Inf get the codes qmax / qmin, as in ``quantize``.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core.numerics import TINY, compute_dtype, recip, to_code
from jaxquant.primitives.affine.reference import code_range, quantize, quantize_bf

__all__ = ["dynamic_qparams_rows", "dynamic_quantize_rows", "reduce_extrema", "choose_qparams", "dynamic_quantize"]


def _finite_or_zero(xf):
    return jnp.where(jnp.isinf(xf), jnp.zeros((), xf.dtype), xf)


def _extrema(xf, has_nan, *, axis, keepdims):
    """``lo = min(min xf, 0)``, ``hi = max(max xf, 0)`` over ``axis`` (infinities ignored), both NaN
    where ``has_nan``."""
    xf = _finite_or_zero(xf)
    lo = jnp.minimum(jnp.min(xf, axis=axis, keepdims=keepdims, initial=0), 0)
    hi = jnp.maximum(jnp.max(xf, axis=axis, keepdims=keepdims, initial=0), 0)
    return jnp.where(has_nan, jnp.nan, lo), jnp.where(has_nan, jnp.nan, hi)


def dynamic_qparams_rows(x, *, qmin, qmax, symmetric, axis=-1, keepdims=True):
    """Dynamic (scale, zp) reduced over ``axis`` (an int or tuple); scale float32, zp int32."""
    ct = compute_dtype(x.dtype)
    xf = x.astype(ct)
    has_nan = jnp.any(jnp.isnan(xf), axis=axis, keepdims=keepdims)
    if symmetric:
        amax = jnp.max(jnp.abs(_finite_or_zero(xf)), axis=axis, keepdims=keepdims, initial=0)
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
    qmin, qmax = code_range(dtype, qmin, qmax)
    scale, zp = choose_qparams(x, granularity=granularity, qmin=qmin, qmax=qmax, symmetric=symmetric)
    q = quantize(x, scale, zp, granularity=granularity, qmin=qmin, qmax=qmax, dtype=dtype)
    return q, scale, zp


