"""Plain-jnp reference of the W8A8 ops (``quantized_linear``, ``int8_matmul``).

Forward math of ``quantized_linear`` (float32; ``x [..., K]`` viewed as ``[M, K]``)::

    dynamic (act_scale=None), per token:  s[m] = max(max_k |x[m, k]| * f32(1/127), 2**-126)
    static  (act_scale=s):                s[m] = s
    q[m, k]   = clamp(rne(x[m, k] * (1 / s[m])), -128, 127)                 (NaN -> -128)
    acc[m, n] = sum_k int32(q[m, k]) * int32(codes[n, k])                     (exact int32)
    y[m, n]   = (f32(acc[m, n]) * s[m]) * w_scale[n]  (+ f32(bias[n]))  ->  out_dtype

The activation rule is ``jaxquant.dynamic_quantize(x)`` / ``jaxquant.quantize(x, s, PerTensor())``
exactly; the weight is ``jaxquant.quantize_weight(w, bits=8)`` (symmetric, one scale per output
channel). The epilogue rounds each product before the bias add (``core.numerics.int8_epilogue``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.core.numerics import int8_epilogue
from jaxquant.primitives.affine.reference import quantize_bf
from jaxquant.primitives.dynamic.reference import dynamic_quantize_rows

__all__ = ["QMIN", "QMAX", "int8_matmul_reference", "quantize_activation_reference", "linear_reference"]

QMIN, QMAX = -128, 127
_DN = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]


def int8_matmul_reference(a2, w, a_scale2=None, w_scale=None, bias=None, *, out_dtype):
    """``a2 [M, K]`` int8, ``w [N, K]`` int8, ``a_scale2 [M, 1]`` / ``[1, 1]`` -> ``[M, N]``."""
    # int32 operands: exact by construction on every backend. (XLA:CPU's int8 x int8 -> int32 dot
    # in jax 0.11.2 returned twice the true accumulator on the GPU machine's CPU backend, while
    # XLA:GPU, the kernels and numpy agreed; int32 operands avoid that path.)
    acc = jax.lax.dot_general(a2.astype(jnp.int32), w.astype(jnp.int32), _DN, preferred_element_type=jnp.int32)
    return int8_epilogue(acc, a_scale2, w_scale, bias, out_dtype)


def quantize_activation_reference(x2, act_scale=None):
    """The activation codes and scale of ``quantized_linear``: ``(q [M, K] int8, s [M, 1] or [1, 1])``."""
    if act_scale is None:
        q, s, _ = dynamic_quantize_rows(x2, qmin=QMIN, qmax=QMAX, symmetric=True, dtype=jnp.int8)
        return q, s
    s = jnp.reshape(act_scale, (1, 1)).astype(jnp.float32)
    return quantize_bf(x2, s, None, qmin=QMIN, qmax=QMAX, dtype=jnp.int8), s


def linear_reference(x2, codes, w_scale, bias=None, act_scale=None, *, out_dtype):
    """Plain-jnp ``quantized_linear`` on ``x2 [M, K]``: quantize, int8 dot (int32), epilogue."""
    q, s = quantize_activation_reference(x2, act_scale)
    return int8_matmul_reference(q, codes, s, w_scale, bias, out_dtype=out_dtype)
