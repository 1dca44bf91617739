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
from jaxquant.core.numerics import compute_dtype, is_fp8
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
    fp8: np.dtype | None = None  # the fp8 format of the codes, or None (integer codes)


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
               config=spec.config, impl=spec.impl, fp8=spec.fp8), x_shape)


def _fwd_op(op, x, scale, zp, spec, out_dtype):
    xb, sb, zb = _prep(x, scale, zp, spec, compute_dtype(out_dtype) if op == "dequantize" else None)
    return _bind(op, [xb], x.shape, sb, zb, spec, out_dtype=out_dtype)


def _bwd_op(op, dy, x, scale, zp, spec):
    xb, sb, zb = _prep(x, scale, zp, spec)
    dyb = jnp.reshape(dy, xb.shape)
    return _bind(op, [dyb, xb], x.shape, sb, zb, spec, out_dtype=x.dtype)


def _custom_vjp(op, spec, out_dtype, backward):
    """The kernel ``op`` on ``(x, scale, zp)`` (in ``out_dtype``; None: x's dtype) as a ``custom_vjp``
    whose ``backward(res, ct)`` gets the inputs as ``res``."""
    @jax.custom_vjp
    def f(x, scale, zp):
        return _fwd_op(op, x, scale, zp, spec, x.dtype if out_dtype is None else out_dtype)

    def fwd(x, scale, zp):
        return f(x, scale, zp), (x, scale, zp)

    f.defvjp(fwd, backward)
    return f


def _ste_backward(name, spec):
    """The straight-through backward ``name`` (a kernel) for x; scale's cotangent is zero."""
    def bwd(res, dy):
        x, scale, zp = res
        return _backward_fn(name, spec)(dy, x, scale, zp), jnp.zeros_like(scale), None
    return bwd


def _zero_backward(res, dq):
    """Integer codes are piecewise constant in x: a zero gradient."""
    x, scale, _ = res
    return jnp.zeros_like(x), jnp.zeros_like(scale), None


@functools.lru_cache(maxsize=None)
def _quantize_fn(spec: _Spec):
    integer = jnp.issubdtype(spec.out_dtype, jnp.integer)
    return _custom_vjp("quantize", spec, spec.out_dtype,
                       _zero_backward if integer else _ste_backward("quantize_backward", spec))


@functools.lru_cache(maxsize=None)
def _fake_quantize_fn(spec: _Spec):
    return _custom_vjp("fake_quantize", spec, None, _ste_backward("fake_quantize_backward", spec))


@functools.lru_cache(maxsize=None)
def _dequantize_fn(spec: _Spec):
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

    return _custom_vjp("dequantize", spec, spec.out_dtype, bwd)


def _impl():
    return backend.current_implementation()


def _int_or_fp8(dtype_name, dt, qmin, qmax, zero_point, *, free=False):
    """``(qmin, qmax, fp8)``: the integer code range, or (0, 0, the format) for fp8 codes."""
    if dt is not None and is_fp8(dt):
        V.no_integer_params(dtype_name, dt, qmin=qmin, qmax=qmax, zero_point=zero_point)
        return 0, 0, dt
    if free:
        if qmin is None or qmax is None:
            raise ValueError(f"qmin/qmax: required for integer codes (or pass {dtype_name}=jnp.float8_e4m3fn / "
                             f"jnp.float8_e5m2 for fp8 codes); got qmin={qmin!r}, qmax={qmax!r}")
        return (*V.free_range(qmin, qmax), None)
    return (*V.code_range(dt, qmin, qmax), None)


def quantize(x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, dtype=jnp.int8,
             config: AffineConfig | None = None):
    """Quantize ``x``: ``q = clamp(rne(x * (1/scale)) + zero_point, qmin, qmax)`` in ``dtype``.

    fp8 ``dtype`` (``float8_e4m3fn`` / ``float8_e5m2``, ``fmax`` 448 / 57344):
    ``q = cast_rne(clamp(x * (1/scale), -fmax, fmax))``, NaN stays NaN, +-Inf -> +-fmax; no
    qmin / qmax / zero_point (an error if given). The codes are floats, so ``jax.grad`` flows
    through the straight-through estimator ``dx = dq * (1/scale) * (|x * (1/scale)| <= fmax)``.

    Args:
      x: float16 / bfloat16 / float32 / float64 array.
      scale: float array of the granularity's parameter shape (used as float32; float64 for
        float64 x). Must be finite and > 0.
      zero_point: integer array of the same shape, or None for 0 (symmetric).
      granularity: ``PerTensor()``, ``PerChannel(axis)``, ``PerToken()``, ``PerGroup(g)`` or
        ``PerBlock((r, c))``.
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
    qmin, qmax, fp8 = _int_or_fp8("dtype", dt, qmin, qmax, zero_point)
    scale, zero_point = V.params(x, scale, zero_point, granularity)
    return quantize_with_computed_params(x, scale, zero_point, granularity=granularity, qmin=qmin, qmax=qmax,
                                         dtype=dt, config=config)


def quantize_with_computed_params(x, scale, zero_point, *, granularity, qmin, qmax, dtype, config=None):
    """``quantize`` on arguments already checked, with parameters the library computed from data
    (``dynamic_quantize``, ``quantize_weight``): their values are not checked (a NaN in the data
    gives a NaN scale by the contract). fp8 ``dtype``: ``qmin`` / ``qmax`` are ignored."""
    dt = np.dtype(dtype)
    fp8 = dt if is_fp8(dt) else None
    spec = _Spec(granularity, 0 if fp8 else qmin, 0 if fp8 else qmax, dt, zero_point is not None,
                 check_config(config, AffineConfig), _impl(), fp8)
    return _quantize_fn(spec)(x, scale, zero_point)


def dequantize(q, scale, zero_point=None, *, granularity, dtype=jnp.float32, config: AffineConfig | None = None):
    """Dequantize codes: ``x_hat = (q - zero_point) * scale``, computed in float32, cast to ``dtype``.

    ``q`` is an integer array (int8/uint8/int16/int32 codes), fp8 codes (``float8_e4m3fn`` /
    ``float8_e5m2``: ``x_hat = f32(q) * scale``, no zero point) or float-valued codes. The
    gradient with respect to ``scale`` is exact (``sum(dy * (q - zp))`` per scale element); ``q``
    and ``zero_point`` get none.
    """
    q = V.as_array("q", q)
    if not (jnp.issubdtype(q.dtype, jnp.integer) or np.dtype(q.dtype) in V.FLOAT_DTYPES or is_fp8(q.dtype)):
        raise TypeError(f"q: expected integer, fp8 (or float-valued) codes, got {np.dtype(q.dtype).name}")
    fp8 = np.dtype(q.dtype) if is_fp8(q.dtype) else None
    if fp8 is not None:
        V.no_integer_params("q.dtype", fp8, zero_point=zero_point)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected a float dtype, got {dtype!r}") from None
    if dt not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dt.name}")
    scale, zero_point = V.params(q, scale, zero_point, granularity, x_name="q")
    spec = _Spec(granularity, 0, 0, dt, zero_point is not None, check_config(config, AffineConfig), _impl(), fp8)
    return _dequantize_fn(spec)(q, scale, zero_point)


def fake_quantize(x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, code_dtype=None,
                  config: AffineConfig | None = None):
    """``dequantize(quantize(x))`` in one pass, in x's dtype, with the straight-through gradient.

    Integer codes: ``qmin`` and ``qmax`` (required). fp8 codes: ``code_dtype=jnp.float8_e4m3fn``
    or ``jnp.float8_e5m2`` (no qmin / qmax / zero point): ``y = f32(cast_rne(clamp(x * (1/scale),
    -fmax, fmax))) * scale`` and the STE mask ``|x * (1/scale)| <= fmax``.

    Forward: ``y = (clamp(rne(x * (1/scale)) + zp, qmin, qmax) - zp) * scale`` (float32).
    Backward (STE): ``dx = dy * m``, ``m = qmin <= rne(x * (1/scale)) + zp <= qmax``, equal to
    PyTorch's ``fake_quantize_per_{tensor,channel}_affine`` bit for bit. The gradient with respect
    to ``scale`` and ``zero_point`` is zero (constants under the STE).
    """
    x = V.float_array("x", x)
    code = None if code_dtype is None else V.fp8_dtype("code_dtype", code_dtype)
    qmin, qmax, fp8 = _int_or_fp8("code_dtype", code, qmin, qmax, zero_point, free=True)
    scale, zero_point = V.params(x, scale, zero_point, granularity)
    spec = _Spec(granularity, qmin, qmax, None, zero_point is not None, check_config(config, AffineConfig), _impl(),
                 fp8)
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


def _backward(op, dy, x, scale, zero_point, granularity, qmin, qmax, config, code, code_name):
    x = V.float_array("x", x)
    dy = V.float_array("dy", dy)
    V.same_shape("dy", dy, "x", x)
    code = None if code is None else V.fp8_dtype(code_name, code)
    qmin, qmax, fp8 = _int_or_fp8(code_name, code, qmin, qmax, zero_point, free=True)
    scale, zero_point = V.params(x, scale, zero_point, granularity)
    spec = _Spec(granularity, qmin, qmax, None, zero_point is not None, check_config(config, AffineConfig), _impl(),
                 fp8)
    return _backward_fn(op, spec)(dy, x, scale, zero_point)


def quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, dtype=None,
                      config: AffineConfig | None = None):
    """STE backward of ``quantize`` with real-valued codes: ``dx = dy * (1/scale) * m``, in x's dtype.

    Integer codes: ``m = qmin <= rne(x * (1/scale)) + zp <= qmax`` (qmin / qmax required). fp8
    codes (``dtype=jnp.float8_e4m3fn`` / ``jnp.float8_e5m2``, as given to ``quantize``; no qmin /
    qmax / zero point): ``m = |x * (1/scale)| <= fmax``. The mask is recomputed from ``x`` in the kernel.
    """
    return _backward("quantize_backward", dy, x, scale, zero_point, granularity, qmin, qmax, config, dtype, "dtype")


def fake_quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, code_dtype=None,
                           config: AffineConfig | None = None):
    """STE backward of ``fake_quantize``: ``dx = dy * m``, in x's dtype (what ``jax.grad`` runs);
    ``code_dtype`` as in ``fake_quantize``."""
    return _backward("fake_quantize_backward", dy, x, scale, zero_point, granularity, qmin, qmax, config,
                     code_dtype, "code_dtype")
