"""The backward pass shared by the linear layers on a frozen quantized weight (``quantized_linear``
int8 and fp8, ``weight_only_linear``): only the activation and the bias get gradients,

    dx    = dy @ W_hat          (W_hat: the dequantized weight [N, K]; float32 accumulation)
    dbias = sum(dy) over every axis but the last (in float32, cast to bias's dtype)

straight through any activation quantizer. Each layer supplies its own ``W_hat`` and operand
precision; this module holds the ``custom_vjp`` wiring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dy_at", "bias_grad", "frozen_weight_linear"]


def dy_at(dy, w_hat, precision=None):
    """``dy [..., N] @ w_hat [N, K]`` in ``w_hat``'s dtype with float32 accumulation (float32 result)."""
    return jax.lax.dot_general(dy.astype(w_hat.dtype), w_hat, (((dy.ndim - 1,), (0,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)


def bias_grad(dy, bias):
    """``sum(dy)`` over the leading axes, in float32, cast to ``bias``'s dtype (None without a bias)."""
    if bias is None:
        return None
    return jnp.sum(dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1))).astype(bias.dtype)


def frozen_weight_linear(forward, dx, bias_arg: int):
    """``f(x, *w)`` = ``forward(x, *w)`` as a ``custom_vjp`` whose backward gives ``dx(dy, *w, x_dtype)``
    for ``x``, ``bias_grad`` for the operand at position ``bias_arg`` and no gradient to the others
    (the quantized weight's codes / scales / zero points, a static activation scale)."""

    @jax.custom_vjp
    def f(x, *w):
        return forward(x, *w)

    def fwd(x, *w):
        # a zero-size stand-in carries x's dtype: x itself is not needed by the backward
        return f(x, *w), (w, jnp.zeros((0,), x.dtype))

    def bwd(res, dy):
        w, x_proto = res
        grads = [None] * len(w)
        grads[bias_arg - 1] = bias_grad(dy, w[bias_arg - 1])
        return (dx(dy, *w, x_proto.dtype), *grads)

    f.defvjp(fwd, bwd)
    return f
