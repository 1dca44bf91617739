"""Named JAX primitives for the affine family, on operands in *broadcast form*.

Operands: the main arrays (``x``; ``q`` for dequantize; ``dy, x`` for the backward ops), all of
one shape, then ``scale`` (float32/float64) and optionally ``zero_point`` (int32), whose every
dimension is 1 or equal to x's (``jaxquant.granularity``). Lowering: CUDA -> the Pallas kernel of
``jaxquant.pallas.affine`` (one ``pallas_call``), CPU -> ``jaxquant.reference``; see
``jaxquant.backend`` to override. Batching folds the batch dimension into the operands (a new
leading dimension, full for batched operands, 1 for unbatched parameters), so a vmapped op is
still one kernel launch with no extra grid axis.
"""

from __future__ import annotations


import numpy as np
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from jaxquant import granularity as gran
from jaxquant import backend
from jaxquant import reference as ref
from jaxquant.pallas import affine as kernels
from jaxquant.primitives._register import register

__all__ = ["quantize_p", "dequantize_p", "fake_quantize_p", "fake_quantize_backward_p", "quantize_backward_p", "bind"]

_N_MAIN = {"quantize": 1, "dequantize": 1, "fake_quantize": 1, "fake_quantize_backward": 2, "quantize_backward": 2}


def _reference(op, mains, scale, zp, qmin, qmax, out_dtype):
    if op == "quantize":
        return ref.quantize_bf(mains[0], scale, zp, qmin=qmin, qmax=qmax, dtype=out_dtype)
    if op == "dequantize":
        return ref.dequantize_bf(mains[0], scale, zp, dtype=out_dtype)
    if op == "fake_quantize":
        return ref.fake_quantize_bf(mains[0], scale, zp, qmin=qmin, qmax=qmax)
    if op == "fake_quantize_backward":
        return ref.fake_quantize_backward_bf(mains[0], mains[1], scale, zp, qmin=qmin, qmax=qmax)
    return ref.quantize_backward_bf(mains[0], mains[1], scale, zp, qmin=qmin, qmax=qmax)


def _kernel(op, mains, scale, zp, qmin, qmax, out_dtype, config, interpret):
    shape = mains[0].shape
    if zp is not None and zp.shape != scale.shape:
        pshape = np.broadcast_shapes(scale.shape, zp.shape)
        scale, zp = jnp.broadcast_to(scale, pshape), jnp.broadcast_to(zp, pshape)
    view = gran.canonical_view(shape, scale.shape)
    if view.expand is not None:
        scale = jnp.broadcast_to(scale, view.expand)
        zp = None if zp is None else jnp.broadcast_to(zp, view.expand)
    mains3 = [jnp.reshape(m, view.x_shape3) for m in mains]
    scale3 = jnp.reshape(scale, view.param_shape3)
    zp3 = None if zp is None else jnp.reshape(zp, view.param_shape3)
    out = kernels.affine(op, *mains3, scale=scale3, zero_point=zp3, qmin=qmin, qmax=qmax, out_dtype=out_dtype,
                         view=view, config=config, interpret=interpret)
    return jnp.reshape(out, shape)


def _split(op, args, has_zp):
    n = _N_MAIN[op]
    mains = list(args[:n])
    scale = args[n]
    zp = args[n + 1] if has_zp else None
    return mains, scale, zp


def _make(op):
    p = Primitive(f"jaxquant_{op}")

    def abstract_eval(*avals, qmin, qmax, out_dtype, has_zp, config, impl):
        return jax.core.ShapedArray(avals[0].shape, out_dtype)

    def lowering(platform):
        def rule(ctx, *args, qmin, qmax, out_dtype, has_zp, config, impl):
            use = backend.resolve(impl, platform, (*ctx.avals_in, *ctx.avals_out))

            def fn(*a):
                mains, scale, zp = _split(op, a, has_zp)
                if use == "reference":
                    return _reference(op, mains, scale, zp, qmin, qmax, out_dtype)
                return _kernel(op, mains, scale, zp, qmin, qmax, out_dtype, config, use == "interpret")

            return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)
        return rule

    def batch_rule(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        n = _N_MAIN[op]
        new = []
        for k, (a, d) in enumerate(zip(args, dims)):
            if d is not None:
                a = jnp.moveaxis(a, d, 0)
            elif k < n:  # an unbatched main operand: every batch element sees it
                a = jnp.broadcast_to(a[None], (size,) + a.shape)
            else:  # an unbatched parameter is shared along the new axis
                a = a[None]
            new.append(a)
        return p.bind(*new, **params), 0

    return register(p, abstract_eval=abstract_eval, lowering=lowering, batch=batch_rule)


quantize_p = _make("quantize")
dequantize_p = _make("dequantize")
fake_quantize_p = _make("fake_quantize")
fake_quantize_backward_p = _make("fake_quantize_backward")
quantize_backward_p = _make("quantize_backward")
_PRIMS = {
    "quantize": quantize_p,
    "dequantize": dequantize_p,
    "fake_quantize": fake_quantize_p,
    "fake_quantize_backward": fake_quantize_backward_p,
    "quantize_backward": quantize_backward_p,
}


def bind(op, *mains, scale, zero_point, qmin=0, qmax=0, out_dtype, config=None, impl="auto"):
    """Bind the primitive of ``op`` on broadcast-form operands (already validated)."""
    args = list(mains) + [scale] + ([zero_point] if zero_point is not None else [])
    return _PRIMS[op].bind(*args, qmin=int(qmin), qmax=int(qmax), out_dtype=np.dtype(out_dtype),
                           has_zp=zero_point is not None, config=config, impl=impl)
