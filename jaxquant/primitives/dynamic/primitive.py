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

from jaxquant.core.numerics import compute_dtype
from jaxquant.core.primitive import Choice, Op, Operand
from jaxquant.pallas.dynamic import triton as kernels
from jaxquant.primitives.dynamic import reference as ref

__all__ = ["dynamic_quantize_op", "bind"]

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


dynamic_quantize_op = Op("jaxquant_dynamic_quantize", [Operand("x")], abstract_eval=_abstract_eval,
                         reference=_reference, kernel=_kernel, dispatch=_dispatch, precision=PRECISION,
                         multiple_results=True)


def bind(x, *, qmin, qmax, symmetric, out_dtype, config=None, impl="auto"):
    """Bind on ``x [..., D]`` (already validated); returns ``(q, scale [..., 1], zp [..., 1])``."""
    return dynamic_quantize_op(x, qmin=int(qmin), qmax=int(qmax), symmetric=bool(symmetric),
                               out_dtype=np.dtype(out_dtype), config=config, impl=impl)
