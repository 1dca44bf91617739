"""The ``jaxquant_lsq_backward`` primitive: the LSQ / LSQ+ backward on broadcast-form operands.

Operands ``dy, x`` (one shape), ``scale`` and the rounded zero point ``zero_point`` (an
integer-valued float array, optional), whose dimensions are 1 or x's. Results ``(dx, dscale,
[dzero_point])``, the parameter gradients summed to ``scale.shape`` in the compute dtype. Kernel:
``jaxquant.pallas.lsq.triton`` (dx + per-tile partial sums, then an XLA sum over the
non-parameter axes); reference: ``reference.lsq_backward_bf``. Batching gives every batch element
its own parameters (both are ``MAIN`` operands: each element's dscale is its own).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core import sharding as shd
from jaxquant.core.numerics import compute_dtype
from jaxquant.core.primitive import Choice, Op, Operand
from jaxquant.pallas.lsq import triton as kernels
from jaxquant.primitives.lsq import reference as rl

__all__ = ["lsq_backward_op"]

PRECISION = ("dx bit-exact with jaxquant's reference (and PyTorch); dscale / dzero_point: per-element terms "
             "bit-exact, summed in float32 in a kernel-dependent order (not bit-reproducible against the "
             "reference); deterministic")


def _abstract_eval(*, dy, x, scale, zero_point, qmin, qmax, grad_factor, config, impl):
    ct = compute_dtype(x.dtype)
    outs = [jax.core.ShapedArray(x.shape, x.dtype), jax.core.ShapedArray(scale.shape, ct)]
    if zero_point is not None:
        outs.append(jax.core.ShapedArray(scale.shape, ct))
    return outs


def _reference(*, dy, x, scale, zero_point, qmin, qmax, grad_factor, config, impl):
    dx, ds, dz = rl.lsq_backward_bf(dy, x, scale, zero_point, qmin=qmin, qmax=qmax, grad_factor=grad_factor)
    return [dx, ds] + ([dz] if zero_point is not None else [])


def _expanded(x_shape, scale_shape):
    view = gran.canonical_view(x_shape, scale_shape)
    return view, (view.expand if view.expand is not None else scale_shape)


def _dispatch(avals, params, *, device_kind, interpret):
    view, _ = _expanded(avals["x"].shape, avals["scale"].shape)
    cfg = params["config"] or kernels.heuristics(tuple(view.x_shape3), tuple(view.param_full))
    return Choice("triton", cfg, ("jaxquant_lsq_backward",), interpret=interpret)


def _kernel(choice, *, dy, x, scale, zero_point, qmin, qmax, grad_factor, config, impl):
    view, pshape = _expanded(x.shape, scale.shape)
    s = jnp.broadcast_to(scale, pshape)
    z = None if zero_point is None else jnp.broadcast_to(zero_point, pshape)
    dx, ds, dz = kernels.lsq_backward(
        jnp.reshape(dy, view.x_shape3), jnp.reshape(x, view.x_shape3), jnp.reshape(s, view.param_shape3),
        None if z is None else jnp.reshape(z, view.param_shape3), qmin=qmin, qmax=qmax, grad_factor=grad_factor,
        view=view, config=choice.config, interpret=choice.interpret)

    def back(t):  # partials were reduced on the (possibly expanded) canonical parameter view
        t = jnp.reshape(t, pshape)
        if view.expand is not None:
            axes = tuple(i for i, (a, b) in enumerate(zip(view.expand, scale.shape)) if b == 1 and a != 1)
            t = jnp.reshape(jnp.sum(t, axis=axes, keepdims=True), scale.shape)
        return t

    return [jnp.reshape(dx, x.shape), back(ds)] + ([back(dz)] if z is not None else [])


def _summed(x_shape, scale_shape):
    """x's factors and the ones dscale sums over (x's dimensions where the scale broadcasts)."""
    fx = shd.leading("d", len(x_shape))
    fs = shd.broadcast_factors(fx, x_shape, scale_shape, "s")
    return fx, fs, tuple(f for f in fx if f not in fs)


def _sharding(avals, params):
    """dx is elementwise (local on any layout); dscale / dzero_point sum over x's dimensions where
    the parameter broadcasts: when one is split, the per-shard sums are added with one float32
    all-reduce (``psum``)."""
    fx, fs, summed = _summed(avals["x"].shape, avals["scale"].shape)
    operands = {"dy": fx, "x": fx, "scale": fs}
    if avals["zero_point"] is not None:
        operands["zero_point"] = shd.broadcast_factors(fx, avals["x"].shape, avals["zero_point"].shape, "z")
    results = (fx, fs) + ((fs,) if avals["zero_point"] is not None else ())
    return shd.Rule(operands, results, reduction=summed, per_shard=functools.partial(_per_shard, summed))


def _per_shard(summed, shard, arrays, params):
    outs = lsq_backward_op(*arrays.values(), **params)
    return [outs[0]] + [shard.psum(g, *summed) for g in outs[1:]]


lsq_backward_op = Op("jaxquant_lsq_backward", [Operand("dy"), Operand("x"), Operand("scale"),
                                               Operand("zero_point", optional=True)],
                     abstract_eval=_abstract_eval, reference=_reference, kernel=_kernel, dispatch=_dispatch,
                     precision=PRECISION, multiple_results=True, sharding=_sharding)
