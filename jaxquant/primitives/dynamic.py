"""The ``jaxquant_dynamic_quantize`` primitive: fused per-row dynamic quantization.

Operand: ``x [..., D]``. Results: ``q [..., D]``, ``scale [..., 1]`` (float32; float64 for
float64 x), ``zero_point [..., 1]`` (int32). Each row of the last axis gets its own parameters
(``reference.dynamic_quantize_rows``). CUDA -> one ``pallas_call``
(``jaxquant.pallas.dynamic``); CPU -> the reference. Batching folds the batch axis into rows.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from jaxquant import backend
from jaxquant import reference as ref
from jaxquant.pallas import dynamic as kernels
from jaxquant.primitives._register import register

__all__ = ["dynamic_quantize_p", "bind"]

dynamic_quantize_p = Primitive("jaxquant_dynamic_quantize")
dynamic_quantize_p.multiple_results = True


def _abstract_eval(x, *, qmin, qmax, symmetric, out_dtype, config, impl):
    pdt = np.dtype(np.float64) if np.dtype(x.dtype) == np.float64 else np.dtype(np.float32)
    pshape = x.shape[:-1] + (1,)
    return (jax.core.ShapedArray(x.shape, out_dtype), jax.core.ShapedArray(pshape, pdt),
            jax.core.ShapedArray(pshape, np.dtype(np.int32)))


def _lowering(platform):
    def rule(ctx, x, *, qmin, qmax, symmetric, out_dtype, config, impl):
        use = backend.resolve(impl, platform, (*ctx.avals_in, *ctx.avals_out))

        def fn(x):
            if use == "reference":
                return ref.dynamic_quantize_rows(x, qmin=qmin, qmax=qmax, symmetric=symmetric, dtype=out_dtype)
            shape = x.shape
            x2 = jnp.reshape(x, (math.prod(shape[:-1]), shape[-1]))
            q, s, z = kernels.dynamic_quantize_rows(x2, qmin=qmin, qmax=qmax, symmetric=symmetric,
                                                    out_dtype=out_dtype, config=config,
                                                    interpret=use == "interpret")
            pshape = shape[:-1] + (1,)
            return jnp.reshape(q, shape), jnp.reshape(s, pshape), jnp.reshape(z, pshape)

        return mlir.lower_fun(fn, multiple_results=True)(ctx, x)
    return rule


def _batch(args, dims, **params):
    (x,), (d,) = args, dims
    x = jnp.moveaxis(x, d, 0)
    return dynamic_quantize_p.bind(x, **params), (0, 0, 0)


register(dynamic_quantize_p, abstract_eval=_abstract_eval, lowering=_lowering, batch=_batch)


def bind(x, *, qmin, qmax, symmetric, out_dtype, config=None, impl="auto"):
    """Bind on ``x [..., D]`` (already validated); returns ``(q, scale [..., 1], zp [..., 1])``."""
    return dynamic_quantize_p.bind(x, qmin=int(qmin), qmax=int(qmax), symmetric=bool(symmetric),
                                   out_dtype=np.dtype(out_dtype), config=config, impl=impl)
