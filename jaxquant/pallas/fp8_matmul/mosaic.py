"""The fp8 prefill GEMM on Hopper (Pallas Mosaic GPU): ``y = epilogue(A_fp8 @ W_fp8^T)``.

The math of ``jaxquant.pallas.fp8_matmul.triton`` (both scale layouts; the float64 reference and
the error bound are ``jaxquant.pallas.fp8_matmul.oracle``'s), on the W8A8 GEMM's skeleton
(``jaxquant.pallas.mosaic_common``):

* warp-specialised and persistent: a memory warpgroup TMA-copies, per 128-wide step of K, the
  activation tile ``[tile_m, 128]`` and the weight tile ``[2 tile_n, 128]`` (both K-major, 128-byte
  swizzled: the ``[N, K]`` weight is already the layout fp8 ``wgmma`` wants) into a
  ``stages``-deep shared-memory ring, plus, blockwise, the step's scales; one CTA per SM walks the
  output tiles in a planar snake; two compute warpgroups each own ``tile_m x tile_n`` outputs;
* promotion every 128 of K: each step runs ``wgmma`` (e4m3 x e4m3, or e5m2 x e5m2 -> float32) into
  a FRESH accumulator, ``part_m`` rows of the tile at a time, and adds it into a float32 carry in
  registers (Hopper's fp8 tensor cores keep ~14 bits while they accumulate; the carry is exact
  float32 arithmetic) — the weight-only kernel's group-wise pattern. While one warpgroup adds,
  the other's ``wgmma`` runs. Blockwise, the addition is ``carry += part * (a_scale[m, kb] *
  w_scale[nb, kb])``: the weight block's scale is one number for a warpgroup's columns
  (``64 <= tile_n <= 128``), so the factor is a row vector and the update one FMA an element;
* epilogue in registers: rowwise ``(carry * a_scale[m]) * w_scale[n]``, then ``+ bias[n]``
  (blockwise: ``carry + bias``), cast, and ``[part_m, epi_n]`` TMA stores through shared memory.
  Mosaic GPU may contract the last product and the bias add into one FMA: one rounding fewer than
  the Triton kernel's epilogue, within the oracle's bound (this kernel is not bit-exact with the
  Triton one in any case: the accumulation order differs).

Registers: a compute thread holds ``tile_n * (tile_m + part_m) / 128`` float32 accumulator
registers (carry + fresh partial), at most ``ACC_REGS`` = 192 of its 232 (the memory warpgroup
keeps 40): the default 128 x 128 warpgroup tile takes its partial sums 64 rows at a time.

Scope (``supports`` / ``scope``): M a multiple of ``tile_m``, N of ``2 tile_n``, K of 128 (TMA tiles
are not masked), the accumulators within ``ACC_REGS``, blockwise ``64 <= tile_n <= 128``. Blockwise scales
travel transposed: ``a_scale^T [K/128, M]`` (a step's row of the CTA's rows is contiguous) and the
weight scales ``[K/128, N/128]`` with each entry repeated ``WS_WINDOW / (2 tile_n / 128)`` times (a
CTA's window of a step is then 128 bytes, the alignment of a TMA copy's shared-memory destination);
XLA builds both (a few MB at 8192^2).

No interpret mode (Mosaic GPU's interpreter does not run ``plgpu.load``): results are checked on
the GPU (``tools/fp8_gpu_check.py``), the CUDA lowering on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxquant.pallas.common import check_fields, check_pow2, kernel_out
from jaxquant.pallas.fp8_matmul.triton import LAYOUTS, validate
from jaxquant.core.device import NUM_SMS
from jaxquant.pallas.mosaic_common import (SMEM_BUDGET, persistent_kernel, pipeline_allocations, store_tiles,
                                         tile_loop, warp_specialized_pipeline)

__all__ = ["Config", "heuristics", "supports", "scope", "enough_tiles", "fit_stages", "fp8_matmul_mgpu", "TILE_K",
           "ACC_REGS", "MIN_TILES", "DISPATCH_MIN_TILES", "worth_it", "WS_WINDOW"]

TILE_K = 128  # K of a pipeline step: one 128-byte swizzled row of fp8, and the promotion interval
ACC_REGS = 192  # float32 accumulator registers a compute thread may hold (carry + fresh partial)
# Blockwise weight scales: a CTA's window of a step is WS_WINDOW float32 = 128 bytes, each scale
# repeated to fill it. The ring's stages lie back to back in shared memory and a TMA copy's
# shared-memory destination must be 128-byte aligned: an 8-float (32-byte) window faulted with
# CUDA_ERROR_MISALIGNED_ADDRESS on an H100 from the second stage on.
WS_WINDOW = 32
MIN_TILES = 100  # heuristics: fewer 128 x 256 CTA tiles than this and it takes 128 x 128 ones
# Dispatch: the Mosaic kernel runs a problem whose (heuristic) CTA tiles number at least this. At
# M = 128 on an H100 (jax 0.11.2) it beat the Triton kernel at 64 CTA tiles (128 x 8192 x 8192:
# 0.034 / 0.040 ms rowwise / blockwise against 0.046 / 0.062) and lost at 32 (128 x 4096 x 14336:
# 0.049 / 0.065 against 0.042 / 0.053).
DISPATCH_MIN_TILES = 64


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile of one compute warpgroup (``tile_m x tile_n``; the CTA computes ``tile_m x 2 tile_n``)."""

    tile_m: int = 128
    tile_n: int = 128
    # rows of the fresh partial accumulator a wgmma fills (None: tile_m), so that carry + partial
    # fit the registers: 128 x 128 tiles need 64.
    part_m: int | None = 64
    stages: int = 4
    epi_n: int = 32
    grid_tile_width: int = 8
    minor_n: bool = True  # the snake walks N fastest

    def __post_init__(self):
        # wgmma: 64-row warpgroup tiles, N a multiple of 8 up to 256
        check_fields("fp8_matmul_mgpu", self, pow2=(("tile_m", 64), ("tile_n", 16), ("epi_n", 8)),
                     positive=("grid_tile_width", ("stages", 2)))
        if self.tile_n > 256:
            raise ValueError(f"fp8_matmul_mgpu Config.tile_n: expected <= 256 (wgmma's N), got {self.tile_n}")
        if self.part_m is not None:
            check_pow2("fp8_matmul_mgpu", "part_m", self.part_m, 64)
            if self.part_m > self.tile_m:
                raise ValueError(f"fp8_matmul_mgpu Config.part_m: expected a divisor of tile_m={self.tile_m}, "
                                 f"got {self.part_m}")

    def cta_shape(self):
        return self.tile_m, 2 * self.tile_n

    def part_rows(self) -> int:
        return self.part_m or self.tile_m

    def acc_regs(self) -> int:
        """float32 accumulator registers a compute thread holds (carry + one fresh partial)."""
        return self.tile_n * (self.tile_m + self.part_rows()) // 128

    def tag(self) -> str:
        """Compact form for tables: ``mgpu:TMxTN/pPART/stSTAGES``."""
        return f"mgpu:{self.tile_m}x{self.tile_n}/p{self.part_rows()}/st{self.stages}"


def _cta_tiles(m: int, n: int, cfg: Config) -> int:
    cm, cn = cfg.cta_shape()
    return (m // cm) * (n // cn)


def enough_tiles(m: int, n: int, cfg: Config) -> bool:
    """Whether ``cfg``'s CTA tiles of an ``[m, n]`` output number at least ``MIN_TILES``."""
    return _cta_tiles(m, n, cfg) >= MIN_TILES


def worth_it(m: int, n: int, cfg: Config) -> bool:
    """Whether the Mosaic kernel with ``cfg`` beats the Triton kernel on an ``[m, n]`` output:
    at least ``DISPATCH_MIN_TILES`` CTA tiles."""
    return _cta_tiles(m, n, cfg) >= DISPATCH_MIN_TILES


def heuristics(m: int, n: int, k: int, *, layout: str = "rowwise") -> Config:
    """Pure function of the problem: 128 x 256 CTA tiles (two 128 x 128 warpgroup tiles, partial
    sums 64 rows at a time) when they number at least ``MIN_TILES``, else 128 x 128 (two 128 x 64,
    whole-tile partials). Not yet tuned on a GPU: the W8A8 kernel's measured tiles."""
    del k, layout
    wide = Config()
    return wide if enough_tiles(m, n, wide) else Config(tile_n=64, part_m=None)


def scope(cfg: Config, layout: str = "rowwise") -> str:
    """What ``supports`` asks of a problem with tile ``cfg``, in words (for error messages)."""
    cm, cn = cfg.cta_shape()
    extra = f", 64 <= tile_n <= 128 (got {cfg.tile_n})" if layout == "blockwise" else ""
    return (f"M a multiple of {cm}, N a multiple of {cn}, K a multiple of {TILE_K}, at most {ACC_REGS} "
            f"accumulator registers (tile_n x (tile_m + part_m) / 128 = {cfg.acc_regs()}){extra}")


def supports(m: int, n: int, k: int, *, layout: str = "rowwise", config: Config | None = None) -> bool:
    """Whether this kernel handles the problem with tile ``config`` (see ``scope``)."""
    cfg = config or heuristics(m, n, k, layout=layout)
    cm, cn = cfg.cta_shape()
    return (layout in LAYOUTS and m > 0 and n > 0 and k > 0 and m % cm == 0 and n % cn == 0 and k % TILE_K == 0
            and cfg.acc_regs() <= ACC_REGS and (layout == "rowwise" or 64 <= cfg.tile_n <= 128))


def fit_stages(cfg: Config, layout: str, out_dtype) -> int:
    """``cfg.stages``, lowered until the ring and the epilogue buffers fit in shared memory (>= 2)."""
    cm, cn = cfg.cta_shape()
    ring = (cm + cn) * TILE_K  # fp8 bytes a stage
    if layout == "blockwise":
        ring += (cm + WS_WINDOW) * 4
    epilogue = 2 * 2 * cfg.part_rows() * min(cfg.epi_n, cfg.tile_n) * jnp.dtype(out_dtype).itemsize
    return max(2, min(cfg.stages, (SMEM_BUDGET - epilogue) // ring))


def fp8_matmul_mgpu(a, w, a_scale, w_scale, bias=None, *, layout: str = "rowwise", out_dtype=jnp.bfloat16,
                    config: Config | None = None, num_sms: int = NUM_SMS):
    """``y [M, N]``, the fp8 GEMM with ``layout`` scales (operands as
    ``jaxquant.pallas.fp8_matmul.triton.fp8_matmul``); the problem must satisfy ``supports``."""
    import jax.experimental.pallas.mosaic_gpu as plgpu  # GPU backend: imported where it is used

    validate(a, w, a_scale, w_scale, bias, layout, out_dtype)
    out_dtype = jnp.dtype(out_dtype)
    m, k = a.shape
    n = w.shape[0]
    cfg = config or heuristics(m, n, k, layout=layout)
    if not supports(m, n, k, layout=layout, config=cfg):
        raise ValueError(f"fp8_matmul_mgpu: expected {scope(cfg, layout)}, got M={m}, N={n}, K={k} "
                         f"({layout}, config {cfg})")
    blockwise = layout == "blockwise"
    rep = WS_WINDOW // (cfg.cta_shape()[1] // 128)  # copies of a weight block's scale (blockwise)
    has_bias = bias is not None
    tm, tn = cfg.tile_m, cfg.tile_n
    pm = cfg.part_rows()
    n_parts = tm // pm
    cm, cn = cfg.cta_shape()
    m_iters, n_iters, k_iters = m // cm, n // cn, k // TILE_K
    epi_n = min(cfg.epi_n, tn)
    out_bytes = out_dtype.itemsize
    stages = fit_stages(cfg, layout, out_dtype)

    swizzle = plgpu.find_swizzle(TILE_K * 8)  # fp8: 128 bytes a row
    in_t = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    out_swz = plgpu.find_swizzle(epi_n * out_bytes * 8)
    out_t = (plgpu.TilingTransform((8, out_swz // out_bytes)), plgpu.SwizzleTransform(out_swz))

    specs = [plgpu.BlockSpec((cm, TILE_K), lambda kk: (0, kk), transforms=in_t),
             plgpu.BlockSpec((cn, TILE_K), lambda kk: (0, kk), transforms=in_t)]
    if blockwise:  # the step's row of the transposed scales (the CTA's window of it)
        specs += [plgpu.BlockSpec((1, cm), lambda kk: (kk, 0)),
                  plgpu.BlockSpec((1, WS_WINDOW), lambda kk: (kk, 0))]
    pipeline = warp_specialized_pipeline(specs, k_iters, stages)
    # per-tile vectors fetched once a tile for the epilogue: rowwise scales, bias
    n_copies = (0 if blockwise else 2) + int(has_bias)

    def body(a_gmem, w_gmem, as_gmem, ws_gmem, *rest):
        b_gmem = rest[0] if has_bias else None
        o_gmem = rest[-1]
        piped = [a_gmem, w_gmem] + ([as_gmem, ws_gmem] if blockwise else [])

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline_allocations(pipeline, *piped),
            o_smem=plgpu.SMEM((2, 2, pm, epi_n), out_dtype, transforms=out_t),
            v_smem=plgpu.SMEM((2, 3, max(tm, tn)), jnp.float32),  # [wg, a_scale / w_scale / bias, ...]
            bar=plgpu.Barrier(num_barriers=2, num_arrivals=max(1, n_copies)),
            collective_axes="wg",
        )
        def scope_(allocs, o_smem, v_smem, bar):
            wg = lax.axis_index("wg")

            @tile_loop(m_iters, n_iters, minor=1 if cfg.minor_n else 0, grid_tile_width=cfg.grid_tile_width)
            def tile(mi, ni):
                rows = pl.ds(mi * cm, cm)
                wg_cols = pl.ds(ni * cn + wg * tn, tn)

                def rows_vec(ref, p):  # [pm] of a per-row vector, broadcast along the columns
                    v = plgpu.load(ref.at[pl.ds(p * pm, pm)], (), layout=plgpu.Layout.WGMMA.reduce(1))
                    return lax.broadcast_in_dim(v, (pm, tn), (0,))

                def cols_vec(ref):  # [tn] of a per-column vector, broadcast along the rows
                    v = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
                    return lax.broadcast_in_dim(v, (pm, tn), (1,))

                def finish(carry):
                    if n_copies:
                        plgpu.barrier_wait(bar.at[wg])
                    for p, y in enumerate(carry):
                        if not blockwise:
                            y = y * rows_vec(v_smem.at[wg, 0], p)
                            y = y * cols_vec(v_smem.at[wg, 1, pl.ds(0, tn)])
                        if has_bias:
                            y = y + cols_vec(v_smem.at[wg, 2, pl.ds(0, tn)])
                        store_tiles(y.astype(out_dtype), o_smem, wg,
                                    lambda e, p=p: o_gmem.at[pl.ds(mi * cm + p * pm, pm),
                                                             pl.ds(ni * cn + wg * tn + e * epi_n, epi_n)], epi_n)

                def ctx(run):
                    # the epilogue's vectors, fetched while the main loop runs
                    if not blockwise:
                        plgpu.copy_gmem_to_smem(as_gmem.at[rows], v_smem.at[wg, 0, pl.ds(0, tm)], bar.at[wg])
                        plgpu.copy_gmem_to_smem(ws_gmem.at[wg_cols], v_smem.at[wg, 1, pl.ds(0, tn)], bar.at[wg])
                    if has_bias:
                        plgpu.copy_gmem_to_smem(b_gmem.at[wg_cols], v_smem.at[wg, 2, pl.ds(0, tn)], bar.at[wg])
                    zero = plgpu.layout_cast(jnp.full((pm, tn), 0, jnp.float32), plgpu.Layout.WGMMA)
                    finish(run((zero,) * n_parts))

                def step(_, a_smem, w_smem, *refs):
                    carry = refs[-1]
                    w_view = plgpu.transpose_ref(w_smem.at[pl.ds(wg * tn, tn)], (1, 0))  # [128, tn], K-major
                    if blockwise:
                        sa_smem, sw_smem = refs[0], refs[1]
                        # one weight block covers this warpgroup's columns (tile_n <= 128)
                        sw = sw_smem[0, (wg * tn) // 128 * rep]
                    total = []
                    for p in range(n_parts):
                        a_view = a_smem if n_parts == 1 else a_smem.at[pl.ds(p * pm, pm)]

                        def fresh(acc_ref, a_view=a_view):
                            plgpu.wgmma(acc_ref, a_view, w_view)
                            return acc_ref[...]

                        part = pl.run_scoped(fresh, plgpu.ACC((pm, tn), jnp.float32))
                        if blockwise:
                            s = plgpu.load(sa_smem.at[0, pl.ds(p * pm, pm)], (),
                                           layout=plgpu.Layout.WGMMA.reduce(1)) * sw
                            part = part * lax.broadcast_in_dim(s, (pm, tn), (0,))
                        total.append(carry[p] + part)
                    return tuple(total)

                views = [a_gmem.at[rows, :], w_gmem.at[pl.ds(ni * cn, cn), :]]
                if blockwise:
                    views += [as_gmem.at[:, rows], ws_gmem.at[:, pl.ds(ni * WS_WINDOW, WS_WINDOW)]]
                pipeline(step, ctx)(*views, allocations=allocs)

    f = persistent_kernel(body, out_type=kernel_out((m, n), out_dtype),
                          kernel_name=f"jaxquant_fp8_gemm_{layout}_mgpu", num_sms=num_sms)
    if blockwise:
        as_op = a_scale.T  # [K/128, M]
        ws_op = jnp.repeat(w_scale.T, rep, axis=1)  # [K/128, N/128 * rep]: WS_WINDOW floats a CTA
    else:
        as_op = jnp.broadcast_to(jnp.reshape(a_scale, (-1,)), (m,))
        ws_op = jnp.broadcast_to(jnp.reshape(w_scale, (-1,)), (n,))
    operands = [a, w, as_op, ws_op] + ([bias.astype(jnp.float32)] if has_bias else [])
    return f(*operands)
