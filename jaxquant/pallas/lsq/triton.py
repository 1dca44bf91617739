"""The LSQ backward kernel (Pallas Triton): dx and per-tile partial sums of dscale / dzero_point.

Operands in the canonical view of ``jaxquant.granularity``: ``dy``, ``x`` ``[B, R, C]``; ``scale``
and the rounded zero point (integer-valued float, or None) ``[PB, PR, PC]``, each ``P*`` 1 or full.
A program handles one ``(b, row-block, col-block)`` tile; per element it evaluates the formulas of
``jaxquant.primitives.lsq.reference`` (same operation order: each term is bit-identical to the reference on
the portable numerics of ``jaxquant.pallas.common``), writes ``dx`` and reduces the dscale / dzp
terms over the tile's *shared* axes (rows when ``PR == 1``, columns when ``PC == 1``), writing
partials of shape ``[B, R or n_row_blocks, C or n_col_blocks]``. A small XLA sum over the
non-channel axes (``lsq_backward``) finishes the reduction. Ragged edges: masked loads/stores;
out-of-range elements contribute 0 to the partials.
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

from jaxquant.pallas.common import TileConfig, kernel_out, next_pow2, param_mask, plus_zero, recip, rne, view_masks

__all__ = ["Config", "heuristics", "lsq_backward"]


@dataclasses.dataclass(frozen=True)
class Config(TileConfig):
    """Tile of one program: ``block_rows x block_cols`` elements (powers of two)."""

    FAMILY: ClassVar[str] = "lsq"


# Two inputs and up to three outputs per element: a smaller tile than the affine family's 8192
# (untuned; a GPU sweep is still to do).
_TARGET_ELEMS = 4096


def heuristics(shape3, param_full, *, target_elems: int = _TARGET_ELEMS) -> Config:
    """Pure function: the tile for a ``[B, R, C]`` view."""
    del param_full
    _, r, c = shape3
    bc = min(next_pow2(c), target_elems)
    br = min(next_pow2(r), max(1, target_elems // bc))
    elems = br * bc
    num_warps = 8 if elems >= 2048 else 4 if elems >= 1024 else 2 if elems >= 256 else 1
    return Config(block_rows=br, block_cols=bc, num_warps=num_warps)


def _kernel(*refs, has_zp, qmin, qmax, gf, ct, dx_dtype, shape3, block, masks, pfull, fast):
    dy_ref, x_ref, s_ref = refs[:3]
    z_ref = refs[3] if has_zp else None
    outs = refs[4:] if has_zp else refs[3:]
    dx_ref, ds_ref = outs[0], outs[1]
    dz_ref = outs[2] if has_zp else None
    rmask, cmask, mask = view_masks(shape3, block, masks)
    _, pr_full, pc_full = pfull

    def load(ref, m, other):
        return ref[...] if m is None else pltriton.load(ref, mask=m, other=other)

    pmask = param_mask(rmask, cmask, pfull)
    s = load(s_ref, pmask, 1).astype(ct)
    z = load(z_ref, pmask, 0).astype(ct) if has_zp else jnp.zeros((), ct)
    dy = load(dy_ref, mask, 0).astype(ct)
    x = load(x_ref, mask, 0).astype(ct)
    g = jnp.asarray(gf, ct)
    zero = jnp.zeros((), ct)

    inv = recip(s)
    v = rne(x * inv + z, fast)
    m = (v >= qmin) & (v <= qmax)
    below = v < qmin
    above = v > qmax
    dx = jnp.where(m, dy, dy * zero)
    xfq = plus_zero(v - z) * s
    ds_in = ((dy * (xfq - x)) * inv) * g
    ds_lo = (dy * (jnp.asarray(qmin, ct) - z)) * g
    ds_hi = (dy * (jnp.asarray(qmax, ct) - z)) * g
    ds = jnp.where(below, ds_lo, jnp.where(above, ds_hi, ds_in))
    dz = jnp.where(below | above, ((-dy) * s) * g, zero) if has_zp else None

    def partial(t):
        if mask is not None:
            t = jnp.where(mask, t, zero)
        if not pr_full:
            t = jnp.sum(t, axis=0, keepdims=True)
        if not pc_full:
            t = jnp.sum(t, axis=1, keepdims=True)
        return t

    def store(ref, t, m):
        if m is None:
            ref[...] = t
        else:
            pltriton.store(ref, t, mask=m)

    store(dx_ref, dx.astype(dx_dtype), mask)
    # The partial blocks keep a row (column) index only along full dims: mask those edges.
    pm = param_mask(rmask, cmask, pfull)
    store(ds_ref, partial(ds), pm)
    if has_zp:
        store(dz_ref, partial(dz), pm)


def lsq_backward(dy, x, scale, zero_point=None, *, qmin, qmax, grad_factor=1.0, view, config: Config | None = None,
                 interpret: bool = False):
    """``(dx [B,R,C], dscale [PB,PR,PC], dzp [PB,PR,PC] or None)`` (float32 sums) on the canonical view.

    ``zero_point`` is the rounded zero point as an integer-valued float array (or None for 0).
    """
    shape3 = tuple(view.x_shape3)
    pfull = tuple(view.param_full)
    b, r, c = shape3
    ct = np.dtype(np.float32)
    dx_dtype = np.dtype(x.dtype)
    has_zp = zero_point is not None
    pshape3 = tuple(view.param_shape3)
    if math.prod(shape3) == 0:
        zeros = jnp.zeros(pshape3, ct)
        return jnp.zeros(shape3, dx_dtype), zeros, (zeros if has_zp else None)
    cfg = config or heuristics(shape3, pfull)
    br = min(cfg.block_rows, next_pow2(r))
    bc = min(cfg.block_cols, next_pow2(c))
    n_rb, n_cb = pl.cdiv(r, br), pl.cdiv(c, bc)
    grid = (b, n_rb, n_cb)
    _, pr_full, pc_full = pfull
    pb_full = pfull[0]

    main_spec = pl.BlockSpec((None, br, bc), lambda bi, i, j: (bi, i, j))
    p_spec = pl.BlockSpec((None, br if pr_full else 1, bc if pc_full else 1),
                          lambda bi, i, j: (bi if pb_full else 0, i if pr_full else 0, j if pc_full else 0))
    part_shape = (b, r if pr_full else n_rb, c if pc_full else n_cb)
    part_spec = pl.BlockSpec((None, br if pr_full else 1, bc if pc_full else 1), lambda bi, i, j: (bi, i, j))
    operands = [dy, x, scale] + ([zero_point] if has_zp else [])
    in_specs = [main_spec, main_spec, p_spec] + ([p_spec] if has_zp else [])
    out_shape = [kernel_out(shape3, dx_dtype), kernel_out(part_shape, ct)]
    out_specs = [main_spec, part_spec]
    if has_zp:
        out_shape.append(kernel_out(part_shape, ct))
        out_specs.append(part_spec)
    kernel = functools.partial(
        _kernel, has_zp=has_zp, qmin=qmin, qmax=qmax, gf=float(grad_factor), ct=ct, dx_dtype=dx_dtype,
        shape3=shape3, block=(br, bc), masks=(r % br != 0, c % bc != 0), pfull=pfull, fast=not interpret)
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=grid,
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxquant_lsq_backward",
    )(*operands)
    # The small XLA reduction over the shared (non-channel) axes.
    axes = tuple(i for i, full in enumerate(pfull) if not full)

    def finish(p):
        return jnp.sum(p, axis=axes, keepdims=True) if axes else p

    dx = outs[0]
    return dx, finish(outs[1]), (finish(outs[2]) if has_zp else None)
