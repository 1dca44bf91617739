"""Helpers shared by the Pallas Triton kernels (in-kernel numerics, block arithmetic).

Two implementations of the same exact numerics, chosen per kernel by ``fast``:

* portable (interpret mode, and the specification's shape): Pallas Triton has no lowering for
  ``jnp.round``; ``rne`` is round-half-to-even from ``floor`` and compares (docs/pallas_pitfalls.md),
  exact: for ``|v| < 2**23`` ``floor(v)`` and ``v - floor(v)`` are exact, larger floats are
  integers (``d == 0``); the clamp is written with selects so NaN handling does not depend on
  how a backend treats NaN in max/min.
* fast (real GPU kernels): the kernels are ALU-bound with the portable forms (~25 instructions an
  element measured at 0.8 G elements/ms on an H200), so ``rne`` is the hardware's
  ``cvt.rni.f32.f32`` (IEEE round-half-even, one instruction) and the clamp is
  ``min(max(v, qmin), qmax)``: Pallas Triton lowers float max/min to IEEE maxNum/minNum, which
  return the non-NaN operand, so NaN -> qmin, +Inf -> qmax, -Inf -> qmin for free. -0.0 -> +0.0
  stays a compare and select (``v + 0.0`` was folded away on the GPU).

The GPU test suite checks the fast forms against the CPU reference bit for bit.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


from jaxquant.core.numerics import rounded


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def check_pow2(family: str, name: str, v, lo: int = 1) -> None:
    """Config validation shared by the kernel families: ``v`` is a power of two >= ``lo``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or v & (v - 1):
        raise ValueError(f"{family} Config.{name}: expected a power of two >= {lo}, got {v!r}")


def view_masks(shape3, block, masks, offs=None):
    """``(rmask, cmask, mask)`` of program ``(b, i, j)``'s ``block = (br, bc)`` tile of a ``[B, R, C]``
    view (grid axes 1 and 2, block indices shifted by ``offs`` when given): row / column validity,
    None where that edge is not ragged (``masks``), and their conjunction."""
    _, r_total, c_total = shape3
    br, bc = block
    mask_rows, mask_cols = masks
    def block_index(axis):
        return pl.program_id(axis) if offs is None else pl.program_id(axis) + offs[axis - 1]

    rmask = cmask = None
    if mask_rows:
        rmask = block_index(1) * br + jax.lax.broadcasted_iota(jnp.int32, (br, 1), 0) < r_total
    if mask_cols:
        cmask = block_index(2) * bc + jax.lax.broadcasted_iota(jnp.int32, (1, bc), 1) < c_total
    if rmask is not None and cmask is not None:
        return rmask, cmask, rmask & cmask
    return rmask, cmask, (rmask if rmask is not None else cmask)


def param_mask(rmask, cmask, pfull):
    """The mask of a parameter tile: the row / column masks along the axes the parameters span."""
    _, pr_full, pc_full = pfull
    pmask = None
    if pr_full and rmask is not None:
        pmask = rmask
    if pc_full and cmask is not None:
        pmask = cmask if pmask is None else pmask & cmask
    return pmask


def check_fields(family: str, cfg, *, pow2=(), positive=()) -> None:
    """A Config's checks: each ``pow2`` field (a name, or ``(name, lo)``) a power of two >= lo, each
    ``positive`` field an int >= lo (default 1)."""
    for check, specs in ((check_pow2, pow2), (check_positive, positive)):
        for spec in specs:
            name, lo = spec if isinstance(spec, tuple) else (spec, 1)
            check(family, name, getattr(cfg, name), lo)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile of one program of the elementwise / row kernels: ``block_rows x block_cols`` elements
    (powers of two). Each family subclasses it (its own class, its name in error messages)."""

    block_rows: int
    block_cols: int
    num_warps: int = 4
    num_stages: int = 1
    FAMILY: ClassVar[str] = "tile"

    def __post_init__(self):
        check_fields(self.FAMILY, self, pow2=("block_rows", "block_cols", "num_warps"), positive=("num_stages",))


@dataclasses.dataclass(frozen=True)
class GemmTileConfig:
    """Tile of one program of a Triton GEMM (``[M, K] x [N, K]^T``) and its launch parameters
    (powers of two; block_m, block_n >= 16, block_k >= 32: the int8 / fp8 tensor-core instructions
    contract K in steps of 32). Each GEMM family subclasses it."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8  # row blocks a launch group (grid_ij)
    num_warps: int = 4
    num_stages: int = 3
    # K is cut into at most split_k equal runs of whole block_k chunks, one program each (k_split):
    # partial sums [split, M, N] summed in XLA before the epilogue.
    split_k: int = 1
    # M == 1: a's tile is its one row [1, block_k], broadcast in registers to the dot's block_m rows
    # (all equal; row 0 is stored): a's shared-memory buffers hold one row, not block_m rows of
    # padding, so more programs fit an SM. None: whenever M == 1.
    row_bcast: bool | None = None
    FAMILY: ClassVar[str] = "gemm"

    def __post_init__(self):
        check_fields(self.FAMILY, self, pow2=(("block_m", 16), ("block_n", 16), ("block_k", 32), "group_m",
                                              "num_warps", "split_k"), positive=("num_stages",))


def check_positive(family: str, name: str, v, lo: int = 1) -> None:
    """Config validation shared by the kernel families: ``v`` is an int >= ``lo`` (default 1)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{family} Config.{name}: expected an int >= {lo}, got {v!r}")


def _ptx_unary(f32_asm: str, f64_asm: str, v):
    """One PTX instruction applied elementwise (float32 or float64 operand and result)."""
    f64 = v.dtype == jnp.float64
    return pltriton.elementwise_inline_asm(
        f64_asm if f64 else f32_asm, args=[v], constraints="=d,d" if f64 else "=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)])[0]


def rne(v, fast: bool = False):
    """Round half to even, for float32/float64 arrays inside kernels."""
    if fast:
        return _ptx_unary("cvt.rni.f32.f32 $0, $1;", "cvt.rni.f64.f64 $0, $1;", v)
    f = jnp.floor(v)
    d = v - f
    half = jnp.asarray(0.5, v.dtype)
    one = jnp.asarray(1.0, v.dtype)
    # f is odd iff f - 2 * floor(f / 2) == 1 (exact for all floats).
    odd = (f - 2 * jnp.floor(f * half)) == one
    up = (d > half) | ((d == half) & odd)
    return jnp.where(up, f + one, f)


def to_code(v, qmin: int, qmax: int, fast: bool = False):
    """clamp(v, qmin, qmax) with NaN -> qmin and -0.0 -> +0.0."""
    lo = jnp.asarray(qmin, v.dtype)
    hi = jnp.asarray(qmax, v.dtype)
    if fast:  # maxNum / minNum (see the module docstring)
        return plus_zero(jnp.minimum(jnp.maximum(v, lo), hi))
    c = jnp.where(v < lo, lo, jnp.where(v > hi, hi, plus_zero(v)))
    return jnp.where(v != v, lo, c)


def plus_zero(v):
    """-0.0 -> +0.0 (integer-valued floats; see jaxquant.core.numerics.plus_zero).

    A select on every path: ``v + 0.0`` was measured to keep -0.0 in a Triton kernel on the H200
    (the compiler folded it), so the sign is fixed with a compare instead."""
    return jnp.where(v == 0, jnp.zeros((), v.dtype), v)


def finite_or_zero(x):
    """x with +-Inf replaced by 0 (NaN kept): dynamic statistics ignore infinities
    (docs/numerics.md), so a row holding +Inf keeps a finite scale and +Inf gets the code qmax."""
    return jnp.where(jnp.abs(x) == jnp.inf, jnp.zeros((), x.dtype), x)


def abs_max_bits(x):
    """Row max of |x| (axis 1, keepdims) as int32 bit patterns, NaN-propagating, in ONE reduction.

    Float max reductions drop NaN in Triton (maxNum); the bit patterns of |x| as int32 order
    NaN > +Inf > every finite value, so an integer max keeps NaN. Partial results combine with
    an integer ``jnp.maximum``; ``bits_to_float`` turns the result back. float32 only.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(0x7FFFFFFF)
    return jnp.max(bits, axis=1, keepdims=True)


def bits_to_float(b):
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def recip(a, fast: bool = False):
    """The correctly rounded reciprocal ``1 / a``.

    On the GPU a plain ``1 / a`` in a Triton kernel is NOT correctly rounded (measured on an
    H200, jax 0.11.2: 16 of 64 float32 reciprocals off by an ulp, which flips codes near .5
    ties), so the fast path uses PTX ``rcp.rn`` (IEEE round-to-nearest reciprocal)."""
    if fast:
        return _ptx_unary("rcp.rn.f32 $0, $1;", "rcp.rn.f64 $0, $1;", a)
    return jnp.asarray(1, a.dtype) / a


def mul_rn(a, b, fast: bool = False):
    """``a * b`` (float32) that the compiler never fuses into an FMA: PTX ``mul.rn`` on the GPU."""
    if fast:
        return pltriton.elementwise_inline_asm(
            "mul.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, a.dtype)])[0]
    return rounded(a * b)  # interpret mode: XLA:CPU contracts through optimization_barrier (core.numerics.rounded)


# ----------------------------------------------------------------------------------------
# Triton GEMM tiling shared by the int8 and fp8 GEMMs ([M, K] x [N, K]^T, grouped launch order)
# ----------------------------------------------------------------------------------------

PROGRAMS_PER_SM = 8  # split-K target for decode tiles (16-row tiles are latency-bound)


def grid_ij(pid, nm, nn, group_m):
    """Grouped launch order: program ``pid`` -> (row block i, column block j); ``group_m`` row
    blocks share the column blocks in turn, so their weight tiles stay in L2."""
    width = group_m * nn
    group = pid // width
    first = group * group_m
    size = jnp.minimum(nm - first, group_m)
    r = pid % width
    return first + r % size, r // size


def k_split(split_k: int, k: int, bk: int) -> int:
    """The largest power of two ``<= split_k`` cutting K's ``bk`` chunks into equal runs; 1 when
    K has a ragged tail chunk."""
    if k % bk:
        return 1
    split = 1
    while split * 2 <= split_k and (k // bk) % (split * 2) == 0:
        split *= 2
    return split


def fill_gemm_tiles(m: int, n: int, bm: int, bn: int, max_split: int, sms: int) -> tuple[int, int, int]:
    """``(bm, bn, split)`` for an ``[m, n]`` output: non-decode tiles shrink (larger side first, not
    below 64 x 32) until there are at least half as many programs as SMs; then K is split (up to
    ``max_split``, before ``k_split``'s rule) for decode tiles until ~``PROGRAMS_PER_SM`` programs
    an SM, and for larger tiles only while they do not fill the SMs once (the partial sums cost
    M x N x 4 bytes each way). Skinny decode tiles are not narrowed: that measured slower."""
    while bm > 16 and pl.cdiv(m, bm) * pl.cdiv(n, bn) < sms // 2:
        if bn >= bm and bn > 64:
            bn //= 2
        elif bm > 64:
            bm //= 2
        elif bn > 32:
            bn //= 2
        else:
            break
    tiles = pl.cdiv(m, bm) * pl.cdiv(n, bn)

    def more(s):
        return tiles * s * 2 <= PROGRAMS_PER_SM * sms if bm == 16 else tiles * s < sms

    split = 1
    while split * 2 <= max_split and more(split):
        split *= 2
    return bm, bn, split


def gemm_blocks(cfg: GemmTileConfig, m: int, n: int, k: int, min_block_k: int):
    """``(bm, bn, bk, nm, nn, nk, group_m)``: ``cfg``'s tile clipped to an ``[m, k] x [n, k]^T``
    problem (powers of two, not below 16 x 16 x ``min_block_k``), the block counts along M, N, K
    and the launch group (``grid_ij``) clipped to the row blocks."""
    bm = min(cfg.block_m, max(16, next_pow2(m)))
    bn = min(cfg.block_n, max(16, next_pow2(n)))
    bk = min(cfg.block_k, max(min_block_k, next_pow2(k)))
    nm, nn, nk = pl.cdiv(m, bm), pl.cdiv(n, bn), pl.cdiv(k, bk)
    return bm, bn, bk, nm, nn, nk, max(1, min(cfg.group_m, nm))


# Inside ``shard_map`` (whose default ``check_vma=True`` tracks how values vary over manual mesh
# axes) pallas_call needs every output type to say how it varies, else it raises "manual_axis_type
# on jax.ShapeDtypeStruct must not be None". A jaxquant kernel is lowered on one device's operands,
# stripped of mesh axes (core.primitive), so its outputs vary over none: ``ManualAxisType()``.
# (A jax whose ShapeDtypeStruct has no such field does not ask for it.)
_HAS_MANUAL_AXIS_TYPE = "manual_axis_type" in inspect.signature(jax.ShapeDtypeStruct).parameters


def kernel_out(shape, dtype) -> jax.ShapeDtypeStruct:
    """The type of a kernel output ``shape`` x ``dtype`` (``pallas_call`` ``out_shape``)."""
    if _HAS_MANUAL_AXIS_TYPE:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType())
    return jax.ShapeDtypeStruct(shape, dtype)


def gemm_output(m: int, n: int, bm: int, bn: int, split: int, dtype, ij):
    """``(out_shape, out_spec, grid)`` of a grouped-launch GEMM (program ``p`` -> tile ``ij(p)``):
    ``[m, n]`` on the grid ``(tiles,)``, or split-K partials ``[split, m, n]`` on ``(tiles, split)``."""
    tiles = pl.cdiv(m, bm) * pl.cdiv(n, bn)
    if split > 1:
        return (kernel_out((split, m, n), dtype), pl.BlockSpec((None, bm, bn), lambda p, s: (s, *ij(p))),
                (tiles, split))
    return kernel_out((m, n), dtype), pl.BlockSpec((bm, bn), lambda p: ij(p)), (tiles,)


def triton_call(kernel, operands, *, out_shape, grid, in_specs, out_specs, cfg, interpret: bool, name: str):
    """``pallas_call`` of a Triton kernel with ``cfg``'s ``num_warps`` / ``num_stages``, applied to ``operands``."""
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=name,
    )(*operands)


# ----------------------------------------------------------------------------------------
# In-kernel pieces of the Triton GEMMs: edge masks, the per-column epilogue, the masked store
# ----------------------------------------------------------------------------------------


def mask_and(a, b):
    """``a & b`` of two masks, either of which may be None (no mask: everything in bounds)."""
    if a is None:
        return b
    return a if b is None else a & b


def tile_masks(i, j, bm: int, bn: int, m_total: int, n_total: int):
    """``(rmask [bm, 1], cmask [1, bn])`` of output tile ``(i, j)``: the rows / columns inside
    ``[m_total, n_total]``; None along an axis the tiles divide."""
    rmask = cmask = None
    if m_total % bm:
        rmask = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m_total
    if n_total % bn:
        cmask = (j * bn + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < n_total
    return rmask, cmask


def column_epilogue(y, ws_ref, b_ref, cmask, fast: bool):
    """float32 ``y [bm, bn]`` ``* w_scale`` then ``+ bias``, each a per-column ``[1, bn]`` ref (None:
    absent). ``mul_rn``: a PTX mul.rn on the GPU, never contracted into an FMA with the bias add
    (Triton contracts ``(acc * s) * ws + b`` otherwise, which differs from the reference by more
    than an ulp under cancellation)."""
    f32 = jnp.float32
    if ws_ref is not None:
        ws = ws_ref[...] if cmask is None else pltriton.load(ws_ref, mask=cmask, other=1)
        y = mul_rn(y, jnp.broadcast_to(ws.astype(f32), y.shape), fast)
    if b_ref is not None:
        b = b_ref[...] if cmask is None else pltriton.load(b_ref, mask=cmask, other=0)
        y = y + b.astype(f32)
    return y


def store_tile(o_ref, out, rmask, cmask) -> None:
    """``o_ref[...] = out``, leaving the rows / columns outside the output (``tile_masks``) alone."""
    omask = mask_and(rmask, cmask)
    if omask is None:
        o_ref[...] = out
    else:
        pltriton.store(o_ref, out, mask=omask)
