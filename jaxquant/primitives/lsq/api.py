"""Learnable scale and zero point (LSQ / LSQ+): ``fake_quantize_learnable``.

``fake_quantize_learnable(x, scale, zero_point, *, granularity, qmin, qmax, grad_factor=1.0)``
has PyTorch's ``torch._fake_quantize_learnable_per_tensor_affine`` /
``_fake_quantize_learnable_per_channel_affine`` semantics:

* forward: ``zp = clamp(rne(zero_point), qmin, qmax)`` (``zero_point`` is a FLOAT tensor; None
  means 0 and no zero-point gradient), then ``jaxquant.fake_quantize(x, scale, zp)`` — bit-identical
  to torch's forward.
* backward: ``dx = dy * m`` and the LSQ gradients of ``scale`` and ``zero_point`` (per-element
  formulas: ``jaxquant.primitives.lsq.reference``), summed over the elements sharing a parameter and scaled
  by ``grad_factor`` (LSQ uses ``1 / sqrt(numel_per_scale * qmax)``).

Documented subtleties (all inherited from torch, measure-zero inputs):

1. The backward's mask and clamp branches round ``x * inv_scale + zp`` (float add, then round),
   as torch's backward kernels do, while the forward (torch's and ``jaxquant.fake_quantize``)
   rounds ``x * inv_scale`` and then adds the integer zero point: at an exact .5 tie with an
   odd zero point the backward's mask can disagree with the forward's clamp (torch's too).
2. torch's per-tensor backward rounds the float zero point as ``int(clamp(zp + 0.5))``
   (truncation) where its forward uses ``nearbyint``; they differ for negative non-integer zero
   points and at .5 ties. We use the forward's ``clamp(rne(zp))`` in both passes (torch's
   per-channel op does too).

``dx`` equals torch bit for bit (the mask is the same); ``dscale``/``dzp`` terms are computed in
torch's operation order (bit-identical terms), only the summation order differs.

The backward is the ``jaxquant_lsq_backward`` primitive (``primitive.py``): the Pallas kernel
(``jaxquant.pallas.lsq.triton``: dx + per-tile partial sums, then an XLA sum over the
non-channel axes) or the reference (``reference.py``); ``jaxquant.implementation`` selects as
for the other ops.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core import backend
from jaxquant.core import validation as V
from jaxquant.core.numerics import compute_dtype
from jaxquant.pallas.lsq import triton as kernels
from jaxquant.primitives.affine.api import fake_quantize
from jaxquant.primitives.lsq.primitive import lsq_backward_op

__all__ = ["fake_quantize_learnable", "lsq_backward", "round_zero_point"]


# ------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    granularity: object
    qmin: int
    qmax: int
    grad_factor: float
    has_zp: bool
    config: kernels.Config | None
    impl: str


def round_zero_point(zero_point, qmin, qmax):
    """The forward's integer zero point: ``clamp(rne(zero_point), qmin, qmax)`` as int32."""
    return jnp.clip(jnp.round(zero_point), qmin, qmax).astype(jnp.int32)


def _bwd_parts(spec: _Spec, dy, x, scale, zp_float):
    ct = compute_dtype(x.dtype)
    xb, sb = gran.to_broadcast_form(x, scale.astype(ct), spec.granularity)
    args = [jnp.reshape(dy, xb.shape), xb, sb]
    if spec.has_zp:
        _, zb = gran.to_broadcast_form(x, round_zero_point(zp_float, spec.qmin, spec.qmax).astype(ct),
                                       spec.granularity)
        args.append(zb)
    outs = lsq_backward_op(*args[:3], args[3] if len(args) == 4 else None, qmin=spec.qmin, qmax=spec.qmax,
                           grad_factor=spec.grad_factor, config=spec.config, impl=spec.impl)
    dx = jnp.reshape(outs[0], x.shape)
    ds = jnp.reshape(outs[1], scale.shape).astype(scale.dtype)
    dz = jnp.reshape(outs[2], zp_float.shape).astype(zp_float.dtype) if spec.has_zp else None
    return dx, ds, dz


@functools.lru_cache(maxsize=None)
def _fq_fn(spec: _Spec):
    @jax.custom_vjp
    def f(x, scale, zp):
        z = round_zero_point(zp, spec.qmin, spec.qmax) if spec.has_zp else None
        with backend.implementation(spec.impl):
            return fake_quantize(x, scale, z, granularity=spec.granularity, qmin=spec.qmin, qmax=spec.qmax)

    def fwd(x, scale, zp):
        return f(x, scale, zp), (x, scale, zp)

    def bwd(res, dy):
        x, scale, zp = res
        return _bwd_parts(spec, dy, x, scale, zp)

    f.defvjp(fwd, bwd)
    return f


def _validate(x, scale, zero_point, granularity, qmin, qmax, grad_factor):
    x = V.float_array("x", x)
    if not isinstance(granularity, (gran.PerTensor, gran.PerChannel)):
        raise TypeError(f"granularity: expected PerTensor() or PerChannel(axis) (torch's learnable fake-quantize "
                        f"ops), got {granularity!r}")
    gran.check_granularity(granularity, x.shape)
    qmin, qmax = V.free_range(qmin, qmax)
    if not qmin <= 0 <= qmax:
        raise ValueError(f"qmin/qmax: the range must include 0 (as torch requires), got [{qmin}, {qmax}]")
    pshape = gran.param_shape(granularity, x.shape)
    scale = V.positive_scale("scale", V.float_array("scale", scale))
    if isinstance(granularity, gran.PerTensor) and scale.shape == (1,):
        scale = jnp.reshape(scale, ())
    if tuple(scale.shape) != tuple(pshape):
        raise ValueError(f"scale: expected shape {tuple(pshape)} for {granularity!r} on x of shape "
                         f"{tuple(x.shape)}, got {tuple(scale.shape)}")
    if zero_point is not None:
        zero_point = V.as_array("zero_point", zero_point)
        if not jnp.issubdtype(zero_point.dtype, jnp.floating):
            raise TypeError(f"zero_point: expected a FLOAT array (it is learned; rounded in the forward), got "
                            f"{np.dtype(zero_point.dtype).name}")
        if isinstance(granularity, gran.PerTensor) and zero_point.shape == (1,):
            zero_point = jnp.reshape(zero_point, ())
        if tuple(zero_point.shape) != tuple(pshape):
            raise ValueError(f"zero_point: expected shape {tuple(pshape)}, got {tuple(zero_point.shape)}")
    try:
        grad_factor = float(grad_factor)
    except TypeError:
        raise TypeError(f"grad_factor: expected a Python float, got {type(grad_factor).__name__}") from None
    return x, scale, zero_point, qmin, qmax, grad_factor


def fake_quantize_learnable(x, scale, zero_point=None, *, granularity, qmin, qmax, grad_factor: float = 1.0,
                            config: kernels.Config | None = None):
    """Fake-quantize with learnable ``scale`` and float ``zero_point`` (LSQ; module docstring).

    ``granularity``: ``PerTensor()`` (scale shape ``()`` or ``(1,)``) or ``PerChannel(axis)``.
    ``scale`` must be > 0. Returns x's shape and dtype; ``jax.grad`` gives torch's LSQ gradients
    for ``x``, ``scale`` and ``zero_point`` (``None`` zero point: symmetric, no gradient).
    """
    x, scale, zero_point, qmin, qmax, grad_factor = _validate(x, scale, zero_point, granularity, qmin, qmax,
                                                              grad_factor)
    if config is not None and not isinstance(config, kernels.Config):
        raise TypeError(f"config: expected a jaxquant.pallas.lsq.Config or None, got {config!r}")
    spec = _Spec(granularity, qmin, qmax, grad_factor, zero_point is not None, config,
                 backend.current_implementation())
    zp = zero_point if zero_point is not None else jnp.zeros(scale.shape, jnp.float32)
    return _fq_fn(spec)(x, scale, zp)


def lsq_backward(dy, x, scale, zero_point=None, *, granularity, qmin, qmax, grad_factor: float = 1.0,
                 config: kernels.Config | None = None):
    """The backward alone: ``(dx, dscale, dzero_point or None)`` (what ``jax.grad`` runs)."""
    x, scale, zero_point, qmin, qmax, grad_factor = _validate(x, scale, zero_point, granularity, qmin, qmax,
                                                              grad_factor)
    dy = V.float_array("dy", dy)
    V.same_shape("dy", dy, "x", x)
    spec = _Spec(granularity, qmin, qmax, grad_factor, zero_point is not None, config,
                 backend.current_implementation())
    zp = zero_point if zero_point is not None else jnp.zeros(scale.shape, jnp.float32)
    return _bwd_parts(spec, dy, x, scale, zp)
