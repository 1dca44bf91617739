"""The ``jaxquant_dynamic_quantize`` primitive: fused per-row dynamic quantization.

Operand: ``x [..., D]``. Results: ``q [..., D]``, ``scale [..., 1]`` (float32; float64 for
float64 x), ``zero_point [..., 1]`` (int32). Each row of the last axis gets its own parameters
(``reference.dynamic_quantize_rows``). Kernel: one ``pallas_call``
(``jaxquant.pallas.dynamic.triton``) on the ``[rows, D]`` view. Batching folds the batch axis
into the rows.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant.core import sharding as shd
from jaxquant.core.numerics import compute_dtype, is_fp8
from jaxquant.core.primitive import Choice, Op, Operand
from jaxquant.primitives.affine import primitive as affine_p
from jaxquant.pallas.dynamic import triton as kernels
from jaxquant.primitives.dynamic import reference as ref

__all__ = ["dynamic_quantize_op", "bind", "global_row_qparams"]

PRECISION = ("bit-exact with jaxquant's reference (float32 statistics and scale, correctly rounded "
             "reciprocal, round-half-to-even); deterministic")


def _abstract_eval(*, x, qmin, qmax, symmetric, out_dtype, config, impl):
    pshape = x.shape[:-1] + (1,)
    return (jax.core.ShapedArray(x.shape, out_dtype), jax.core.ShapedArray(pshape, compute_dtype(x.dtype)),
            jax.core.ShapedArray(pshape, np.dtype(np.int32)))


def _reference(*, x, qmin, qmax, symmetric, out_dtype, config, impl):
    return ref.dynamic_quantize_rows(x, qmin=qmin, qmax=qmax, symmetric=symmetric, dtype=out_dtype)


def _dispatch(avals, params, *, device_kind, interpret):
    shape = avals["x"].shape
    rows, cols = math.prod(shape[:-1]), shape[-1]
    cfg = params["config"] or kernels.heuristics(rows, cols)
    return Choice("triton", cfg, ("jaxquant_dynamic_quantize",), interpret=interpret)


def _kernel(choice, *, x, qmin, qmax, symmetric, out_dtype, config, impl):
    shape = x.shape
    x2 = jnp.reshape(x, (math.prod(shape[:-1]), shape[-1]))
    q, s, z = kernels.dynamic_quantize_rows(x2, qmin=qmin, qmax=qmax, symmetric=symmetric, out_dtype=out_dtype,
                                            config=choice.config, interpret=choice.interpret)
    pshape = shape[:-1] + (1,)
    return jnp.reshape(q, shape), jnp.reshape(s, pshape), jnp.reshape(z, pshape)


def _sharding(avals, params):
    """Local when the reduced (last) axis is whole on every device; when it is split, one
    all-reduce (max) of the row statistics, then the quantize kernel on the local columns."""
    shape = avals["x"].shape
    fx = shd.leading("d", len(shape) - 1) + ("c",)
    fp = fx[:-1] + ("one",)
    return shd.Rule({"x": fx}, (fx, fp, fp), reduction=("c",), per_shard=_per_shard)


def global_row_qparams(shard, x, factor, *, qmin, qmax, symmetric, out_dtype, impl):
    """``(scale, zp)`` ``[..., 1]`` of rows of ``x [..., D]`` whose last axis is split over the mesh
    axes of ``factor``: one ``pmax`` of the local statistics (amax, or -lo and hi, and a NaN
    flag: a few floats per row), then the reference formulas. Max and min are exact, so the
    parameters equal those of the whole rows. Infinities are left out of the statistics, as in
    the reference."""
    ct = compute_dtype(x.dtype)
    xf = x.astype(ct)
    nan = jnp.any(jnp.isnan(xf), axis=-1, keepdims=True).astype(ct)
    xf = jnp.where(jnp.isinf(xf), jnp.zeros((), ct), xf)
    if symmetric:
        amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True, initial=0)
        st = shard.pmax(jnp.concatenate([amax, nan], axis=-1), factor)
        amax = jnp.where(st[..., 1:] > 0, jnp.asarray(np.nan, ct), st[..., :1])
        return ref.dynamic_qparams_rows(amax, qmin=qmin, qmax=qmax, symmetric=True)
    lo = jnp.minimum(jnp.min(xf, axis=-1, keepdims=True, initial=0), 0)
    hi = jnp.maximum(jnp.max(xf, axis=-1, keepdims=True, initial=0), 0)
    st = shard.pmax(jnp.concatenate([-lo, hi, nan], axis=-1), factor)
    rows = jnp.where(st[..., 2:] > 0, jnp.asarray(np.nan, ct), jnp.concatenate([-st[..., :1], st[..., 1:2]], -1))
    # The zero point needs a correctly rounded reciprocal: the rows [lo, hi] go through the
    # dynamic kernel, as jaxquant.dynamic_quantize does for per-tensor parameters.
    _, scale, zp = dynamic_quantize_op(rows, qmin=qmin, qmax=qmax, symmetric=False, out_dtype=np.dtype(out_dtype),
                                       config=None, impl=impl)
    return scale, zp


def _per_shard(shard, arrays, params):
    x, out_dtype = arrays["x"], params["out_dtype"]
    scale, zp = global_row_qparams(shard, x, "c", qmin=params["qmin"], qmax=params["qmax"],
                                   symmetric=params["symmetric"], out_dtype=out_dtype, impl=params["impl"])
    fp8 = out_dtype if is_fp8(out_dtype) else None  # fp8 codes: the fp8 quantizer (no rounding to integers)
    q = affine_p.bind("quantize", x, scale=scale, zero_point=None if fp8 else zp, qmin=params["qmin"],
                      qmax=params["qmax"], out_dtype=out_dtype, impl=params["impl"], fp8=fp8)
    return q, scale, zp


dynamic_quantize_op = Op("jaxquant_dynamic_quantize", [Operand("x")], abstract_eval=_abstract_eval,
                         reference=_reference, kernel=_kernel, dispatch=_dispatch, precision=PRECISION,
                         multiple_results=True, sharding=_sharding)


def bind(x, *, qmin, qmax, symmetric, out_dtype, config=None, impl="auto"):
    """Bind on ``x [..., D]`` (already validated); returns ``(q, scale [..., 1], zp [..., 1])``."""
    return dynamic_quantize_op(x, qmin=int(qmin), qmax=int(qmax), symmetric=bool(symmetric),
                               out_dtype=np.dtype(out_dtype), config=config, impl=impl)
