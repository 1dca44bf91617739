"""Fused dynamic quantization of rows (Pallas Triton): statistics, scale and codes in one pass.

``x`` is viewed as ``[R, D]`` (per token: a row is a token; per group: a row is one group).
A program owns ``block_rows`` whole rows. Math (float32; docs/numerics.md, ``reference.py``)::

    symmetric:   amax = max|x|;  scale = max(amax * f32(1/qmax), 2**-126);  zp = 0
    asymmetric:  lo = min(min x, 0); hi = max(max x, 0)
                 scale = max((hi - lo) * f32(1/(qmax - qmin)), 2**-126)
                 zp = clamp(qmin - rne(lo * (1 / scale)), qmin, qmax)
    q = clamp(rne(x * (1/scale)) + zp, qmin, qmax)
fp8 codes (``out_dtype`` ``float8_e4m3fn`` / ``float8_e5m2``; symmetric, ``qmax`` = fmax = 448 /
57344 so the scale is ``max(amax * f32(1/fmax), 2**-126)``)::

    q = cast_rne(clamp(x * (1/scale), -fmax, fmax))          (NaN stays NaN)

A row containing NaN gets scale NaN (and zp = qmin when asymmetric); NaN propagation is made
explicit with a per-row NaN flag, because Triton's max/min reductions may drop NaNs.

Rows of up to ``block_cols`` elements are read once and kept in registers: one read of x, one
write of q. Longer rows loop over column chunks twice (statistics, then codes); the second read
mostly hits L2. The op is not differentiable (integer codes); no backward kernel.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import functools
import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.core.numerics import fp8_clamp, is_fp8
from jaxquant.pallas.common import (TileConfig, abs_max_bits, bits_to_float, finite_or_zero, kernel_out, next_pow2,
                                    recip, rne, to_code)

__all__ = ["Config", "heuristics", "dynamic_quantize_rows"]

TINY = float(np.finfo(np.float32).tiny)
_MAX_I32_OFFSET = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Config(TileConfig):
    """``block_rows`` rows per program, processed ``block_cols`` columns at a time."""

    num_warps: int = 8
    FAMILY: ClassVar[str] = "dynamic"


# Tuned on an H200 (benchmarks/results/): whole rows up to 16384 columns stay in registers.
_MAX_COLS = 16384
_TARGET_ELEMS = 8192


def heuristics(rows: int, cols: int) -> Config:
    """Pure function: the tile for ``[rows, cols]``."""
    bc = min(next_pow2(cols), _MAX_COLS)
    br = min(next_pow2(rows), max(1, _TARGET_ELEMS // bc))
    elems = br * bc
    num_warps = 8 if elems >= 4096 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    if elems >= 16384:
        num_warps = 16
    return Config(block_rows=br, block_cols=bc, num_warps=num_warps, num_stages=1)


def _kernel(x_ref, q_ref, s_ref, *z_refs, rows, cols, br, bc, nchunks, row_off, symmetric, qmin, qmax, ct,
            out_dtype, fast):
    i = pl.program_id(0) + row_off
    rmask = None
    if rows % br:
        rmask = (i * br + jax.lax.broadcasted_iota(jnp.int32, (br, 1), 0)) < rows
    ragged_cols = cols % bc != 0

    def mask_for(k):
        m = rmask
        if ragged_cols:
            cm = (k * bc + jax.lax.broadcasted_iota(jnp.int32, (1, bc), 1)) < cols
            m = cm if m is None else (m & cm)
        return m

    def load(k):
        m = mask_for(k)
        ref = x_ref if nchunks == 1 else x_ref.at[:, pl.ds(k * bc, bc)]
        if m is None:
            return ref[...].astype(ct)
        return pltriton.load(ref, mask=m, other=0).astype(ct)

    def store(k, val):
        m = mask_for(k)
        ref = q_ref if nchunks == 1 else q_ref.at[:, pl.ds(k * bc, bc)]
        if m is None:
            ref[...] = val
        else:
            pltriton.store(ref, val, mask=m)

    zero = jnp.asarray(0, ct)
    one = jnp.asarray(1, ct)

    int_amax = symmetric and ct == np.float32

    def stats(x):
        x = finite_or_zero(x)  # the statistics ignore infinities
        if int_amax:  # one NaN-propagating integer reduction (common.abs_max_bits)
            return (abs_max_bits(x),)
        nan = jnp.max(jnp.where(x != x, one, zero), axis=1, keepdims=True)
        if symmetric:
            return nan, jnp.max(jnp.abs(x), axis=1, keepdims=True)
        return nan, jnp.min(x, axis=1, keepdims=True), jnp.max(x, axis=1, keepdims=True)

    def combine(a, b):
        if int_amax:  # integer max of bit patterns: NaN-propagating
            return (jnp.maximum(a[0], b[0]),)
        if symmetric:
            return jnp.maximum(a[0], b[0]), jnp.maximum(a[1], b[1])
        return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1]), jnp.maximum(a[2], b[2])

    x0 = load(0)
    acc = stats(x0)
    if nchunks > 1:
        acc = jax.lax.fori_loop(1, nchunks, lambda k, a: combine(a, stats(load(k))), acc)
    tiny = jnp.asarray(TINY, ct)
    nan_v = jnp.asarray(np.nan, ct)
    if int_amax:
        t = bits_to_float(acc[0]) * jnp.asarray(np.asarray(1 / qmax, ct), ct)
        scale = jnp.where(t < tiny, tiny, t)  # NaN stays NaN
        inv = recip(scale, fast)
        zp = jnp.zeros_like(scale)
    elif symmetric:
        nan = acc[0] > zero
        t = acc[1] * jnp.asarray(np.asarray(1 / qmax, ct), ct)
        scale = jnp.where(nan, nan_v, jnp.where(t < tiny, tiny, t))
        inv = recip(scale, fast)
        zp = jnp.zeros_like(scale)
    else:
        nan = acc[0] > zero
        lo = jnp.where(acc[1] > zero, zero, acc[1])
        hi = jnp.where(acc[2] < zero, zero, acc[2])
        t = (hi - lo) * jnp.asarray(np.asarray(1 / (qmax - qmin), ct), ct)
        scale = jnp.where(nan, nan_v, jnp.where(t < tiny, tiny, t))
        inv = recip(scale, fast)
        zp = to_code(jnp.asarray(qmin, ct) - rne(lo * inv, fast), qmin, qmax, fast)

    def codes(x):
        if is_fp8(out_dtype):  # the cast rounds half to even; the clamp keeps NaN
            return fp8_clamp(x * inv, qmax).astype(out_dtype)
        v = rne(x * inv, fast)
        if not symmetric:
            v = v + zp
        return to_code(v, qmin, qmax, fast).astype(out_dtype)

    store(0, codes(x0))
    if nchunks > 1:
        def body(k, carry):
            store(k, codes(load(k)))
            return carry
        jax.lax.fori_loop(1, nchunks, body, 0)

    def store_param(ref, val):
        if rmask is None:
            ref[...] = val
        else:
            pltriton.store(ref, val, mask=rmask)

    store_param(s_ref, scale.astype(s_ref.dtype))
    if z_refs:
        store_param(z_refs[0], zp.astype(jnp.int32))


def dynamic_quantize_rows(x, *, qmin: int, qmax: int, symmetric: bool, out_dtype, config: Config | None = None,
                          interpret: bool = False):
    """Quantize each row of a 2-d ``x [R, D]``. Returns ``(q [R, D], scale [R, 1], zp [R, 1])``.

    fp8 ``out_dtype``: ``symmetric=True`` with ``qmin, qmax = -fmax, fmax`` (module docstring).

    The scale is float32 (float64 for float64 x); zp is int32 (zeros when symmetric, made
    outside the kernel).
    """
    rows, cols = x.shape
    out_dtype = np.dtype(out_dtype)
    ct = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    if rows == 0 or cols == 0:
        return (jnp.zeros((rows, cols), out_dtype), jnp.full((rows, 1), TINY, ct), jnp.zeros((rows, 1), jnp.int32))
    cfg = config or heuristics(rows, cols)
    br = min(cfg.block_rows, next_pow2(rows))
    bc = min(cfg.block_cols, next_pow2(cols))
    nchunks = pl.cdiv(cols, bc)
    n_blocks = pl.cdiv(rows, br)
    # 1-byte q of more than 2**31 elements: chunk rows (see affine.py's module docstring).
    blocks_per_call = n_blocks
    if out_dtype.itemsize == 1 and rows * cols - 1 > _MAX_I32_OFFSET:
        if cols - 1 > _MAX_I32_OFFSET:
            raise NotImplementedError(f"jaxquant: rows of {cols} 1-byte codes are too long for 32-bit offsets")
        while br > 1 and br * cols - 1 > _MAX_I32_OFFSET:  # a chunk holds whole row tiles
            br //= 2
        n_blocks = pl.cdiv(rows, br)
        blocks_per_call = max(1, _MAX_I32_OFFSET // (br * cols))
    outs = []
    for start in range(0, n_blocks, blocks_per_call):
        nb = min(blocks_per_call, n_blocks - start)
        out_rows = min(rows, (start + nb) * br) - start * br
        outs.append(_call(x, rows, cols, br, bc, nchunks, start, nb, out_rows, symmetric, qmin, qmax, ct,
                          out_dtype, cfg, interpret))
    if len(outs) == 1:
        q, s, *z = outs[0]
    else:
        q = jnp.concatenate([o[0] for o in outs], 0)
        s = jnp.concatenate([o[1] for o in outs], 0)
        z = [jnp.concatenate([o[2] for o in outs], 0)] if not symmetric else []
    zp = z[0] if z else jnp.zeros((rows, 1), jnp.int32)
    return q, s, zp


def _call(x, rows, cols, br, bc, nchunks, row_off, nb, out_rows, symmetric, qmin, qmax, ct, out_dtype, cfg,
          interpret):
    width = bc * nchunks
    kernel = functools.partial(
        _kernel, rows=rows, cols=cols, br=br, bc=bc, nchunks=nchunks, row_off=row_off, symmetric=symmetric,
        qmin=qmin, qmax=qmax, ct=ct, out_dtype=out_dtype, fast=not interpret)
    out_shape = [kernel_out((out_rows, cols), out_dtype), kernel_out((out_rows, 1), ct)]
    out_specs = [pl.BlockSpec((br, width), lambda i: (i, 0)), pl.BlockSpec((br, 1), lambda i: (i, 0))]
    if not symmetric:
        out_shape.append(kernel_out((out_rows, 1), jnp.int32))
        out_specs.append(pl.BlockSpec((br, 1), lambda i: (i, 0)))
    return pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(nb,),
        in_specs=[pl.BlockSpec((br, width), lambda i: (i + row_off, 0))],
        out_specs=tuple(out_specs),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxquant_dynamic_quantize",
    )(x)
