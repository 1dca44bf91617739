"""W8A8 public functions: ``quantized_linear`` and ``int8_matmul`` (validation, custom_vjp).

* ``quantized_linear(x, qweight, bias=None, *, out_dtype=None, act_scale=None)`` —
  ``y ≈ x @ W^T (+ bias)`` with int8 activations and int8 weights;
* ``int8_matmul(a, w, a_scale=None, w_scale=None, bias=None, *, out_dtype=None)`` — the raw
  int8 GEMM on codes you already have (``int32`` accumulator out when there are no scales).

Forward math: ``reference.py``. A row containing NaN gets a NaN scale, so its outputs are NaN.

Backward (``jax.grad``), straight through the activation quantizer::

    dx    = dy @ W_hat,  W_hat[n, k] = codes[n, k] * w_scale[n]     (the dequantized weight)
    dbias = sum over the leading axes of dy

and no gradient (zero) to ``codes``, ``w_scale`` and ``act_scale``: they are frozen serving
parameters (train float weights with ``jaxquant.fake_quantize`` for QAT instead). ``dx`` is
computed in x's dtype with a float32 accumulator (float32 x: ``precision=HIGHEST``). The VJP is
linear in ``dy``, so it can itself be differentiated (``jax.test_util.check_grads`` passes).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant.core import backend
from jaxquant.core import validation as V
from jaxquant.core.weights import check_quantized_weight
from jaxquant.pallas.int8_matmul import mosaic, triton
from jaxquant.primitives.int8_matmul.primitive import int8_matmul_op, quantized_linear_op

__all__ = ["quantized_linear", "int8_matmul"]

_OUT_DTYPES = V.ACTIVATION_DTYPES


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one ``quantized_linear`` call (the custom_vjp closure is cached on it)."""

    out_dtype: np.dtype
    config: triton.Config | mosaic.Config | None
    impl: str


def _bind_linear(spec: _Spec, x, codes, w_scale, bias, act_scale):
    return quantized_linear_op(x, codes, w_scale, bias, act_scale, out_dtype=spec.out_dtype, config=spec.config,
                               impl=spec.impl)


def _dx(dy, codes, w_scale, x_dtype):
    """STE backward: ``dy @ W_hat`` with ``W_hat = codes * w_scale[:, None]`` (in x's dtype, f32 accumulation)."""
    x_dtype = np.dtype(x_dtype)
    w_hat = codes.astype(jnp.float32) * jnp.reshape(w_scale, (-1, 1)).astype(jnp.float32)
    if x_dtype == np.float32:
        dyc, wc, prec = dy.astype(jnp.float32), w_hat, jax.lax.Precision.HIGHEST
    else:
        dyc, wc, prec = dy.astype(x_dtype), w_hat.astype(x_dtype), None
    dx = jax.lax.dot_general(dyc, wc, (((dyc.ndim - 1,), (0,)), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32)
    return dx.astype(x_dtype)


@functools.lru_cache(maxsize=None)
def _linear_fn(spec: _Spec):
    @jax.custom_vjp
    def f(x, codes, w_scale, bias, act_scale):
        return _bind_linear(spec, x, codes, w_scale, bias, act_scale)

    def fwd(x, codes, w_scale, bias, act_scale):
        return f(x, codes, w_scale, bias, act_scale), (codes, w_scale, bias, jnp.zeros((0,), x.dtype))

    def bwd(res, dy):
        codes, w_scale, bias, x_proto = res
        dx = _dx(dy, codes, w_scale, x_proto.dtype)
        db = None
        if bias is not None:
            db = jnp.sum(dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1))).astype(bias.dtype)
        return dx, None, None, db, None

    f.defvjp(fwd, bwd)
    return f


def _check_config(config):
    return V.config("config", config, triton.Config, mosaic.Config)


def _out_dtype(out_dtype, default, *, allow_int32=False):
    if out_dtype is None:
        return np.dtype(default)
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"out_dtype: expected a dtype, got {out_dtype!r}") from None
    allowed = _OUT_DTYPES + ((np.dtype(np.int32),) if allow_int32 else ())
    if dt not in allowed:
        names = ", ".join(d.name for d in allowed)
        raise TypeError(f"out_dtype: expected one of {names}, got {dt.name}")
    return dt


def _check_qweight(qweight, k):
    qw = check_quantized_weight("qweight", qweight, k=k)
    if qw.bits != 8:
        raise ValueError(f"qweight.bits: expected 8 for the W8A8 quantized_linear (4-bit weights: "
                         f"weight_only_linear), got {qw.bits}")
    if qw.group_size is not None:
        raise ValueError(f"qweight.group_size: expected None (one scale per output channel) for quantized_linear, "
                         f"got {qw.group_size}")
    if not qw.symmetric:
        raise ValueError("qweight.symmetric: expected True (zero point 0) for quantized_linear, got False")
    return qw


def quantized_linear(x, qweight, bias=None, *, out_dtype=None, act_scale=None,
                     config: triton.Config | mosaic.Config | None = None):
    """W8A8 linear layer: ``y = x @ W^T (+ bias)`` with int8 activations and weights.

    Args:
      x: float32 / float16 / bfloat16 activations ``[..., K]`` (any leading axes: tokens).
      qweight: a ``jaxquant.QuantizedWeight`` from ``quantize_weight(w, bits=8)`` (``w [N, K]``,
        symmetric, one float32 scale per output channel: ``codes`` int8 ``[N, K]``, ``scale [N]``).
      bias: optional float ``[N]``, added in float32 in the kernel's epilogue.
      out_dtype: float16 / bfloat16 / float32; default x's dtype.
      act_scale: None for dynamic symmetric per-token activation scales (computed from x), or a
        float32 scalar (> 0, finite) for a static per-tensor scale (SmoothQuant-static style).
      config: overrides the GEMM choice: a ``jaxquant.pallas.int8_matmul.triton.Config`` (the Triton
        GEMM with that tile) or a ``jaxquant.pallas.int8_matmul.mosaic.Config`` (the Mosaic GPU GEMM,
        Hopper only: no bias, M / N / K multiples of its tile). Default: ``use_mgpu`` decides.

    Returns ``[..., N]`` in ``out_dtype``. Forward and backward math: the module docstring —
    ``y = (f32(sum_k q[m,k] codes[n,k]) * s[m]) * w_scale[n] + bias[n]`` with ``q`` the int8 codes
    of x; ``jax.grad`` gives ``dx = dy @ (codes * w_scale[:, None])`` (straight-through the
    activation quantizer) and ``dbias = sum(dy)``; the codes and scales get no gradient.
    """
    x = V.activation("x", x)
    k = x.shape[-1]
    qw = _check_qweight(qweight, k)
    n = qw.shape[0]
    if bias is not None:
        bias = V.vector("bias", bias, n, what="one value per output channel N of qweight")
    if act_scale is not None:
        act_scale = V.positive_scale("act_scale", V.float_array("act_scale", act_scale))
        if act_scale.size != 1 or act_scale.ndim > 1:
            raise ValueError(f"act_scale: expected a scalar (one static per-tensor scale), got shape "
                             f"{tuple(act_scale.shape)}")
        act_scale = jnp.reshape(act_scale, ()).astype(jnp.float32)
    spec = _Spec(_out_dtype(out_dtype, x.dtype), _check_config(config), backend.current_implementation())
    return _linear_fn(spec)(x, qw.codes, qw.scale, bias, act_scale)


def int8_matmul(a, w, a_scale=None, w_scale=None, bias=None, *, out_dtype=None,
                config: triton.Config | mosaic.Config | None = None):
    """The int8 GEMM on codes: ``epilogue(sum_k int32(a[..., k]) * int32(w[n, k]))``.

    Args:
      a: int8 ``[..., K]`` activation codes; w: int8 ``[N, K]`` weight codes (``y = a @ w^T``).
      a_scale: None, a float32 scalar (per tensor) or ``a.shape[:-1]`` (per token).
      w_scale: None or float32 ``[N]``; bias: None or float ``[N]``.
      out_dtype: default int32 (the exact accumulator) when there is no scale and no bias,
        float32 otherwise; int32 is only allowed without an epilogue.
      config: as in ``quantized_linear``.

    Epilogue: ``(f32(acc) * a_scale) * w_scale (+ f32(bias))`` in float32, inside the kernel.
    Not differentiable (integer inputs).
    """
    a = V.as_array("a", a)
    w = V.as_array("w", w)
    for name, arr in (("a", a), ("w", w)):
        if np.dtype(arr.dtype) != np.int8:
            raise TypeError(f"{name}: expected int8 codes, got a {np.dtype(arr.dtype).name} array of shape "
                            f"{tuple(arr.shape)}")
    if a.ndim < 1:
        raise ValueError("a: expected an array [..., K] of rank >= 1, got a scalar")
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-d weight [N, K], got shape {tuple(w.shape)}")
    k = a.shape[-1]
    if w.shape[1] != k:
        raise ValueError(f"w: expected shape (N, {k}) (K = the last axis of a, layout [N, K]), got shape "
                         f"{tuple(w.shape)}")
    n = w.shape[0]
    if a_scale is not None:
        a_scale = V.positive_scale("a_scale", V.float_array("a_scale", a_scale))
        if a_scale.ndim == 0:
            a_scale = jnp.reshape(a_scale, (1,) * a.ndim)
        elif tuple(a_scale.shape) == tuple(a.shape[:-1]):
            a_scale = a_scale[..., None]
        else:
            raise ValueError(f"a_scale: expected a scalar or shape {tuple(a.shape[:-1])} (one per token of a), "
                             f"got shape {tuple(a_scale.shape)}")
        a_scale = a_scale.astype(jnp.float32)
    if w_scale is not None:
        w_scale = V.positive_scale("w_scale", V.vector("w_scale", w_scale, n,
                                                       what="one scale per output channel N of w"))
        w_scale = w_scale.astype(jnp.float32)
    if bias is not None:
        bias = V.vector("bias", bias, n, what="one value per output channel N of w")
    has_ep = a_scale is not None or w_scale is not None or bias is not None
    dt = _out_dtype(out_dtype, np.float32 if has_ep else np.int32, allow_int32=not has_ep)
    a, w, a_scale, w_scale, bias = jax.lax.stop_gradient((a, w, a_scale, w_scale, bias))
    return int8_matmul_op(a, w, a_scale, w_scale, bias, out_dtype=dt, config=_check_config(config),
                          impl=backend.current_implementation())
