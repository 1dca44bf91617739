"""``weight_only_linear``: W4A16 / W8A16 linear layers over a ``QuantizedWeight`` (``y = x @ W^T``).

Forward: the ``jaxquant_weight_only_linear`` primitive (``primitive.py``: the fused
dequant-matmul kernels; reference in ``reference.py``).

Backward (``custom_vjp``, for LoRA / QLoRA fine-tuning over frozen quantized weights)::

    dx    = dy @ W                           XLA: W dequantized to x's dtype (float32 for float32
                                             x), float32 accumulation, cast to x's dtype
    dbias = sum(dy over the leading axes)    in bias's dtype
    codes, scale, zero_point: no gradient (frozen; zero cotangents)
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
from jaxquant.pallas.weight_only import mosaic, triton
from jaxquant.primitives.weight_only.primitive import weight_only_linear_op
from jaxquant.primitives.weights import dequantize_weight_raw

__all__ = ["weight_only_linear"]

@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static facts of one call (hashable: the custom_vjp closure is cached on it)."""

    bits: int
    group_size: int | None
    symmetric: bool
    shape: tuple
    config: triton.Config | mosaic.Config | None
    impl: str


def _bind(spec: _Spec, x, codes, scale, zp, bias):
    return weight_only_linear_op(x, codes, scale, zp, bias, bits=spec.bits, group_size=spec.group_size,
                                 symmetric=spec.symmetric, k=spec.shape[1], config=spec.config, impl=spec.impl)


@functools.lru_cache(maxsize=None)
def _linear_fn(spec: _Spec):
    @jax.custom_vjp
    def f(x, codes, scale, zp, bias):
        return _bind(spec, x, codes, scale, zp, bias)

    def fwd(x, codes, scale, zp, bias):
        return f(x, codes, scale, zp, bias), (x, codes, scale, zp, bias)

    def bwd(res, dy):
        x, codes, scale, zp, bias = res
        wdt = jnp.float32 if np.dtype(x.dtype) == np.float32 else x.dtype
        w = dequantize_weight_raw(codes, scale, zp, bits=spec.bits, group_size=spec.group_size,
                                    symmetric=spec.symmetric, dtype=wdt)
        dx = jax.lax.dot_general(dy.astype(wdt), w, (((dy.ndim - 1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(x.dtype)
        db = None
        if bias is not None:
            db = jnp.sum(dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1))).astype(bias.dtype)
        return dx, None, None, None, db

    f.defvjp(fwd, bwd)
    return f


def weight_only_linear(x, qweight, bias=None, *, config: triton.Config | mosaic.Config | None = None):
    """``y = x @ dequant(qweight)^T (+ bias)``, in x's dtype, with the dequantization fused in the matmul.

    Args:
      x: float16 / bfloat16 / float32 activations ``[..., K]`` (any leading dims, vmappable).
      qweight: a ``jaxquant.QuantizedWeight`` of shape ``(N, K)`` (bits 4 or 8, any group size,
        symmetric or not) from ``jaxquant.quantize_weight``.
      bias: optional float ``[N]``, added in float32 before the cast.
      config: a ``jaxquant.pallas.weight_only.triton.Config`` (the Triton kernel) or a
        ``jaxquant.pallas.weight_only.mosaic.Config`` (the Hopper prefill kernel) overriding the
        heuristics, which pick the kernel (``use_mgpu``) and its tile.

    Forward: on a GPU one Pallas kernel streams the packed codes and dequantizes them in
    registers (float32 accumulation): on Hopper with bfloat16 x and prefill shapes (``use_mgpu``)
    the warp-specialised Mosaic GPU kernel, else the Triton kernel; on the CPU the reference
    dequantize-then-``dot``.
    Groups smaller than ``jaxquant.pallas.weight_only.triton.MIN_GROUP`` (32 for int4, 16 for int8) take
    XLA's dequantize-then-dot. float32 x on a GPU follows ``jax.default_matmul_precision`` as XLA's float32 matmuls do there:
    TF32 tensor-core products by default, ~float32 (three TF32 products) under
    ``jax.default_matmul_precision("float32")`` (``jaxquant.pallas.weight_only.triton.float32_dot_algorithm``).
    Backward (``custom_vjp``): ``dx = dy @ dequant(W)`` (XLA), ``dbias = sum(dy)``; the
    quantized weight is frozen (no gradient). Math and layout: ``jaxquant.weights`` and
    ``jaxquant.pallas.weight_only.triton``.
    """
    x = V.activation("x", x)
    qweight = check_quantized_weight("qweight", qweight)
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: expected the last axis to be K = {k} (qweight of shape (N, K) = {qweight.shape}), "
                         f"got x of shape {tuple(x.shape)}")
    if bias is not None:
        bias = V.vector("bias", bias, n, what=f"N of qweight {qweight.shape}")
    V.config("config", config, triton.Config, mosaic.Config)
    spec = _Spec(qweight.bits, qweight.group_size, qweight.symmetric, qweight.shape, config,
                 backend.current_implementation())
    return _linear_fn(spec)(x, qweight.codes, qweight.scale, qweight.zero_point, bias)
