"""Plain-jnp reference of the fp8 GEMM: the specification, the CPU lowering and the test oracle.

For fp8 codes ``a [M, K]`` and ``w [N, K]`` (one format), float32 scales and an optional bias,
in float32 arithmetic with the sum over K promoted every ``BLOCK`` = 128 of K (the kernels'
structure: a fresh partial sum a 128-chunk, added into a float32 accumulator)::

    part[c]  = sum_{k in chunk c} f32(a[m, k]) * f32(w[n, k])          (a float32 dot, HIGHEST)
    rowwise    acc = sum_c part[c];       y = (acc * a_scale[m]) * w_scale[n]   (+ f32(bias[n]))
    blockwise  acc = sum_c part[c] * (a_scale[m, c] * w_scale[n // 128, c]);   y = acc (+ f32(bias[n]))

``a_scale`` is ``[M, 1]`` (per token) or ``[1, 1]`` (per tensor) and ``w_scale`` ``[N]`` or ``[1]``
(rowwise); ``[M, ceil(K/128)]`` and ``[ceil(N/128), ceil(K/128)]`` (blockwise: 1 x 128 activation
groups, 128 x 128 weight blocks). The product is rounded before the bias add (two roundings, as the
kernels). Equivalently: the GEMM of the dequantized codes, summed 128 of K at a time.

Bound of the kernels against this reference (``bound``): with ``S = sum_k |a w| * |scales|``,

    |y_kernel - y_ref| <= (c + 2**-16) * S + 2 * eps(out_dtype) * |y_ref| + 2 * tiny(out_dtype)

``c = 2**-9`` for Hopper's fp8 tensor cores (they keep ~14 bits while they accumulate a 128-K
chunk: ``jaxquant.pallas.fp8_matmul.oracle`` gives the measurements), ``c = 2**-16`` for float32 dots (Pallas interpret mode); ``2**-16 * S`` is this
reference's own float32 rounding; ``eps`` the output's rounding (float32 ``2**-22`` covering the
epilogue's products, bfloat16 ``2**-8``, float16 ``2**-10``) and ``tiny`` its smallest step. NaN
codes or scales make the outputs they reach NaN.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant.core.numerics import rounded
from jaxquant.pallas.fp8_matmul.oracle import BLOCK, FLOAT32_C, TENSOR_CORE_C

__all__ = ["BLOCK", "TENSOR_CORE_C", "FLOAT32_C", "fp8_matmul_reference", "epilogue", "bound"]

_EPS = {"float32": 2.0**-22, "bfloat16": 2.0**-8, "float16": 2.0**-10}
_TINY = {"float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}


def _chunks(x, k_pad):
    """``[R, K]`` -> ``[K_pad / 128, R, 128]`` (zero padding adds exact zeros to the sums)."""
    r, k = x.shape
    x = jnp.pad(x, ((0, 0), (0, k_pad - k)))
    return jnp.transpose(jnp.reshape(x, (r, k_pad // BLOCK, BLOCK)), (1, 0, 2))


def fp8_matmul_reference(a, w, a_scale, w_scale, bias=None, *, layout: str, out_dtype):
    """``y [M, N]`` (module docstring) for 2-d ``a [M, K]``, ``w [N, K]``."""
    m, k = a.shape
    n = w.shape[0]
    nk = max(1, -(-k // BLOCK))
    ac = _chunks(a.astype(jnp.float32), nk * BLOCK)
    wc = _chunks(w.astype(jnp.float32), nk * BLOCK)
    f32 = jnp.float32
    if layout == "blockwise":
        sa = jnp.transpose(jnp.pad(a_scale.astype(f32), ((0, 0), (0, nk - a_scale.shape[1])), constant_values=1))
        sw = jnp.repeat(w_scale.astype(f32), BLOCK, axis=0)[:n]  # [N, K blocks]: each column's block row
        sw = jnp.transpose(jnp.pad(sw, ((0, 0), (0, nk - sw.shape[1])), constant_values=1))
    else:
        sa = sw = jnp.zeros((nk, 1), f32)  # unused

    def step(acc, xs):
        a_c, w_c, sa_c, sw_c = xs
        part = jax.lax.dot_general(a_c, w_c, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=f32)
        if layout == "blockwise":
            part = part * (sa_c[:, None] * sw_c[None, :])
        return acc + part, None

    acc, _ = jax.lax.scan(step, jnp.zeros((m, n), f32), (ac, wc, sa, sw))
    return epilogue(acc, a_scale, w_scale, bias, layout=layout, out_dtype=out_dtype)


def epilogue(acc, a_scale, w_scale, bias, *, layout: str, out_dtype):
    """``y`` from the float32 sum ``acc [M, N]`` (module docstring): rowwise ``(acc * a_scale) *
    w_scale``, blockwise ``acc`` (its scales are inside the sum); then ``+ f32(bias)`` after the
    product is rounded, and the cast. A K-sharded GEMM applies it to the summed partials."""
    f32 = jnp.float32
    y = acc
    if layout == "rowwise":
        y = y * jnp.reshape(a_scale, (-1, 1)).astype(f32)
        y = y * jnp.reshape(w_scale, (1, -1)).astype(f32)
    if bias is not None:
        y = rounded(y) + jnp.reshape(bias, (1, -1)).astype(f32)
    return y.astype(out_dtype)


def bound(y_ref, magnitude, out_dtype, c: float = TENSOR_CORE_C):
    """The largest ``|y_kernel - y_ref|`` allowed (module docstring), elementwise (numpy float64)."""
    name = np.dtype(out_dtype).name
    return (c + FLOAT32_C) * np.asarray(magnitude) + 2 * _EPS[name] * np.abs(np.asarray(y_ref, np.float64)) \
        + 2 * _TINY[name]
