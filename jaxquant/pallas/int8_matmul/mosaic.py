"""W8A8 prefill GEMM on Hopper (Pallas Mosaic GPU): ``y = epilogue(A_int8 @ W_int8^T)``.

The same math as ``jaxquant.pallas.int8_matmul`` (exact int32 accumulator, then the float32
epilogue ``(f32(acc) * a_scale[m]) * w_scale[n]`` cast to ``out_dtype``, in registers), built for
large M where the Triton kernel tops out at ~1250 int8 TOP/s against XLA's 1498 at 8192^3:

* warp-specialised: one warpgroup issues TMA copies of the ``[tile_m, tile_k]`` activation and
  ``[2 * tile_n, tile_k]`` weight tiles into a ``stages``-deep shared-memory ring; two compute
  warpgroups each own a ``[tile_m, tile_n]`` int32 accumulator and run ``wgmma`` (s8 x s8 -> s32,
  both operands K-major: the weight ``[N, K]`` is already the layout the instruction wants);
* persistent: one CTA per SM walks the output tiles in a planar snake (``grid_tile_width`` tiles
  of the minor dimension at a time, so neighbouring CTAs share operand tiles in L2); this
  skeleton (pipeline, tile loop, kernel) is ``jaxquant.pallas.mosaic_common``'s, shared with the
  weight-only kernel;
* epilogue in registers: the accumulator is converted to float32, multiplied by the row scales
  then the column scales (two separate products, as the reference) and cast; tiles of
  ``[tile_m, epi_n]`` go out through shared memory with TMA stores.

Scope: M, N multiples of the CTA tile and K a multiple of ``tile_k`` (TMA tiles are not masked
here), activation scale per row (a per-tensor scale is broadcast to the rows). ``supports`` says
whether a shape qualifies; ``jaxquant.primitives.int8_matmul.primitive.use_mgpu`` picks this kernel on Hopper
GPUs for such shapes (>= ``MIN_TILES`` CTA tiles, M >= 256) when the layer has no bias, and the
Triton kernel otherwise. No bias: a first version added it in this epilogue, and Mosaic GPU
contracted ``(y * w_scale) + bias`` into one FMA (one rounding instead of the reference's two),
up to ~3e5 float32 ulps off under cancellation on an H200; the Triton kernel keeps the two
roundings apart (``mul.rn``) and takes layers with a bias.

Exactness: the accumulator is exact (s8 x s8 -> s32) and the two epilogue products are separate
float32 multiplies, as in the reference: bit-exact (``tests/primitives/test_int8_matmul.py``, H200, every output
dtype, NaN and zero rows, dynamic and static scales).

Measured on an H200 (jax 0.11.2, 2026-11-21), int8 TOP/s of the bare GEMM,
one call each: 2048x4096x14336 1554 (Triton 1373, XLA's int8 dot 1447), 8192x4096x14336 1398
(1305, 1301), 512x8192x8192 1299 (Triton 849). In ``quantized_linear`` (chained layers, with the
activation quantization): 1.8-2.15x XLA's bf16 matmul and 1.2-1.5x the plain-jnp int8 pipeline at
M >= 2048.

There is no interpret mode (jax 0.10.2's Mosaic GPU interpreter does not run this kernel's
``plgpu.load`` of the scales): the kernel's results are tested on the GPU, its dispatch and its
CUDA lowering on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxquant.pallas.common import check_fields, kernel_out
from jaxquant.core.device import NUM_SMS
from jaxquant.pallas.mosaic_common import (SMEM_BUDGET, persistent_kernel, pipeline_allocations, store_tiles,
                                         tile_loop, warp_specialized_pipeline)

__all__ = ["Config", "heuristics", "supports", "enough_tiles", "int8_matmul_mgpu", "NUM_SMS", "MIN_TILES"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile of one compute warpgroup (``tile_m x tile_n``; the CTA computes ``tile_m x 2 tile_n``)."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    epi_n: int = 32
    grid_tile_width: int = 8
    minor_n: bool = True  # the snake walks N fastest

    def __post_init__(self):
        # wgmma: 64-row warpgroup tiles, N a multiple of 8 up to 256, s8 K steps of 32 bytes
        check_fields("int8_matmul_mgpu", self, pow2=(("tile_m", 64), ("tile_n", 16), ("tile_k", 32), ("epi_n", 8)),
                     positive=("grid_tile_width", ("stages", 2)))
        if self.tile_n > 256 or self.tile_k > 128:
            raise ValueError(f"int8_matmul_mgpu Config: expected tile_n <= 256 (wgmma's N) and tile_k <= 128 "
                             f"(one 128-byte swizzled row), got tile_n={self.tile_n}, tile_k={self.tile_k}")

    def cta_shape(self):
        return self.tile_m, 2 * self.tile_n


# Fewer CTA tiles than this and the Triton kernel's smaller tiles keep more of the 132 SMs busy.
MIN_TILES = 100


def heuristics(m: int, n: int, k: int) -> Config:
    """Pure function of the shape: the tile for ``[m, k] @ [n, k]^T``.

    128 x 256 CTA tiles (two 128 x 128 warpgroup tiles) when they number at least ``MIN_TILES``,
    else 128 x 128 (two 128 x 64). Measured on an H200 (jax 0.11.2, 2026-11-21; the bare GEMM on
    int8 codes, int8 TOP/s, Triton's tile in brackets): 512x8192x8192 1299 (849), 1024x4096x4096 1212 (812),
    2048x4096x14336 1554 (1373); with 128 x 128: 512x4096x14336 1149 (1075), 256x8192x8192 839 (691).
    """
    del k
    wide = Config()
    return wide if _cta_tiles(m, n, wide) >= MIN_TILES else Config(tile_n=64)


def _cta_tiles(m: int, n: int, cfg: Config) -> int:
    cm, cn = cfg.cta_shape()
    return (m // cm) * (n // cn)


def enough_tiles(m: int, n: int, cfg: Config) -> bool:
    """Whether ``cfg``'s CTA tiles of an ``[m, n]`` output number at least ``MIN_TILES``, with M >= 256
    (at smaller M the layer streams its weights, where the Triton tiles were measured; this
    kernel was not)."""
    return m >= 256 and _cta_tiles(m, n, cfg) >= MIN_TILES


def supports(m: int, n: int, k: int, *, config: Config | None = None) -> bool:
    """Whether this kernel handles the shape: M, N multiples of the CTA tile, K of ``tile_k``."""
    cfg = config or heuristics(m, n, k)
    cm, cn = cfg.cta_shape()
    return m > 0 and n > 0 and k > 0 and m % cm == 0 and n % cn == 0 and k % cfg.tile_k == 0


def fit_stages(cfg: Config, out_dtype) -> int:
    """``cfg.stages``, lowered until the ring and the epilogue buffers fit in shared memory (>= 2)."""
    cm, cn = cfg.cta_shape()
    ring = (cm + cn) * cfg.tile_k  # int8 bytes a stage
    epilogue = 2 * 2 * cfg.tile_m * min(cfg.epi_n, cfg.tile_n) * jnp.dtype(out_dtype).itemsize
    return max(2, min(cfg.stages, (SMEM_BUDGET - epilogue) // ring))


def int8_matmul_mgpu(a, w, a_scale, w_scale, *, out_dtype, config: Config | None = None, num_sms: int = NUM_SMS):
    """``(f32(a @ w^T) * a_scale[:, None]) * w_scale[None, :]`` -> ``out_dtype``.

    ``a [M, K]`` int8, ``w [N, K]`` int8, ``a_scale`` ``[M]`` / ``[M, 1]`` / ``[1, 1]`` float32,
    ``w_scale [N]`` float32. Shapes must satisfy ``supports``.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu  # GPU backend: imported where it is used

    m, k = a.shape
    n = w.shape[0]
    cfg = config or heuristics(m, n, k)
    if not supports(m, n, k, config=cfg):
        raise ValueError(f"int8_matmul_mgpu: M={m}, N={n}, K={k} must be multiples of the CTA tile "
                         f"{cfg.cta_shape()} and tile_k={cfg.tile_k} (config {cfg})")
    a_scale = jnp.broadcast_to(jnp.reshape(a_scale, (-1,)), (m,)).astype(jnp.float32)
    w_scale = jnp.reshape(w_scale, (n,)).astype(jnp.float32)
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cm, cn = cfg.cta_shape()
    m_iters, n_iters, k_iters = m // cm, n // cn, k // tk
    epi_n = min(cfg.epi_n, tn)
    out_bytes = jnp.dtype(out_dtype).itemsize
    stages = fit_stages(cfg, out_dtype)

    swizzle = plgpu.find_swizzle(tk * 8)  # int8: tk bytes a row
    in_t = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    out_swz = plgpu.find_swizzle(epi_n * out_bytes * 8)
    out_t = (plgpu.TilingTransform((8, out_swz // out_bytes)), plgpu.SwizzleTransform(out_swz))

    pipeline = warp_specialized_pipeline(
        [plgpu.BlockSpec((cm, tk), lambda kk: (0, kk), transforms=in_t),
         plgpu.BlockSpec((cn, tk), lambda kk: (0, kk), transforms=in_t)], k_iters, stages)

    def body(a_gmem, w_gmem, as_gmem, ws_gmem, o_gmem):
        @functools.partial(
            pl.run_scoped,
            allocs=pipeline_allocations(pipeline, a_gmem, w_gmem),
            o_smem=plgpu.SMEM((2, 2, tm, epi_n), out_dtype, transforms=out_t),
            as_smem=plgpu.SMEM((2, tm), jnp.float32),
            ws_smem=plgpu.SMEM((2, tn), jnp.float32),
            bar=plgpu.Barrier(num_barriers=2, num_arrivals=2),
            collective_axes="wg",
        )
        def scope(allocs, o_smem, as_smem, ws_smem, bar):
            wg = lax.axis_index("wg")

            @tile_loop(m_iters, n_iters, minor=1 if cfg.minor_n else 0, grid_tile_width=cfg.grid_tile_width)
            def tile(mi, ni):
                rows = pl.ds(mi * cm, cm)
                cols = pl.ds(ni * cn, cn)
                wg_cols = pl.ds(ni * cn + wg * tn, tn)

                def ctx(run):
                    # the scales of this warpgroup's tile, fetched while the main loop runs
                    plgpu.copy_gmem_to_smem(as_gmem.at[rows], as_smem.at[wg], bar.at[wg])
                    plgpu.copy_gmem_to_smem(ws_gmem.at[wg_cols], ws_smem.at[wg], bar.at[wg])

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.int32))
                    def _(acc_ref):
                        run(acc_ref)
                        acc = acc_ref[...]
                        plgpu.barrier_wait(bar.at[wg])
                        sa = plgpu.load(as_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))
                        sw = plgpu.load(ws_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(0))
                        y = acc.astype(jnp.float32) * lax.broadcast_in_dim(sa, (tm, tn), (0,))
                        y = (y * lax.broadcast_in_dim(sw, (tm, tn), (1,))).astype(out_dtype)
                        store_tiles(y, o_smem, wg,
                                    lambda e: o_gmem.at[rows, pl.ds(ni * cn + wg * tn + e * epi_n, epi_n)], epi_n)

                def step(_, a_smem, w_smem, acc_ref):
                    plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(w_smem.at[pl.ds(wg * tn, tn)], (1, 0)))
                    plgpu.wgmma_wait(0)
                    return acc_ref

                pipeline(step, ctx)(a_gmem.at[rows, :], w_gmem.at[cols, :], allocations=allocs)

    f = persistent_kernel(body, out_type=kernel_out((m, n), out_dtype), kernel_name="jaxquant_w8a8_gemm_mgpu",
                          num_sms=num_sms)
    return f(a, w, a_scale, w_scale)

