"""The public affine functions: validation, the granularity view, and custom_vjp rules.

Every function checks its arguments when traced (errors name the argument, the expected and the
given value), reshapes to the broadcast form of ``jaxquant.granularity`` (free), binds one
primitive (one kernel launch on a GPU) and reshapes back.
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
from jaxquant.pallas.affine.triton import Config as AffineConfig
from jaxquant.primitives.affine import primitive as P

__all__ = ["quantize", "dequantize", "fake_quantize", "quantize_backward", "fake_quantize_backward"]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one call (hashable: the custom_vjp closures are cached on it)."""

    granularity: object
    qmin: int
    qmax: int
    out_dtype: np.dtype | None
    has_zp: bool
    config: AffineConfig | None
    impl: str


def check_config(config, cls, name="config"):
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"{name}: expected a {cls.__module__}.{cls.__qualname__} or None, got {config!r}")
    return config


def _prep(x, scale, zp, spec: _Spec, ct=None):
    """Broadcast form of x and the parameters (scale as float32/float64, zp as int32).

    ``ct``: the compute dtype; by default x's (for dequantize: the output dtype's)."""
    ct = compute_dtype(x.dtype) if ct is None else ct
    xb, sb = gran.to_broadcast_form(x, scale.astype(ct), spec.granularity)
    zb = None
    if zp is not None:
        _, zb = gran.to_broadcast_form(x, zp.astype(jnp.int32), spec.granularity)
    return xb, sb, zb


def _bind(op, mains, x_shape, scale, zp, spec: _Spec, *, out_dtype):
    return gran.from_broadcast_form(
        P.bind(op, *mains, scale=scale, zero_point=zp, qmin=spec.qmin, qmax=spec.qmax, out_dtype=out_dtype,
               config=spec.config, impl=spec.impl), x_shape)


def _fwd_op(op, x, scale, zp, spec, out_dtype):
    xb, sb, zb = _prep(x, scale, zp, spec, compute_dtype(out_dtype) if op == "dequantize" else None)
    return _bind(op, [xb], x.shape, sb, zb, spec, out_dtype=out_dtype)


def _bwd_op(op, dy, x, scale, zp, spec):
    xb, sb, zb = _prep(x, scale, zp, spec)
    dyb = jnp.reshape(dy, xb.shape)
    return _bind(op, [dyb, xb], x.shape, sb, zb, spec, out_dtype=x.dtype)


@functools.lru_cache(maxsize=None)
def _quantize_fn(spec: _Spec):
    @jax.custom_vjp
    def f(x, scale, zp):
        return _fwd_op("quantize", x, scale, zp, spec, spec.out_dtype)

    def fwd(x, scale, zp):
        return f(x, scale, zp), (x, scale, zp)

    def bwd(res, dq):
        x, scale, zp = res
        if jnp.issubdtype(spec.out_dtype, jnp.integer):
            return jnp.zeros_like(x), jnp.zeros_like(scale), None
        return _backward_fn("quantize_backward", spec)(dq, x, scale, zp), jnp.zeros_like(scale), None

    f.defvjp(fwd, bwd)
    return f


@functools.lru_cache(maxsize=None)
def _fake_quantize_fn(spec: _Spec):
    @jax.custom_vjp
    def f(x, scale, zp):
        return _fwd_op("fake_quantize", x, scale, zp, spec, x.dtype)

    def fwd(x, scale, zp):
        return f(x, scale, zp), (x, scale, zp)

    def bwd(res, dy):
        x, scale, zp = res
        return _backward_fn("fake_quantize_backward", spec)(dy, x, scale, zp), jnp.zeros_like(scale), None

    f.defvjp(fwd, bwd)
    return f


@functools.lru_cache(maxsize=None)
def _dequantize_fn(spec: _Spec):
    @jax.custom_vjp
    def f(q, scale, zp):
        return _fwd_op("dequantize", q, scale, zp, spec, spec.out_dtype)

    def fwd(q, scale, zp):
        return f(q, scale, zp), (q, scale, zp)

    def bwd(res, dy):
        # d/dscale of (q - zp) * scale is (q - zp): summed over the elements sharing a scale.
        q, scale, zp = res
        ct = compute_dtype(dy.dtype)
        qb, sb, zb = _prep(q, scale, zp, spec, ct)
        qf = qb.astype(ct) - (zb.astype(ct) if zb is not None else 0)
        prod = jnp.reshape(dy, qb.shape).astype(ct) * qf
        axes = tuple(i for i, (a, b) in enumerate(zip(qb.shape, sb.shape)) if b == 1 and a != 1)
        dscale = jnp.reshape(jnp.sum(prod, axis=axes, keepdims=True), scale.shape).astype(scale.dtype)
        return None, dscale, None

    f.defvjp(fwd, bwd)
    return f


def _impl():
    return backend.current_implementation()


def quantize(x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, dtype=jnp.int8,
             config: AffineConfig | None = None):
    """Quantize ``x``: ``q = clamp(rne(x * (1/scale)) + zero_point, qmin, qmax)`` in ``dtype``.

    Args:
      x: float16 / bfloat16 / float32 / float64 array.
      scale: float array of the granularity's parameter shape (used as float32; float64 for
        float64 x). Must be finite and > 0.
      zero_point: integer array of the same shape, or None for 0 (symmetric).
      granularity: ``PerTensor()``, ``PerChannel(axis)``, ``PerToken()`` or ``PerGroup(g)``.
      qmin, qmax: the code range; default: the full range of an integer ``dtype``. int4 codes
        live in int8 (``qmin=-8, qmax=7``) or uint8 (``0, 15``) containers.
      dtype: int8, uint8, int16, int32, or a float dtype for real-valued codes (qmin/qmax
        required) — then ``jax.grad`` flows through the straight-through estimator
        ``dx = dy * (1/scale) * m`` with ``m = qmin <= rne(x/scale) + zp <= qmax``.
      config: an ``jaxquant.pallas.affine.Config`` overriding the kernel's tile heuristics.

    NaN gives ``qmin``, +Inf ``qmax``, -Inf ``qmin``. The gradient with respect to ``scale``
    and ``zero_point`` is zero (the STE treats them as constants; learnable scales are
    ``jaxquant.flax``'s business); with an integer ``dtype`` the gradient to x is zero too.
    """
    x = V.float_array("x", x)
    dt = V.code_dtype("dtype", dtype)
    qmin, qmax = V.code_range(dt, qmin, qmax)
    scale, zero_point = V.params(x, scale, zero_point, granularity)
    return quantize_with_computed_params(x, scale, zero_point, granularity=granularity, qmin=qmin, qmax=qmax,
                                         dtype=dt, config=config)


def quantize_with_computed_params(x, scale, zero_point, *, granularity, qmin, qmax, dtype, config=None):
    """``quantize`` on arguments already checked, with parameters the library computed from data
    (``dynamic_quantize``, ``quantize_weight``): their values are not checked (a NaN in the data
    gives a NaN scale by the contract)."""
    spec = _Spec(granularity, qmin, qmax, np.dtype(dtype), zero_point is not None, check_config(config, AffineConfig),
                 _impl())
    return _quantize_fn(spec)(x, scale, zero_point)


def dequantize(q, scale, zero_point=None, *, granularity, dtype=jnp.float32, config: AffineConfig | None = None):
    """Dequantize codes: ``x_hat = (q - zero_point) * scale``, computed in float32, cast to ``dtype``.

    ``q`` is an integer array (int8/uint8/int16/int32 codes) or float-valued codes. The gradient
    with respect to ``scale`` is exact (``sum(dy * (q - zp))`` per scale element); ``q`` and
    ``zero_point`` get none.
    """
    q = V.as_array("q", q)
    if not (jnp.issubdtype(q.dtype, jnp.integer) or np.dtype(q.dtype) in V.FLOAT_DTYPES):
        raise TypeError(f"q: expected integer (or float-valued) codes, got {np.dtype(q.dtype).name}")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected a float dtype, got {dtype!r}") from None
    if dt not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dt.name}")
    scale, zero_point = V.params(q, scale, zero_point, granularity, x_name="q")
    spec = _Spec(granularity, 0, 0, dt, zero_point is not None, check_config(config, AffineConfig), _impl())
    return _dequantize_fn(spec)(q, scale, zero_point)


def fake_quantize(x, scale, zero_point=None, *, granularity, qmin, qmax, config: AffineConfig | None = None):
    """``dequantize(quantize(x))`` in one pass, in x's dtype, with the straight-through gradient.

    Forward: ``y = (clamp(rne(x * (1/scale)) + zp, qmin, qmax) - zp) * scale`` (float32).
    Backward (STE): ``dx = dy * m``, ``m = qmin <= rne(x * (1/scale)) + zp <= qmax``, equal to
    PyTorch's ``fake_quantize_per_{tensor,channel}_affine`` bit for bit. The gradient with respect
    to ``scale`` and ``zero_point`` is zero (constants under the STE).
    """
    x = V.float_array("x", x)
    qmin, qmax = V.free_range(qmin, qmax)
    scale, zero_point = V.params(x, scale, zero_point, granularity)
    spec = _Spec(granularity, qmin, qmax, None, zero_point is not None, check_config(config, AffineConfig), _impl())
    return _fake_quantize_fn(spec)(x, scale, zero_point)


@functools.lru_cache(maxsize=None)
def _backward_fn(op: str, spec: _Spec):
    """The STE backward ops are linear in dy and diagonal (``dy * c(x)`` elementwise), hence
    self-adjoint: their VJP with respect to dy is the same op applied to the cotangent. The mask
    is piecewise constant in x, so x, scale and zero_point get zero gradients."""

    @jax.custom_vjp
    def f(dy, x, scale, zp):
        return _bwd_op(op, dy, x, scale, zp, spec)

    def fwd(dy, x, scale, zp):
        return f(dy, x, scale, zp), (x, scale, zp)

    def bwd(res, ct):
        x, scale, zp = res
        return f(ct.astype(x.dtype), x, scale, zp).astype(ct.dtype), jnp.zeros_like(x), jnp.zeros_like(scale), None

    f.defvjp(fwd, bwd)
    return f


def _backward(op, dy, x, scale, zero_point, granularity, qmin, qmax, config):
    x = V.float_array("x", x)
    dy = V.float_array("dy", dy)
    V.same_shape("dy", dy, "x", x)
    qmin, qmax = V.free_range(qmin, qmax)
    scale, zero_point = V.params(x, scale, zero_point, granularity)
    spec = _Spec(granularity, qmin, qmax, None, zero_point is not None, check_config(config, AffineConfig), _impl())
    return _backward_fn(op, spec)(dy, x, scale, zero_point)


def quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin, qmax, config: AffineConfig | None = None):
    """STE backward of ``quantize`` with real-valued codes: ``dx = dy * (1/scale) * m``, in x's dtype.

    ``m = qmin <= rne(x * (1/scale)) + zp <= qmax`` is recomputed from ``x`` in the kernel.
    """
    return _backward("quantize_backward", dy, x, scale, zero_point, granularity, qmin, qmax, config)


def fake_quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin, qmax,
                           config: AffineConfig | None = None):
    """STE backward of ``fake_quantize``: ``dx = dy * m``, in x's dtype (what ``jax.grad`` runs)."""
    return _backward("fake_quantize_backward", dy, x, scale, zero_point, granularity, qmin, qmax, config)
