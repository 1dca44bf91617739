"""Weight-only dequant-matmul for prefill on Hopper (Pallas Mosaic GPU): ``y = x @ dequant(W)^T``.

The math of ``jaxquant.pallas.weight_only`` (the Triton kernel, which serves every other case),
for bfloat16 x and large M, where the Triton kernel reached only 0.42-0.48x XLA's bfloat16 matmul
on an H200 (its per-group float32 partial sums serialise Triton's wgmma pipeline)::

    group-wise:   y[m, n] = sum_groups  s[n, grp] * sum_{k in grp} x[m, k] * (q[n, k] - z[n, grp])
    per-channel:  y[m, n] = s[n] * sum_k x[m, k] * (q[n, k] - z[n])
    y = (y + bias[n]) cast to bfloat16

``q - z`` is an integer with ``|q - z| <= 255``, exact in bfloat16, so each product with x is exact
in float32 and the tensor-core dot differs from the reference (dequantize to float32, float32
dot) only by float32 summation order: the bound of ``tests/primitives/test_weight_only.py`` holds unchanged.

Structure (the skeleton of ``jaxquant.pallas.int8_matmul.mosaic``, in ``mgpu_common``): persistent
(one CTA per SM walks the output tiles in a planar snake) and warp-specialised: a memory
warpgroup TMA-copies, per 128-wide step of K, the ``[2 tile_n, 128]`` tile of codes, x's
``[tile_m, 128]`` tile and the step's scales (and zero points) into a ``stages``-deep
shared-memory ring; two compute warpgroups each own ``tile_n`` rows of W and compute the
TRANSPOSED tile ``y^T [tile_n, tile_m]``:

* the codes go shared memory -> registers and are converted there to bfloat16 ``q - z``:
  4-bit codes are viewed as ``int4 [N, K]`` (XLA's int4 packing puts the even element in the low
  nibble: the byte layout of ``jaxquant.core.weights``, so the view is a bitcast) and Mosaic GPU
  converts int4 -> bfloat16 two values an instruction (``prmt`` + ``lop3`` + one packed
  subtract); asymmetric 4-bit codes ``u in 0..15`` are first mapped to ``u - 8`` (each nibble's
  top bit flipped, one XLA pass over the codes) and their zero points to ``z - 8``, which leaves
  ``q - z`` unchanged; 8-bit codes convert directly;
* ``wgmma`` takes them as its A operand from registers and x's tile (transposed view of the
  K-major shared-memory tile) as B, accumulating in float32;
* group-wise: each group's partial sum is a fresh accumulator (``part_m`` of the ``tile_m`` x
  rows at a time, one wgmma each), multiplied by its row's scale and added to a float32 carry in
  registers (the other warpgroup's wgmma runs meanwhile); per channel: one accumulator over all
  of K, scaled once;
* epilogue: (scale,) bias, cast, and ``[tile_n, epi_m]`` TMA stores of ``y^T``; XLA transposes
  ``y^T [N, M]`` to ``y`` (~3% of the time at M = 2048 on 8192^2).

Measured on an H200 (jax 0.11.2, 2026-11-21). Bare kernel, 2048 x 8192 x
8192: int4 g128 550 TFLOP/s (Triton 335), int4 per channel 720 with 64 x 256 tiles, int8 per
channel 597 with 128 x 128. In ``weight_only_linear``, chained layers vs XLA's bf16 matmul: int4
g128 0.72-0.85x at M = 512..8192 with 64 x 128 tiles (Triton: 0.40-0.50x), 0.94-0.98x at M = 128
on N >= 8192; per channel int4 / int8 0.95-1.06x at M = 128..2048. Group-wise 64 x 256 tiles
(``Config.part_m = 128``: each group's partial sum covers half of the tile's x rows
at a time, so carry + partial take 192 accumulator registers, not 256), launched 16 tiles wide:
int4 g128 0.91-0.96x at M = 2048 / 8192 on 8192^2 and 4096x14336, 0.88x on 14336x4096
(``python -m jaxquant.bench --sections weight_only``).

Scope (``supports``): bfloat16 x, bits 4 or 8, per channel or groups of 64 / 128 / 256, symmetric
or not, N a multiple of the CTA's ``2 tile_n`` rows, K of 128. M is padded to ``tile_m`` (zero
rows; their outputs are dropped). ``jaxquant.primitives.weight_only`` picks this kernel on Hopper
GPUs at M >= ``MIN_M`` when its tiles fill the GPU (``enough_tiles``), the Triton kernel
otherwise. No interpret mode (Mosaic GPU's interpreter does not run ``plgpu.load``): results are
tested on the GPU, dispatch and CUDA lowering on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxquant.pallas.common import check_fields, check_pow2, kernel_out
from jaxquant.core.device import NUM_SMS
from jaxquant.pallas.mosaic_common import (SMEM_BUDGET, persistent_kernel, pipeline_allocations, store_tiles,
                                         tile_loop, warp_specialized_pipeline)

__all__ = ["Config", "heuristics", "supports", "scope", "enough_tiles", "fit_stages", "weight_only_matmul_mgpu", "GROUPS",
           "TILE_K", "MIN_M", "MIN_TILES"]

TILE_K = 128  # k a pipeline step (one wgmma of K = 128, or two / one half of a group)
GROUPS = (None, 64, 128, 256)
MIN_M = 128  # below it, decode: the Triton kernel's split-K tiles (faster at M = 64 on an H200)
# float32 registers a compute thread may spend on accumulators: tile_n * tile_m / 128 threads
# (group-wise: the carry, plus tile_n * part_m / 128 for the fresh partial). 192 leaves 40 of the
# 232 registers of a compute thread (the memory warpgroup keeps 40) for the converted weights
# (32 at tile_n = 64) and addresses.
_ACC_REGS = 192


@dataclasses.dataclass(frozen=True)
class Config:
    """One compute warpgroup's tile of ``y^T``: ``tile_n`` rows of W x ``tile_m`` rows of x.

    The CTA computes ``2 tile_n x tile_m``. ``tile_n`` is a multiple of wgmma's 64 rows,
    ``tile_m`` is wgmma's N (<= 256); ``epi_m`` the width of a TMA store of the epilogue.
    """

    tile_n: int = 64
    tile_m: int = 128
    stages: int = 4
    grid_tile_width: int = 8
    epi_m: int = 32
    # group-wise: x rows of one fresh partial accumulator (a divisor of tile_m; None: tile_m). The
    # carry spans tile_m, each group's partial sums part_m of it at a time (one wgmma each), so a
    # 64 x 256 tile holds 128 + 64 accumulator registers with part_m = 128 instead of 2 x 128.
    part_m: int | None = None

    def __post_init__(self):
        check_fields("weight_only_mgpu", self, pow2=(("tile_n", 64), ("tile_m", 8), ("epi_m", 8)),
                     positive=("grid_tile_width", ("stages", 2)))
        if self.tile_m > 256:
            raise ValueError(f"weight_only_mgpu Config.tile_m: expected <= 256 (wgmma's N), got {self.tile_m}")
        if self.part_m is not None:
            check_pow2("weight_only_mgpu", "part_m", self.part_m, 8)
            if self.part_m > self.tile_m:
                raise ValueError(f"weight_only_mgpu Config.part_m: expected a divisor of tile_m={self.tile_m}, "
                                 f"got {self.part_m}")

    def tag(self) -> str:
        """Compact form for tables: ``mgpu:TNxTM[/pPART]/stSTAGES``."""
        part = "" if self.part_m in (None, self.tile_m) else f"/p{self.part_m}"
        return f"mgpu:{self.tile_n}x{self.tile_m}{part}/st{self.stages}"

    def cta_shape(self):
        """``(rows of W, rows of x)`` of a CTA's tile."""
        return 2 * self.tile_n, self.tile_m

    def part_width(self) -> int:
        """x rows of a group's fresh partial accumulator."""
        return self.part_m or self.tile_m

    def acc_regs(self, grouped: bool) -> int:
        """float32 accumulator registers a compute thread holds (group-wise: carry + one partial)."""
        width = self.tile_m + (self.part_width() if grouped else 0)
        return self.tile_n * width // 128


# Fewer CTA tiles than this and the Triton kernel (split K) keeps more of the 132 SMs busy.
MIN_TILES = 100


def _cta_tiles(m: int, n: int, cfg: Config) -> int:
    cn, tm = cfg.cta_shape()
    return pl.cdiv(m, tm) * (n // cn)


def enough_tiles(m: int, n: int, cfg: Config) -> bool:
    """Whether ``cfg``'s CTA tiles of an ``[m, n]`` output number at least ``MIN_TILES``."""
    return _cta_tiles(m, n, cfg) >= MIN_TILES


def heuristics(m: int, n: int, k: int, bits: int, group_size: int | None) -> Config:
    """Pure function of the problem: the tile for ``x [m, k] @ W [n, k]^T``.

    The widest ``tile_m`` whose CTA tiles number at least ``MIN_TILES`` (else the narrowest): 256
    (2 stages: x's tile is 64 KB a stage; group-wise with partial sums over 128 of the 256 rows),
    128, 64. Measured on an H200 (jax 0.11.2, 2026-11-21), chains of layers vs XLA's bf16 matmul:
    wider tiles win whenever they still fill the GPU. Per channel, M = 512, 8192^2:
    64x256 1.06x, 64x128 0.88x; M = 512, N = 4096: 64 tiles of 64x256 0.55x, 128 tiles of 64x128
    0.87x. Int4 g128, M = 2048 / 8192: 64x256 with 128-row
    partials 0.88-0.92x on 8192^2, 4096x14336 and 14336x4096, against 0.77-0.81x for 64x128
    and 0.79-0.85x with 64-row partials; launched 16 tiles wide (``grid_tile_width``), 0.89-0.97x
    against 0.88-0.93x at 8 in the same run.
    A tile taller than M is never picked (its rows past M are padding: 14336x4096 g128 at M = 128
    ran 0.59x with 64x256 tiles, 0.98x with 64x128).
    """
    del k, bits
    wide = Config(tile_m=256, stages=2) if group_size is None else Config(tile_m=256, stages=2, part_m=128,
                                                                           grid_tile_width=16)
    cands = [c for c in (wide, Config(tile_m=128)) if c.tile_m <= m] + [Config(tile_m=64)]
    return next((c for c in cands if enough_tiles(m, n, c)), cands[-1])


def supports(m: int, n: int, k: int, bits: int, group_size: int | None, x_dtype, *,
             config: Config | None = None) -> bool:
    """Whether this kernel handles the problem (see the module docstring's scope)."""
    if jnp.dtype(x_dtype) != jnp.bfloat16 or bits not in (4, 8) or group_size not in GROUPS:
        return False
    cfg = config or heuristics(m, n, k, bits, group_size)
    cn, _ = cfg.cta_shape()
    return (m > 0 and n > 0 and k > 0 and n % cn == 0 and k % TILE_K == 0
            and cfg.acc_regs(group_size is not None) <= _ACC_REGS)


def scope(cfg: Config) -> str:
    """What ``supports`` asks of a problem with tile ``cfg``, in words (for error messages)."""
    return (f"bfloat16 x, bits 4 or 8, group_size in {GROUPS}, N a multiple of {cfg.cta_shape()[0]}, K a multiple "
            f"of {TILE_K} and at most {_ACC_REGS} accumulator registers (tile_n x (tile_m [+ part_m]) / 128)")


def fit_stages(cfg: Config, bits: int, group_size: int | None) -> int:
    """``cfg.stages``, lowered until the ring and the epilogue buffers fit in shared memory (>= 2)."""
    cn, tm = cfg.cta_shape()
    rows = 1 if group_size is None else max(1, TILE_K // group_size)
    ring = cn * TILE_K * bits // 8 + tm * TILE_K * 2 + 2 * rows * cn * 4  # codes, x, scales + zero points
    epilogue = 2 * 2 * cfg.tile_n * min(cfg.epi_m, cfg.tile_m) * 2
    return max(2, min(cfg.stages, (SMEM_BUDGET - epilogue) // ring))


def weight_only_matmul_mgpu(x, codes, scale, zero_point=None, bias=None, *, bits: int, group_size: int | None,
                            symmetric: bool, k: int, config: Config | None = None, num_sms: int = NUM_SMS):
    """``x [M, K] @ dequant(codes, scale, zero_point)^T + bias`` in bfloat16 (module docstring).

    Operands as ``jaxquant.pallas.weight_only.weight_only_matmul`` (the layout of
    ``jaxquant.core.weights``); inputs are assumed validated, the problem must satisfy ``supports``.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu  # GPU backend: imported where it is used

    m = x.shape[0]
    n = codes.shape[0]
    cfg = config or heuristics(m, n, k, bits, group_size)
    if not supports(m, n, k, bits, group_size, x.dtype, config=cfg):
        raise ValueError(f"weight_only_mgpu: expected {scope(cfg)}, got x {x.dtype}, bits={bits}, "
                         f"group_size={group_size}, N={n}, K={k}, config {cfg}")
    grouped = group_size is not None
    has_zp = zero_point is not None
    has_bias = bias is not None
    tn, tm = cfg.tile_n, cfg.tile_m
    cn = 2 * tn
    mp = pl.cdiv(m, tm) * tm
    m_iters, n_iters, k_iters = mp // tm, n // cn, k // TILE_K
    epi = min(cfg.epi_m, tm)
    stages = fit_stages(cfg, bits, group_size)

    xp = x if mp == m else jnp.pad(x, ((0, mp - m), (0, 0)))
    if bits == 4:
        # asymmetric: u in 0..15 -> u - 8 as signed int4 (flip each nibble's top bit), z -> z - 8
        c = codes if symmetric else codes ^ jnp.int8(-0x78)
        c = lax.bitcast_convert_type(c, jnp.int4).reshape(n, k)
    else:
        c = codes
    n_groups = 1 if not grouped else k // group_size
    st = jnp.reshape(scale, (n, n_groups)).T.astype(jnp.float32)  # [groups, N]: a step's rows are contiguous
    zt = None
    if has_zp:
        shift = 8 if bits == 4 else 0
        zt = (jnp.reshape(zero_point, (n, n_groups)).T - shift).astype(jnp.float32)  # small integers: exact
        if not grouped:
            # one row a step (Mosaic GPU pipelines only blocks that move with the grid): k / 128 x N floats
            zt = jnp.broadcast_to(zt, (k // TILE_K, n))

    c_swz = plgpu.find_swizzle(TILE_K * bits)
    c_t = (plgpu.TilingTransform((8, c_swz * 8 // bits)), plgpu.SwizzleTransform(c_swz))
    x_swz = plgpu.find_swizzle(TILE_K * 16)
    x_t = (plgpu.TilingTransform((8, x_swz // 2)), plgpu.SwizzleTransform(x_swz))
    o_swz = plgpu.find_swizzle(epi * 16)
    o_t = (plgpu.TilingTransform((8, o_swz // 2)), plgpu.SwizzleTransform(o_swz))

    sub = TILE_K if not grouped else min(group_size, TILE_K)  # k of one wgmma
    pm = cfg.part_width() if grouped else tm  # x rows of one partial accumulator (group-wise)
    n_parts = tm // pm
    n_sub = TILE_K // sub
    if grouped:
        # the step's group rows of the [groups, N] scales (group 256: one row, every other step)
        rows = max(1, TILE_K // group_size)
        per = max(1, group_size // TILE_K)
        p_spec = plgpu.BlockSpec((rows, cn), lambda kk: (kk // per, 0))
    else:
        p_spec = plgpu.BlockSpec((1, cn), lambda kk: (kk, 0))  # zero points: the step's copy of the row
    # The pipelined operands, in the order of the step's arguments: the codes [cn, K] and x [tm, K]
    # move along K; the group scales and zero points [rows, cn] along their group rows.
    piped_specs = {"codes": plgpu.BlockSpec((cn, TILE_K), lambda kk: (0, kk), transforms=c_t),
                   "x": plgpu.BlockSpec((tm, TILE_K), lambda kk: (0, kk), transforms=x_t)}
    if grouped:
        piped_specs["scale"] = p_spec
    if has_zp:
        piped_specs["zero_point"] = p_spec
    pipeline = warp_specialized_pipeline(list(piped_specs.values()), k_iters, stages)
    # per-tile vectors fetched once per tile (the epilogue's): per-channel scales, bias
    n_copies = int(not grouped) + int(has_bias)
    bias32 = bias.astype(jnp.float32) if has_bias else None

    def body(c_gmem, x_gmem, s_gmem, *rest):
        z_gmem = rest[0] if has_zp else None
        b_gmem = rest[int(has_zp)] if has_bias else None
        o_gmem = rest[-1]

        gmem = {"codes": c_gmem, "x": x_gmem, "scale": s_gmem, "zero_point": z_gmem}
        piped = [gmem[name] for name in piped_specs]

        def tile_view(name, mi, ni):
            """The CTA's window of a pipelined operand: its x rows, or its W rows (codes: rows of
            ``[N, K]``; scales / zero points: columns of ``[groups, N]``)."""
            if name == "x":
                return x_gmem.at[pl.ds(mi * tm, tm), :]
            if name == "codes":
                return c_gmem.at[pl.ds(ni * cn, cn), :]
            return gmem[name].at[:, pl.ds(ni * cn, cn)]

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline_allocations(pipeline, *piped),
            o_smem=plgpu.SMEM((2, 2, tn, epi), jnp.bfloat16, transforms=o_t),
            v_smem=plgpu.SMEM((2, 2, tn), jnp.float32),  # [wg, scale / bias, tn]
            bar=plgpu.Barrier(num_barriers=2, num_arrivals=max(1, n_copies)),
            collective_axes="wg",
        )
        def scope(allocs, o_smem, v_smem, bar):
            wg = lax.axis_index("wg")

            @tile_loop(m_iters, n_iters, minor=1, grid_tile_width=cfg.grid_tile_width)
            def tile(mi, ni):
                wg_rows = pl.ds(ni * cn + wg * tn, tn)

                def row_vec(ref):  # a [tn] vector over this warpgroup's rows, broadcast along m
                    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1))

                def finish(ys):
                    """Epilogue of the tile, given as ``n_parts`` column blocks ``[tn, tm / n_parts]``."""
                    if n_copies:
                        plgpu.barrier_wait(bar.at[wg])
                    for p, y in enumerate(ys):
                        width = y.shape[1]
                        if not grouped:
                            y = y * lax.broadcast_in_dim(row_vec(v_smem.at[wg, 0]), (tn, width), (0,))
                        if has_bias:
                            y = y + lax.broadcast_in_dim(row_vec(v_smem.at[wg, 1]), (tn, width), (0,))
                        store_tiles(y.astype(jnp.bfloat16), o_smem, wg,
                                    lambda e, p=p, width=width: o_gmem.at[wg_rows, pl.ds(mi * tm + p * width + e * epi,
                                                                                          epi)], epi)

                def ctx(run):
                    # the epilogue's vectors, fetched while the main loop runs
                    if not grouped:
                        plgpu.copy_gmem_to_smem(s_gmem.at[0, wg_rows], v_smem.at[wg, 0], bar.at[wg])
                    if has_bias:
                        plgpu.copy_gmem_to_smem(b_gmem.at[wg_rows], v_smem.at[wg, 1], bar.at[wg])
                    if grouped:
                        zero = plgpu.layout_cast(jnp.full((tn, pm), 0, jnp.float32), plgpu.Layout.WGMMA)
                        finish(run((zero,) * n_parts))
                        return

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tn, tm), jnp.float32))
                    def _(acc_ref):
                        run(acc_ref)
                        finish((acc_ref[...],))

                def weights(c_smem, z_smem, j):
                    """bfloat16 q - z of sub-step j: [tn, sub], exact."""
                    w = c_smem[pl.ds(wg * tn, tn)].astype(jnp.bfloat16)
                    if n_sub > 1:
                        w = w[:, j * sub:(j + 1) * sub]
                    if z_smem is not None:
                        z = row_vec(z_smem.at[j if grouped else 0, pl.ds(wg * tn, tn)]).astype(jnp.bfloat16)
                        w = w - lax.broadcast_in_dim(z, (tn, sub), (0,))
                    return w

                def step(_, *refs):
                    smem = dict(zip(piped_specs, refs[:-1]))
                    carry = refs[-1]
                    c_smem, x_smem = smem["codes"], smem["x"]
                    s_smem, z_smem = smem.get("scale"), smem.get("zero_point")
                    if not grouped:  # x's [128, tm] transposed view is wgmma's B
                        plgpu.wgmma(carry, weights(c_smem, z_smem, 0), plgpu.transpose_ref(x_smem, (1, 0)))
                        plgpu.wgmma_wait(0)
                        return carry
                    total = list(carry)
                    for j in range(n_sub):
                        w = weights(c_smem, z_smem, j)
                        s = lax.broadcast_in_dim(row_vec(s_smem.at[j, pl.ds(wg * tn, tn)]), (tn, pm), (0,))
                        for p in range(n_parts):  # the group's partial sum, part_m rows of x at a time
                            xs = x_smem
                            if n_parts > 1 or n_sub > 1:
                                xs = x_smem.at[pl.ds(p * pm, pm), pl.ds(j * sub, sub)]
                            xj = plgpu.transpose_ref(xs, (1, 0))

                            def one_group(acc_ref, w=w, xj=xj):
                                plgpu.wgmma(acc_ref, w, xj)
                                return acc_ref[...]

                            part = pl.run_scoped(one_group, plgpu.ACC((tn, pm), jnp.float32))
                            total[p] = total[p] + part * s
                    return tuple(total)

                views = [tile_view(name, mi, ni) for name in piped_specs]
                pipeline(step, ctx)(*views, allocations=allocs)

    f = persistent_kernel(body, out_type=kernel_out((n, mp), jnp.bfloat16),
                          kernel_name=f"jaxquant_weight_only_w{bits}_mgpu", num_sms=num_sms)
    operands = [c, xp, st] + ([zt] if has_zp else []) + ([bias32] if has_bias else [])
    y_t = f(*operands)
    return (y_t if mp == m else y_t[:, :m]).T
