"""The affine kernel family (Pallas Triton): quantize, dequantize, fake-quantize and their STEs.

One kernel body serves every op, granularity and dtype through the canonical view of
``jaxquant.granularity``: the main operands are ``[B, R, C]``, the scale and zero point
``[PB, PR, PC]`` with each ``P*`` either 1 (shared) or full (one value per index). A program
handles one ``(b, row-block, col-block)`` tile of ``block_rows x block_cols`` elements.

Forward math (float32; float64 for float64 inputs), ``inv = 1 / scale`` computed in-kernel::

    quantize:                q  = clamp(rne(x * inv) + zp, qmin, qmax)          (NaN -> qmin)
    dequantize:              x^ = (q - zp) * scale
    fake_quantize:           y  = (clamp(rne(x * inv) + zp, qmin, qmax) - zp) * scale
Backward math (straight-through estimator, mask recomputed in-kernel from x)::

    m = qmin <= rne(x * inv) + zp <= qmax
    fake_quantize_backward:  dx = dy * m
    quantize_backward:       dx = (dy * inv) * m

fp8 codes (``fp8`` = ``float8_e4m3fn`` / ``float8_e5m2``, ``fmax`` = 448 / 57344; no zero point)::

    quantize:                q  = cast_rne(clamp(x * inv, -fmax, fmax))         (NaN stays NaN)
    dequantize:              x^ = f32(q) * scale
    fake_quantize:           y  = f32(cast_rne(clamp(x * inv, -fmax, fmax))) * scale
    m = |x * inv| <= fmax;   the backward ops as above with this mask

Ragged edges are masked (loads and stores), never padded. 1-byte arrays of more than 2**31
elements are processed in chunks of at most 2**31 elements: Pallas Triton addresses an array
with 32-bit offsets unless it is larger than 2**32 *bytes*, so an int8 array between 2**31 and
2**32 elements would overflow (see ``_MAX_I32_OFFSET``).
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

from jaxquant.core.numerics import fp8_clamp, fp8_max, is_fp8
from jaxquant.granularity import CanonicalView
from jaxquant.pallas.common import (TileConfig, kernel_out, next_pow2, param_mask, plus_zero, recip, rne, to_code,
                                    view_masks)

__all__ = ["OPS", "Config", "heuristics", "affine"]

OPS = ("quantize", "dequantize", "fake_quantize", "fake_quantize_backward", "quantize_backward")

# Largest element offset a 32-bit signed Triton offset can hold.
_MAX_I32_OFFSET = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Config(TileConfig):
    """Tile of one program: ``block_rows x block_cols`` elements (powers of two)."""

    FAMILY: ClassVar[str] = "affine"


# Tiles tuned on an H200 (jax 0.11.2) with `python -m jaxquant.bench --sweep`; results in
# benchmarks/results/. On [65536, 8192] bf16 every tile of 2048-8192 elements with rows of >= 1024
# columns was within 3% (0.53-0.55 ms, ~95% of copy) for per-token, per-group and per-tensor
# fake-quantize; quantize (int8 out) needs the 8192-element tiles (0.389 ms vs 0.458 at 16 x 128).
# Parameters along columns (per-channel on the last axis) get 1 / scale precomputed per column
# (_reciprocal), so they take the same whole-row tiles: 1 x 8192 was the fastest tile for the
# per-channel forward (0.532 ms) and STE backward (0.757 ms) in the sweep.
_TARGET_ELEMS = 8192


_MIN_DIVISOR_COLS = 512


def heuristics(shape3, param_full, *, target_elems: int = _TARGET_ELEMS) -> Config:
    """Pure function: the tile for a ``[B, R, C]`` view and its parameter pattern.

    With row or shared parameters, tile widths divide the row when a power of two >= 512 does
    (14336 = 7 x 2048: no masked tail; per-token quantize at [16384, 14336] went from 90% to 96%
    of copy), else the next power of two (masked). Column parameters keep whole-row 8192-wide
    tiles (4 x 2048 tiles took per-channel fake_quantize at 14336 from 91% to 85% of copy)."""
    _, r, c = shape3
    _, _, pc_full = param_full
    divisor = c & -c if c > 0 else 1  # largest power of two dividing c
    if not pc_full and _MIN_DIVISOR_COLS <= divisor < c:
        bc = min(divisor, target_elems)
    else:
        bc = min(next_pow2(c), target_elems)
    br = min(next_pow2(r), max(1, target_elems // bc))
    elems = br * bc
    num_warps = 8 if elems >= 2048 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return Config(block_rows=br, block_cols=bc, num_warps=num_warps, num_stages=1)


def _fp8_body(op, mains, s, inv, ct, fp8):
    """The fp8 ops on loaded values (module docstring); ``inv`` is None for dequantize."""
    if op == "dequantize":
        return mains[0].astype(ct) * s
    fmax = fp8_max(fp8)
    v = mains[-1].astype(ct) * inv
    if op == "quantize":
        return fp8_clamp(v, fmax)  # the caller's cast to fp8 rounds half to even
    if op == "fake_quantize":
        return fp8_clamp(v, fmax).astype(fp8).astype(ct) * s
    m = jnp.abs(v) <= jnp.asarray(fmax, ct)  # False for NaN and +-Inf
    dy = mains[0].astype(ct)
    if op == "quantize_backward":
        dy = dy * inv
    return jnp.where(m, dy, dy * jnp.asarray(0, ct))


def _kernel(*refs, op, has_zp, has_inv, n_main, qmin, qmax, ct, out_dtype, shape3, block, offs, masks, pfull, fast,
            fp8=None):
    main_refs = refs[:n_main]
    s_ref = refs[n_main]
    z_ref = refs[n_main + 1] if has_zp else None
    inv_ref = refs[n_main + 1 + has_zp] if has_inv else None
    o_ref = refs[-1]
    rmask, cmask, mask = view_masks(shape3, block, masks, offs)

    def load(ref, m, other):
        if m is None:
            return ref[...]
        if is_fp8(ref.dtype):  # jax 0.11.2's Triton lowering has no int -> fp8 cast for the fill value
            other = float(other)
        return pltriton.load(ref, mask=m, other=other)

    pmask = param_mask(rmask, cmask, pfull)
    s = load(s_ref, pmask, 1).astype(ct)
    z = load(z_ref, pmask, 0).astype(ct) if has_zp else jnp.zeros((), ct)
    mains = [load(ref, mask, 0) for ref in main_refs]

    if fp8 is not None:
        inv = None
        if op != "dequantize":
            inv = load(inv_ref, pmask, 1).astype(ct) if has_inv else recip(s, fast)
        out = _fp8_body(op, mains, s, inv, ct, fp8)
    elif op == "dequantize":
        out = plus_zero(mains[0].astype(ct) - z) * s
    else:
        xs = mains[-1].astype(ct)
        inv = load(inv_ref, pmask, 1).astype(ct) if has_inv else recip(s, fast)
        v = rne(xs * inv, fast) + z
        if op == "quantize":
            out = to_code(v, qmin, qmax, fast)
        elif op == "fake_quantize":
            out = plus_zero(to_code(v, qmin, qmax, fast) - z) * s
        else:
            m = (v >= qmin) & (v <= qmax)
            dy = mains[0].astype(ct)
            if op == "quantize_backward":
                dy = dy * inv
            out = jnp.where(m, dy, dy * jnp.asarray(0, ct))  # == dy * m, keeping -0.0 and NaN
    out = out.astype(out_dtype)
    if mask is None:
        o_ref[...] = out
    else:
        pltriton.store(o_ref, out, mask=mask)


def _out_dtype(op, main_dtypes, out_dtype):
    if op in ("quantize", "dequantize"):
        return np.dtype(out_dtype)
    return np.dtype(main_dtypes[-1])  # x's dtype


def _compute_dtype(op, mains, out_dtype):
    """float64 arithmetic for float64 data (x, or dequantize's output), float32 otherwise."""
    data = out_dtype if op == "dequantize" else mains[-1].dtype
    return np.dtype(np.float64) if np.dtype(data) == np.float64 else np.dtype(np.float32)


def affine(op, *mains, scale, zero_point=None, qmin=0, qmax=0, out_dtype=None,
           view=None, config: Config | None = None, interpret: bool = False, fp8=None):
    """Run one op of the family on operands in the canonical view.

    ``fp8``: None for integer codes (``qmin``, ``qmax``, ``zero_point``), or the fp8 format of the
    codes (``zero_point`` must be None; ``qmin`` / ``qmax`` are ignored).

    ``mains``: ``(x,)`` for quantize / fake_quantize, ``(q,)`` for dequantize, ``(dy, x)`` for
    the backward ops, each of shape ``view.x_shape3``; ``scale`` (float) and ``zero_point``
    (int, or None for 0) of shape ``view.param_shape3``. Returns the ``[B, R, C]`` result.
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    shape3 = tuple(view.x_shape3)
    pfull = tuple(view.param_full)
    out_dtype = _out_dtype(op, [m.dtype for m in mains], out_dtype)
    ct = _compute_dtype(op, mains, out_dtype)
    cfg = config or heuristics(shape3, pfull)
    b, r, c = shape3
    br = min(cfg.block_rows, next_pow2(r))
    bc = min(cfg.block_cols, next_pow2(c))
    if math.prod(shape3) == 0:
        return jnp.zeros(shape3, out_dtype)

    # Chunking for 1-byte arrays whose element offsets would overflow int32 (module doc).
    one_byte = any(np.dtype(m.dtype).itemsize == 1 for m in mains) or out_dtype.itemsize == 1
    if one_byte and math.prod(shape3) - 1 > _MAX_I32_OFFSET:
        return _chunked(op, mains, scale, zero_point, qmin, qmax, out_dtype, ct, view, cfg, br, bc, interpret, fp8)

    return _call(op, mains, scale, zero_point, qmin, qmax, out_dtype, ct, shape3, pfull, cfg, br, bc,
                 interpret, row_range=None, fp8=fp8)


def _call(op, mains, scale, zero_point, qmin, qmax, out_dtype, ct, shape3, pfull, cfg, br, bc, interpret,
          row_range, fp8=None):
    """One pallas_call; ``row_range=(start_block, n_blocks, out_rows)`` restricts it to rows."""
    b, r, c = shape3
    pb_full, pr_full, pc_full = pfull
    n_row_blocks = pl.cdiv(r, br)
    row_off = 0
    out_rows = r
    if row_range is not None:
        row_off, n_row_blocks, out_rows = row_range
    grid = (b, n_row_blocks, pl.cdiv(c, bc))
    masks = (r % br != 0, c % bc != 0)

    def main_map(bi, i, j):
        return (bi, i + row_off, j)

    def param_map(bi, i, j):
        return (bi if pb_full else 0, i + row_off if pr_full else 0, j if pc_full else 0)

    def out_map(bi, i, j):
        return (bi, i, j)

    main_spec = pl.BlockSpec((None, br, bc), main_map)
    p_spec = pl.BlockSpec((None, br if pr_full else 1, bc if pc_full else 1), param_map)
    has_zp = zero_point is not None
    # Parameters along columns: 1/scale once per column (see _reciprocal), not once per tile.
    has_inv = bool(pc_full) and op != "dequantize"
    operands = list(mains) + [scale] + ([zero_point] if has_zp else [])
    if has_inv:
        operands.append(_reciprocal(scale, interpret))
    in_specs = [main_spec] * len(mains) + [p_spec] * (1 + has_zp + has_inv)
    kernel = functools.partial(
        _kernel, op=op, has_zp=has_zp, has_inv=has_inv, n_main=len(mains), qmin=qmin, qmax=qmax, ct=ct,
        out_dtype=out_dtype, shape3=shape3, block=(br, bc), offs=(row_off, 0), masks=masks, pfull=pfull,
        fast=not interpret, fp8=None if fp8 is None else np.dtype(fp8))
    return pl.pallas_call(
        kernel,
        out_shape=kernel_out((b, out_rows, c), out_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, br, bc), out_map),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"jaxquant_{op}",
    )(*operands)


def _recip_kernel(s_ref, o_ref, *, n, block, fast):
    if n % block:
        cols = pl.program_id(0) * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
        m = cols < n
        pltriton.store(o_ref, recip(pltriton.load(s_ref, mask=m, other=1), fast), mask=m)
    else:
        o_ref[...] = recip(s_ref[...], fast)


def _reciprocal(scale, interpret):
    """The correctly rounded ``1 / scale`` of a (small) parameter array, as its own tiny kernel.

    Per-column parameters would otherwise cost one ``rcp.rn`` (a multi-instruction sequence) per
    column of every tile: a 1 x 8192 tile then ran at 66% of copy on the H200. XLA's own ``1 / s``
    is not correctly rounded on the GPU, hence a kernel."""
    shape = scale.shape
    flat = jnp.reshape(scale, (1, -1))
    n = flat.shape[1]
    block = min(next_pow2(n), 4096)
    out = pl.pallas_call(
        functools.partial(_recip_kernel, n=n, block=block, fast=not interpret),
        out_shape=kernel_out(flat.shape, flat.dtype),
        grid=(pl.cdiv(n, block),),
        in_specs=[pl.BlockSpec((1, block), lambda j: (0, j))],
        out_specs=pl.BlockSpec((1, block), lambda j: (0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="jaxquant_reciprocal",
    )(flat)
    return jnp.reshape(out, shape)


def _chunked(op, mains, scale, zero_point, qmin, qmax, out_dtype, ct, view, cfg, br, bc, interpret, fp8=None):
    """Split along rows (R) into pieces of < 2**31 elements.

    Inputs wider than 1 byte are not copied: each chunk's pallas_call reads them at a row-block
    offset. 1-byte inputs (dequantize's codes) are sliced, which XLA materialises.
    """
    b, r, c = view.x_shape3
    pfull = view.param_full
    if b * c - 1 > _MAX_I32_OFFSET:
        if pfull == (False, False, False):
            # Shared parameters: any 2-d re-view of x is valid; make it row-rich.
            n = b * r * c
            c2 = next(k for k in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1) if n % k == 0)
            view2 = CanonicalView((1, n // c2, c2), (False, False, False), None)
            mains2 = [jnp.reshape(m, view2.x_shape3) for m in mains]
            out = affine(op, *mains2, scale=scale, zero_point=zero_point, qmin=qmin, qmax=qmax,
                         out_dtype=out_dtype, view=view2, config=None, interpret=interpret, fp8=fp8)
            return jnp.reshape(out, (b, r, c))
        raise NotImplementedError(
            f"jaxquant: the Pallas Triton backend cannot split the [B, R, C] = {view.x_shape3} view of a "
            "1-byte array of more than 2**31 elements into row chunks of < 2**31 elements")
    # A chunk holds whole row tiles; shrink the tile if one would not fit.
    while br > 1 and b * br * c - 1 > _MAX_I32_OFFSET:
        br //= 2
    blocks_per_chunk = max(1, _MAX_I32_OFFSET // (b * br * c))
    n_blocks = pl.cdiv(r, br)
    slice_inputs = any(np.dtype(m.dtype).itemsize == 1 for m in mains)
    outs = []
    for start in range(0, n_blocks, blocks_per_chunk):
        nb = min(blocks_per_chunk, n_blocks - start)
        r0, r1 = start * br, min(r, (start + nb) * br)
        if slice_inputs:
            cm = [m[:, r0:r1, :] for m in mains]
            cs = scale[:, r0:r1, :] if pfull[1] else scale
            cz = zero_point if (zero_point is None or not pfull[1]) else zero_point[:, r0:r1, :]
            outs.append(_call(op, cm, cs, cz, qmin, qmax, out_dtype, ct, (b, r1 - r0, c), pfull, cfg, br, bc,
                              interpret, row_range=None, fp8=fp8))
        else:
            outs.append(_call(op, mains, scale, zero_point, qmin, qmax, out_dtype, ct, (b, r, c), pfull, cfg,
                              br, bc, interpret, row_range=(start, nb, r1 - r0), fp8=fp8))
    return jnp.concatenate(outs, axis=1)
