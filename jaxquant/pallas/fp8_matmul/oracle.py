"""The fp8 GEMMs' float64 reference and the error bound the kernels are held to.

Both kernels (``triton``, ``mosaic``) compute, for fp8 codes ``a [M, K]``, ``w [N, K]``:

rowwise    ``y[m, n] = (sum_k a[m, k] w[n, k]) * a_scale[m] * w_scale[n]  (+ bias[n])``
           ``a_scale`` ``[M, 1]`` (per token) or ``[1, 1]`` (per tensor), ``w_scale`` ``[N]`` or ``[1]``.
blockwise  ``y[m, n] = sum_kb (sum_{k in kb} a[m, k] w[n, k]) * a_scale[m, kb] * w_scale[n // 128, kb]
           (+ bias[n])``, ``kb`` the 128-wide K blocks (``a_scale [M, ceil(K/128)]``,
           ``w_scale [ceil(N/128), ceil(K/128)]``: DeepSeek-V3's 1 x 128 / 128 x 128 scaling).

``reference`` evaluates this in float64 from the same codes (every product of two fp8 values is
exact in float32 and float64). The kernels cannot equal it bit for bit; they are held to

    |y - ref| <= c * S + eps(out_dtype) * |ref| + tiny(out_dtype),
    S[m, n] = sum_k |a[m, k] w[n, k]| * |scale of (m, n, k)|                    (``magnitude``)

* ``c = TENSOR_CORE_C = 2**-9`` on Hopper's fp8 tensor cores. They add the products of a ``wgmma``
  into the accumulator keeping only about 14 significant bits (DeepSeek-V3 technical report,
  §3.3.2, measured on H800), so the kernels start a fresh accumulator every 128 of K and add it
  into a float32 register sum (with the step's scales, blockwise). Measured on an H100 (jax 0.11.2,
  the Mosaic GPU kernel, float32 outputs): one 128-K chunk's error reaches 1.01 x ``2**-10`` of
  its own ``S`` (median 0.82 x) on codes spread over ``2**-10 .. 2**8`` (0.23 x on normally
  distributed codes). That shows where one chunk dominates ``S`` (blockwise scales that differ by
  up to ``2**14`` between chunks); over many chunks of similar weight the errors partly cancel
  (rowwise: at most 0.40 x). ``2**-9`` keeps a factor of 2 over the worst measured. The float32
  sum over chunks and the float32 epilogue add ``(K / 128 + 3) * 2**-24 * S``, under
  ``2**-16 * S`` for K <= 2**17. (The Triton kernel stayed within 0.005 x ``2**-10``: Triton's
  fp8 dot promotes its partial sums more often.) ``tools/fp8_gpu_check.py`` checks the bound.
* ``c = FLOAT32_C = 2**-16`` where the dot is float32 arithmetic (Pallas interpret mode on the
  CPU): at most 127 roundings of 2**-24 within a 128-K chunk, then the chunk sums and epilogue as
  above.
* ``eps(out_dtype)``: the final cast (float32 ``2**-22``, covering the epilogue's products;
  bfloat16 ``2**-8``; float16 ``2**-10``); ``tiny``: the output's smallest subnormal step (float16
  results below ``2**-14`` lose absolute precision, not relative).

NaN: a NaN code or scale makes the outputs it reaches NaN (the bound is checked where the
reference is finite, and NaN positions must agree).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "TENSOR_CORE_C", "FLOAT32_C", "reference", "magnitude", "error_bound", "check"]

BLOCK = 128  # the blockwise format's K block (activations 1 x 128, weights 128 x 128)
TENSOR_CORE_C = 2.0**-9
FLOAT32_C = 2.0**-16
_EPS = {"float32": 2.0**-22, "bfloat16": 2.0**-8, "float16": 2.0**-10}
_TINY = {"float32": 2.0**-149, "bfloat16": 2.0**-133, "float16": 2.0**-24}


def _f64(x):
    return np.asarray(x).astype(np.float64)


def _combine(a, w, a_scale, w_scale, layout: str, absolute: bool):
    """float64 ``[M, N]``: the scaled sum of products (of their magnitudes with ``absolute``)."""
    f = np.abs if absolute else (lambda v: v)
    a64, w64 = f(_f64(a)), f(_f64(w))
    sa, sw = f(_f64(a_scale)), f(_f64(w_scale))
    m, k = a64.shape
    n = w64.shape[0]
    if layout == "rowwise":
        with np.errstate(invalid="ignore", over="ignore"):
            return (a64 @ w64.T) * np.reshape(sa, (-1, 1)) * np.reshape(sw, (1, -1))
    if layout != "blockwise":
        raise ValueError(f"layout: expected 'rowwise' or 'blockwise', got {layout!r}")
    sw_cols = np.repeat(sw, BLOCK, axis=0)[:n]  # [N, K blocks]: each column's block row
    y = np.zeros((m, n))
    with np.errstate(invalid="ignore", over="ignore"):
        for kb in range(-(-k // BLOCK)):
            blk = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
            y += (a64[:, blk] @ w64[:, blk].T) * sa[:, kb:kb + 1] * sw_cols[:, kb][None, :]
    return y


def reference(a, w, a_scale, w_scale, bias=None, *, layout: str = "rowwise"):
    """float64 ``[M, N]``: the exact GEMM of the codes with their scales (module docstring)."""
    y = _combine(a, w, a_scale, w_scale, layout, absolute=False)
    if bias is not None:
        y = y + np.reshape(_f64(bias), (1, -1))
    return y


def magnitude(a, w, a_scale, w_scale, *, layout: str = "rowwise"):
    """float64 ``S [M, N]``: ``sum_k |a w| * |scale|`` (the scale of the accumulation error)."""
    return _combine(a, w, a_scale, w_scale, layout, absolute=True)


def error_bound(ref, mag, out_dtype, c: float = TENSOR_CORE_C):
    """The largest ``|y - ref|`` allowed (module docstring), elementwise."""
    name = np.dtype(out_dtype).name
    return c * mag + _EPS[name] * np.abs(ref) + _TINY[name]


def check(y, a, w, a_scale, w_scale, bias=None, *, layout: str = "rowwise", c: float = TENSOR_CORE_C, rows=None):
    """Compare a kernel's ``y`` with the reference; returns ``(ok, worst ratio |err| / bound, message)``.

    ``rows``: compare only these rows (a sample of a large problem). NaN positions must agree.
    """
    y = np.asarray(y)
    out_dtype = y.dtype
    if rows is not None:
        a, y = np.asarray(a)[rows], y[rows]
        if np.size(a_scale) > 1 and np.shape(a_scale)[0] > 1:
            a_scale = np.asarray(a_scale)[rows]
    ref = reference(a, w, a_scale, w_scale, bias, layout=layout)
    mag = magnitude(a, w, a_scale, w_scale, layout=layout)
    y64 = y.astype(np.float64)
    nan_ref, nan_y = np.isnan(ref), np.isnan(y64)
    if (nan_ref != nan_y).any():
        return False, np.inf, f"NaN positions differ at {int((nan_ref != nan_y).sum())} of {y.size} outputs"
    fin = ~nan_ref
    err = np.abs(y64[fin] - ref[fin])
    bound = error_bound(ref[fin], mag[fin], out_dtype, c)
    ratio = float(np.max(err / bound)) if err.size else 0.0
    return ratio <= 1.0, ratio, f"max |y - ref| / bound = {ratio:.3g} over {err.size} outputs"
