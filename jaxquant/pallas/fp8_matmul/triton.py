"""The fp8 GEMM (Pallas Triton): ``y = epilogue(A_fp8 @ W_fp8^T)``, weights ``[N, K]`` contracted on K.

Operands: fp8 codes ``a [M, K]`` and ``w [N, K]`` of one format (``float8_e4m3fn`` or
``float8_e5m2``), float32 scales in one of two layouts (``jaxquant.pallas.fp8_matmul.oracle``
states the math and the error bound against float64):

``"rowwise"``    ``a_scale [M, 1]`` (per token) or ``[1, 1]`` (per tensor), ``w_scale [N]`` or ``[1]``::

                     acc[m, n] = sum_kc f32(dot(a[m, kc], w[n, kc]))        (kc: K chunks of block_k)
                     y = (acc * a_scale[m]) * w_scale[n]  (+ f32(bias[n]))  ->  out_dtype
                 the W8A8 epilogue's order: two float32 products (``mul.rn`` on the GPU, never
                 contracted into an FMA with the bias add), then the bias.
``"blockwise"``  DeepSeek-V3's scaling, ``a_scale [M, ceil(K/128)]`` (1 x 128 groups) and
                 ``w_scale [ceil(N/128), ceil(K/128)]`` (128 x 128 blocks)::

                     acc[m, n] = sum_kc f32(dot(a[m, kc], w[n, kc])) * (a_scale[m, kb] * w_scale[n // 128, kb])
                     y = acc (+ f32(bias[n]))  ->  out_dtype
                 with ``kb = k // 128`` the scale block of chunk ``kc`` (``block_k <= 128``, and
                 ``block_n <= 128`` so a tile's columns share one weight block).

Promotion: each K chunk's dot is a fresh float32 tensor-core result added into the float32
accumulator in registers (Hopper's fp8 ``wgmma`` keeps ~14 bits while it accumulates), so partial
sums reach float32 at least every ``block_k <= 256`` (rowwise) or 128 (blockwise) of K. Triton's
own lowering goes further: Pallas leaves the dot's ``maxNumImpreciseAcc`` at 0, for which Triton
accumulates each fp8 ``wgmma`` instruction (K = 32) in a separate partial and adds it in float32
(``WarpGroupDotOp::needsPartialAccumulator``): more accurate, and extra float32 adds a step.

Tiles (as ``jaxquant.pallas.int8_matmul``): a program computes a ``block_m x block_n`` tile looping
over K in ``block_k`` chunks (the ragged tail chunk masked), programs in the grouped launch order;
ragged M / N edges are masked (never padded). Decode (M <= 16) uses skinny ``16 x 32`` tiles and
splits K (``Config.split_k``): float32 partials ``[split, M, N]`` (rowwise unscaled, blockwise
scaled) summed in XLA before the same epilogue in ``jnp``. At M == 1 a's tile is its one row,
broadcast to the dot's 16 rows in registers (``Config.row_bcast``).

Limits: every operand and the output have fewer than 2**31 elements (``MAX_ELEMENTS``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.pallas.common import GemmTileConfig, fill_gemm_tiles, grid_ij, k_split, mul_rn, next_pow2
from jaxquant.core.device import NUM_SMS

__all__ = ["Config", "heuristics", "effective_split", "fp8_matmul", "validate", "epilogue", "LAYOUTS", "FP8_DTYPES",
           "BLOCK", "MAX_ELEMENTS"]

LAYOUTS = ("rowwise", "blockwise")
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK = 128  # blockwise scale block along K (and N for the weights)
MAX_ELEMENTS = 2**31 - 1
# The fp8 tensor-core instructions contract K in steps of 32 (as int8: 32 bytes).
MIN_BLOCK_K = 32


@dataclasses.dataclass(frozen=True)
class Config(GemmTileConfig):
    """The fp8 GEMM's tile (``common.GemmTileConfig``; float32 partials when K is split); blockwise
    scales need block_n <= 128 and block_k <= 128."""

    FAMILY: ClassVar[str] = "fp8_matmul"

    def __post_init__(self):
        super().__post_init__()
        if self.block_k > 256:
            raise ValueError(f"fp8_matmul Config.block_k: expected <= 256 (the accumulator is promoted to "
                             f"float32 every block_k of K), got {self.block_k}")

    def check_layout(self, layout: str) -> None:
        """Blockwise scales: a tile's columns in one 128-row weight block, a K chunk in one K block."""
        if layout == "blockwise" and (self.block_n > BLOCK or self.block_k > BLOCK):
            raise ValueError(f"fp8_matmul Config: blockwise scales need block_n <= {BLOCK} and block_k <= {BLOCK}, "
                             f"got block_n={self.block_n}, block_k={self.block_k}")


# Starting points by M, not yet tuned on a GPU: the int8 GEMM's measured tiles, with block_k 128
# where blockwise scales need it, and 8 warps (two warpgroups) on 128-row tiles. Why 8: Triton keeps
# a separate partial accumulator for fp8 wgmma (see the module docstring), so a warpgroup holds two
# copies of its tile, three blockwise (the kernel's own fresh chunk result); a 128 x 128 tile on one
# warpgroup would need 256+ float32 registers a thread and spill, on two it takes 128 (192).
# Each entry is (max_m, rowwise, blockwise).
_TABLE = (
    (16, Config(16, 32, 256, group_m=1, num_warps=2, num_stages=3, split_k=8),
     Config(16, 32, 128, group_m=1, num_warps=2, num_stages=4, split_k=8)),
    (256, Config(64, 64, 256, num_warps=4, num_stages=3, split_k=2),
     Config(64, 64, 128, num_warps=4, num_stages=4, split_k=2)),
    (1024, Config(64, 128, 128, num_warps=4, num_stages=4), Config(64, 128, 128, num_warps=4, num_stages=4)),
    (1 << 62, Config(128, 128, 128, group_m=16, num_warps=8, num_stages=4),
     Config(128, 128, 128, group_m=16, num_warps=8, num_stages=4)),
)


def effective_split(split_k: int, k: int, bk: int) -> int:
    """The K split used (``common.k_split``)."""
    return k_split(split_k, k, bk)


def heuristics(m: int, n: int, k: int, *, layout: str = "rowwise") -> Config:
    """Pure function: the tile for an ``[M, K] x [N, K]^T`` fp8 problem with ``layout`` scales.

    The table's entry for M, blocks shrunk to the problem, then (non-decode) tiles shrunk until
    there are at least half as many programs as SMs, and K split for decode tiles until ~8
    programs an SM (larger tiles only while they do not fill the SMs once).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    cfg = next(row[1 + LAYOUTS.index(layout)] for row in _TABLE if m <= row[0])
    bm = max(16, min(cfg.block_m, next_pow2(m)))
    bn = max(16, min(cfg.block_n, next_pow2(n)))
    bk = max(MIN_BLOCK_K, min(cfg.block_k, next_pow2(k)))
    bm, bn, split = fill_gemm_tiles(m, n, bm, bn, cfg.split_k, NUM_SMS)
    return dataclasses.replace(cfg, block_m=bm, block_n=bn, block_k=bk, split_k=effective_split(split, k, bk))


def _kernel(a_ref, as_ref, w_ref, ws_ref, *rest, layout, has_bias, dims, blocks, nmn, group_m, split, row_bcast,
            a_per_row, out_dtype, fast):
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    m_total, n_total, k_total = dims
    bm, bn, bk = blocks
    nm, nn = nmn
    i, j = grid_ij(pl.program_id(0), nm, nn, group_m)
    f32 = jnp.float32
    blockwise = layout == "blockwise"

    rmask = cmask = None
    if m_total % bm:
        rmask = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m_total
    if n_total % bn:
        cmask = (j * bn + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < n_total
    n_run, tail = divmod(k_total, bk)
    k_first = 0
    if split > 1:  # this program's run of K chunks (split divides them: effective_split)
        n_run //= split
        k_first = pl.program_id(1) * n_run

    def and_(x, y):
        return y if x is None else x if y is None else x & y

    def load_tile(ref, kc, row_mask, masked_k):
        kk = pl.multiple_of(kc * bk, bk) if not isinstance(kc, int) else kc * bk
        view = ref.at[:, pl.ds(kk, bk)]
        mask = row_mask
        if masked_k:
            mask = and_(mask, (kk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < k_total)
        # other=0.0: Pallas Triton casts an int fill to fp8 with no rule (a float one has it)
        return view[...] if mask is None else pltriton.load(view, mask=mask, other=0.0)

    a_rows, a_mask = (1, None) if row_bcast else (bm, rmask)
    wmask = None if cmask is None else jnp.reshape(cmask, (bn, 1))

    def step(kc, acc, masked_k):
        a = load_tile(a_ref, kc, a_mask, masked_k)
        if row_bcast:
            a = jnp.broadcast_to(a, (bm, bk))
        w = load_tile(w_ref, kc, wmask, masked_k)
        # a fresh float32 tensor-core result a chunk, added into the float32 accumulator
        part = jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        if not blockwise:
            return acc + part
        kb = kc * bk // BLOCK
        sa = as_ref[:, pl.ds(kb, 1)] if a_mask is None else pltriton.load(
            as_ref.at[:, pl.ds(kb, 1)], mask=a_mask, other=1)
        s = sa.astype(f32) * ws_ref[:, pl.ds(kb, 1)].astype(f32)  # [a_rows, 1] * [1, 1]
        return acc + part * jnp.broadcast_to(s, (bm, 1))

    acc = jnp.zeros((bm, bn), f32)
    if n_run:
        acc = jax.lax.fori_loop(0, n_run, lambda kc, c: step(k_first + kc, c, False), acc)
    if tail:
        acc = step(n_run, acc, True)

    y = acc
    if split == 1:
        if not blockwise:
            # mul_rn: never contracted into an FMA with the bias add (the W8A8 epilogue's order)
            sa = as_ref[...] if not a_per_row or rmask is None else pltriton.load(as_ref, mask=rmask, other=1)
            y = mul_rn(y, jnp.broadcast_to(sa.astype(f32), y.shape), fast)
            ws = ws_ref[...] if cmask is None else pltriton.load(ws_ref, mask=cmask, other=1)
            y = mul_rn(y, jnp.broadcast_to(ws.astype(f32), y.shape), fast)
        if has_bias:
            b = b_ref[...] if cmask is None else pltriton.load(b_ref, mask=cmask, other=0)
            y = y + b.astype(f32)
    out = y.astype(out_dtype)
    omask = and_(rmask, cmask)
    if omask is None:
        o_ref[...] = out
    else:
        pltriton.store(o_ref, out, mask=omask)


def validate(a, w, a_scale, w_scale, bias, layout: str, out_dtype) -> None:
    """Trace-time checks of ``fp8_matmul``'s operands (errors name the argument, expected, actual)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if a.ndim != 2 or w.ndim != 2:
        raise ValueError(f"a, w: expected 2-D [M, K] and [N, K], got shapes {a.shape} and {w.shape}")
    if jnp.dtype(a.dtype) not in FP8_DTYPES or a.dtype != w.dtype:
        raise ValueError(f"a, w: expected fp8 codes of one format (float8_e4m3fn or float8_e5m2), "
                         f"got {a.dtype} and {w.dtype}")
    (m, k), (n, k2) = a.shape, w.shape
    if k != k2:
        raise ValueError(f"w: expected [N, K] with K = {k} (a's), got shape {w.shape}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"out_dtype: expected one of float32, bfloat16, float16, got {jnp.dtype(out_dtype)}")
    if layout == "rowwise":
        ok_a = a_scale.shape in ((m, 1), (1, 1))
        ok_w = w_scale.shape in ((n,), (1,))
        want_a, want_w = f"({m}, 1) or (1, 1)", f"({n},) or (1,)"
    else:
        kb, nb = pl.cdiv(k, BLOCK), pl.cdiv(n, BLOCK)
        ok_a, ok_w = a_scale.shape == (m, kb), w_scale.shape == (nb, kb)
        want_a, want_w = f"({m}, {kb}) = [M, ceil(K/128)]", f"({nb}, {kb}) = [ceil(N/128), ceil(K/128)]"
    if not ok_a:
        raise ValueError(f"a_scale ({layout}): expected shape {want_a}, got {a_scale.shape}")
    if not ok_w:
        raise ValueError(f"w_scale ({layout}): expected shape {want_w}, got {w_scale.shape}")
    for name, s in (("a_scale", a_scale), ("w_scale", w_scale)):
        if s.dtype != jnp.float32:
            raise ValueError(f"{name}: expected float32 scales, got {s.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected shape ({n},), got {bias.shape}")
    for name, size in (("a", m * k), ("w", n * k), ("output", m * n)):
        if size > MAX_ELEMENTS:
            raise NotImplementedError(f"fp8_matmul: {name} has {size} elements; one kernel call handles < 2**31 "
                                      "(split the problem along M or N)")


def epilogue(acc, a_scale, w_scale, bias, layout: str, out_dtype):
    """The kernel's epilogue in ``jnp`` (split-K partials summed in XLA): rowwise
    ``(acc * a_scale) * w_scale (+ bias)``, blockwise ``acc (+ bias)`` (scales already applied)."""
    y = acc
    if layout == "rowwise":
        y = y * a_scale
        y = y * jnp.reshape(w_scale, (1, -1))
    if bias is not None:
        # two roundings, as the kernel's mul.rn + add (XLA must not contract them into one FMA)
        y = jax.lax.optimization_barrier(y) + jnp.reshape(bias, (1, -1)).astype(jnp.float32)
    return y.astype(out_dtype)


def fp8_matmul(a, w, a_scale, w_scale, bias=None, *, layout: str = "rowwise", out_dtype=jnp.bfloat16,
               config: Config | None = None, interpret: bool = False):
    """``y [M, N]`` = the fp8 GEMM of ``a [M, K]`` and ``w [N, K]`` with ``layout`` scales (module docstring).

    Args:
      a, w: fp8 codes (``float8_e4m3fn`` or ``float8_e5m2``, both the same).
      a_scale, w_scale: float32; rowwise ``[M, 1] | [1, 1]`` and ``[N] | [1]``, blockwise
        ``[M, ceil(K/128)]`` and ``[ceil(N/128), ceil(K/128)]``.
      bias: ``[N]`` (any float dtype, added in float32) or None.
      out_dtype: float32, bfloat16 or float16.
      config: tile override; default ``heuristics(M, N, K, layout=layout)``.
    """
    validate(a, w, a_scale, w_scale, bias, layout, out_dtype)
    out_dtype = jnp.dtype(out_dtype)
    m, k = a.shape
    n = w.shape[0]
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    if k == 0:  # an empty sum: acc = 0; blockwise scales then have no column: give them one
        a, w = jnp.zeros((m, 32), a.dtype), jnp.zeros((n, 32), w.dtype)
        if layout == "blockwise":
            a_scale, w_scale = jnp.ones((m, 1), jnp.float32), jnp.ones((pl.cdiv(n, BLOCK), 1), jnp.float32)
        k = 32
    cfg = config or heuristics(m, n, k, layout=layout)
    cfg.check_layout(layout)
    bm = min(cfg.block_m, max(16, next_pow2(m)))
    bn = min(cfg.block_n, max(16, next_pow2(n)))
    bk = min(cfg.block_k, max(MIN_BLOCK_K, next_pow2(k)))
    nm, nn, nk = pl.cdiv(m, bm), pl.cdiv(n, bn), pl.cdiv(k, bk)
    group_m = max(1, min(cfg.group_m, nm))
    split = effective_split(cfg.split_k, k, bk)
    row_bcast = m == 1 and cfg.row_bcast is not False
    blockwise = layout == "blockwise"

    def ij(p):
        return grid_ij(p, nm, nn, group_m)

    width = bk * nk
    a_spec = (pl.BlockSpec((1, width), lambda p, *_: (0, 0)) if row_bcast
              else pl.BlockSpec((bm, width), lambda p, *_: (ij(p)[0], 0)))
    a_per_row = a_scale.shape[0] == m and m > 1
    if blockwise:
        kbs = a_scale.shape[1]
        as_spec = (pl.BlockSpec((1, kbs), lambda p, *_: (0, 0)) if row_bcast
                   else pl.BlockSpec((bm, kbs), lambda p, *_: (ij(p)[0], 0)))
        # the tile's weight-block row (block_n <= 128 divides 128: one block row a tile)
        ws_spec = pl.BlockSpec((1, kbs), lambda p, *_: (ij(p)[1] * bn // BLOCK, 0))
        ws = w_scale
    else:
        as_spec = (pl.BlockSpec((bm, 1), lambda p, *_: (ij(p)[0], 0)) if a_per_row
                   else pl.BlockSpec((1, 1), lambda p, *_: (0, 0)))
        ws = jnp.broadcast_to(jnp.reshape(w_scale, (1, -1)), (1, n))
        ws_spec = pl.BlockSpec((1, bn), lambda p, *_: (0, ij(p)[1]))
    operands = [a, a_scale, w, ws]
    in_specs = [a_spec, as_spec, pl.BlockSpec((bn, width), lambda p, *_: (ij(p)[1], 0)), ws_spec]
    kernel_bias = bias if split == 1 else None
    if kernel_bias is not None:
        operands.append(jnp.reshape(bias, (1, n)))
        in_specs.append(pl.BlockSpec((1, bn), lambda p, *_: (0, ij(p)[1])))
    kernel_dtype = out_dtype if split == 1 else jnp.dtype(jnp.float32)
    kernel = functools.partial(
        _kernel, layout=layout, has_bias=kernel_bias is not None, dims=(m, n, k), blocks=(bm, bn, bk), nmn=(nm, nn),
        group_m=group_m, split=split, row_bcast=row_bcast, a_per_row=a_per_row, out_dtype=kernel_dtype,
        fast=not interpret)
    if split > 1:
        out_shape = jax.ShapeDtypeStruct((split, m, n), kernel_dtype)
        out_spec = pl.BlockSpec((None, bm, bn), lambda p, s: (s, *ij(p)))
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), kernel_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda p: ij(p))
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(nm * nn, split) if split > 1 else (nm * nn,),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"jaxquant_fp8_matmul_{layout}",
    )(*operands)
    if split == 1:
        return y
    return epilogue(jnp.sum(y, axis=0), a_scale, w_scale, bias, layout, out_dtype)
