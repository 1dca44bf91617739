"""The int8 GEMM family (Pallas Triton): ``y = epilogue(A_int8 @ W_int8^T)``, weights ``[N, K]``.

One kernel body, three ways of getting the activation tile ``a`` (``a_mode``):

``"int8"``     ``a`` is already int8 ``[M, K]`` (e.g. from ``jaxquant.pallas.dynamic``), with an
               optional float32 scale per row ``[M, 1]`` or per tensor ``[1, 1]``.
``"dynamic"``  ``a`` is the float activation ``x [M, K]``; the kernel quantizes it itself with the
               dynamic symmetric per-token rule (docs/numerics.md)::

                   amax = max_k |x[m, k]|;  s[m] = max(amax * f32(1/127), 2**-126)
                   q[m, k] = clamp(rne(x[m, k] * (1 / s[m])), -128, 127)     (NaN -> -128;
                                                                             a NaN row: s = NaN)
               (a first pass over K for ``amax``, a second that quantizes each tile just before
               the dot). Meant for decode (small M): it saves the quantization launch and the
               int8 round trip through memory; every N-tile program redoes the (tiny) work.
``"static"``   ``a`` is the float activation and ``s`` one given float32 scale ``[1, 1]``
               (SmoothQuant-static): ``q = clamp(rne(x * (1/s)), -128, 127)``, one pass.

Main loop (exact integer arithmetic)::

    acc[m, n] = sum_k int32(q[m, k]) * int32(w[n, k])        # lax.dot_general(..., int32)
Epilogue, in float32, in this order, inside the kernel (no int32 ``[M, N]`` in device memory)::

    y = (f32(acc) * a_scale[m]) * w_scale[n]  (+ f32(bias[n]))  ->  cast to out_dtype
With no scales at all the kernel writes ``acc`` itself (int32), which is how the accumulator is
tested against ``lax.dot_general`` exactly.

Tiles: a program computes a ``block_m x block_n`` output tile, looping over K in ``block_k``
chunks (the tail chunk masked). Programs run in a 1-d grid with the usual "grouped" order
(``group_m`` row blocks sweep the N tiles together) so the A and W tiles they share stay in L2.
Ragged M / N edges are masked on loads and stores (never padded); the masks are compiled in only
where the shape needs them. Decode shapes (M <= 16) use skinny ``block_m = 16 x block_n = 32`` tiles and split K
(``Config.split_k``, int8 activations): a program per tile and K run writes int32 partials
``[split, M, N]``, which XLA sums exactly before the reference epilogue (``int8_epilogue``) —
decode tiles are latency-bound and need ~8 resident programs an SM, more than N / 32 tiles give.

Limits: Pallas Triton addresses an array with 32-bit element offsets unless it is larger than
2**32 bytes, so each operand and the output must have fewer than 2**31 elements
(``MAX_ELEMENTS``); the primitive layer splits larger problems along M / N.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import functools

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.core.numerics import int8_epilogue
from jaxquant.pallas.common import (GemmTileConfig, column_epilogue, fill_gemm_tiles, finite_or_zero, gemm_blocks,
                                    gemm_output, grid_ij, k_split, kernel_out, mask_and, mul_rn, next_pow2, recip, rne,
                                    store_tile, tile_masks, to_code, triton_call)
from jaxquant.core import tuned
from jaxquant.core.device import NUM_SMS

__all__ = ["Config", "heuristics", "fused_quantize_max_m", "int8_matmul", "MAX_ELEMENTS"]

TINY = float(np.finfo(np.float32).tiny)
QMIN, QMAX = -128, 127
MAX_ELEMENTS = 2**31 - 1
A_MODES = ("int8", "dynamic", "static")


# The int8 tensor-core instruction contracts K in steps of 32. With K tiles of 16, Triton's int8
# dot returned exactly twice the true sum on an H200 (jax 0.11.2, Triton 3.6, 2026-11-21: random
# int8 codes against numpy's int64 products, block_k = 16), so K tiles are at least 32 (a K below
# 32 is masked, as any ragged K tail).
MIN_BLOCK_K = 32


@dataclasses.dataclass(frozen=True)
class Config(GemmTileConfig):
    """The int8 GEMM's tile (``common.GemmTileConfig``): split K applies to int8 activations
    (``effective_split``: int32 partials, summed exactly in XLA); ``row_bcast`` is always on when
    the kernel quantizes a one-row activation itself (its statistics then cost one row)."""

    FAMILY: ClassVar[str] = "int8_matmul"


# Tiles come from the device's tuned table (jaxquant/tuned/<device>/int8_matmul.json; its "about"
# field gives the measurements behind each row), then ``heuristics`` fits them to the shape.
# Quantizing the activation inside the GEMM (a_mode "dynamic" / "static") is used up to the
# table's "fused_quantize_max_m" (0 on the H200): every N-tile program re-quantizes its activation
# tile, which cost more ALU time than the ~3 us launch it saves (1x4096x14336: fused 97 us against
# quantize kernel + GEMM 26 us); at M = 1, timed as 8-layer chains, 0.71-1.19x bf16 against
# 1.16-1.63x for the two launches (each program reads the row for its statistics before its
# weights stream). A variant issuing its whole weight block before one wide load of the row was
# bit-exact but 0.65-0.84x the two launches' kernel time (the weights then stream at ~2.6 TB/s).
# The fused modes stay available (``a_mode``; ``linear_kernel(..., fuse=True)``).


def _tuned(device_kind):
    data = tuned.table("int8_matmul", device_kind)
    return tuple((row["m_max"], Config(**row["config"])) for row in data["table"]), data["fused_quantize_max_m"]




def effective_split(split_k: int, k: int, bk: int, a_mode: str, m: int | None = None) -> int:
    """The K split actually used: ``common.k_split``; 1 when the kernel quantizes a multi-row
    activation (``a_mode`` "dynamic" / "static" with ``m != 1``: a program quantizes its K run of
    a single row itself, re-reading the row for its statistics, but 16 rows of that work per
    program cost more than the split gains)."""
    if a_mode != "int8" and m != 1:
        return 1
    return k_split(split_k, k, bk)


def fused_quantize_max_m(device_kind: str | None = None) -> int:
    """Largest M whose activation the GEMM kernel quantizes itself (the device's tuned table)."""
    return _tuned(device_kind)[1]


def heuristics(m: int, n: int, k: int, *, device_kind: str | None = None) -> Config:
    """Pure function: the tile for an ``[M, K] x [N, K]^T`` problem on ``device_kind``.

    Starts from the device's tuned table (by M), then shrinks blocks that are far larger than
    the problem (so tiny problems do not pay for empty tiles) and, for non-decode problems with
    few tiles, shrinks the tile until there are at least half as many programs as multiprocessors.
    """
    cfg = next(c for max_m, c in _tuned(device_kind)[0] if m <= max_m)
    bm = max(16, min(cfg.block_m, next_pow2(m)))
    bn = max(16, min(cfg.block_n, next_pow2(n)))
    bk = max(MIN_BLOCK_K, min(cfg.block_k, next_pow2(k)))
    # the tuned devices (H100 / H200 SXM) have NUM_SMS = 132
    bm, bn, split = fill_gemm_tiles(m, n, bm, bn, cfg.split_k, NUM_SMS)
    # (then whole K runs: effective_split's rule, as the kernel applies it)
    return dataclasses.replace(cfg, block_m=bm, block_n=bn, block_k=bk,
                               split_k=effective_split(split, k, bk, "int8"))


def _kernel(*refs, fast, a_mode, has_a_scale, a_per_row, has_w_scale, has_bias, dims, blocks, nmn, group_m,
            out_dtype, split, row_bcast):
    it = iter(refs)
    a_ref = next(it)
    as_ref = next(it) if has_a_scale else None
    w_ref = next(it)
    ws_ref = next(it) if has_w_scale else None
    b_ref = next(it) if has_bias else None
    o_ref = next(it)
    s_out_ref = next(it, None)  # dynamic mode with split K: the activation scale, for the XLA epilogue
    m_total, n_total, k_total = dims
    bm, bn, bk = blocks
    nm, nn = nmn
    i, j = grid_ij(pl.program_id(0), nm, nn, group_m)

    rmask, cmask = tile_masks(i, j, bm, bn, m_total, n_total)
    n_full, tail = divmod(k_total, bk)
    n_all = n_full  # every K chunk of the row (the dynamic statistics need them all)
    k_first = 0
    if split > 1:  # this program's contiguous run of K chunks (the wrapper checked they divide evenly)
        n_full //= split
        k_first = pl.program_id(1) * n_full

    def load_tile(ref, k, row_mask, masked_k):
        kk = k * bk if isinstance(k, int) else pl.multiple_of(k * bk, bk)
        view = ref.at[:, pl.ds(kk, bk)]
        m = row_mask
        if masked_k:
            kmask = (kk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)) < k_total
            m = mask_and(m, kmask)
        if m is None:
            return view[...]
        return pltriton.load(view, mask=m, other=0)

    wmask = None if cmask is None else jnp.reshape(cmask, (bn, 1))
    f32 = jnp.float32

    def load_w(k, masked_k):
        return load_tile(w_ref, k, wmask, masked_k)

    def k_loop(step, init, whole_row=False):
        """Run ``step(k, carry, masked_k)`` over this program's K chunks (the ragged tail chunk
        masked), or over all of them with ``whole_row``."""
        carry = init
        first, count = (0, n_all) if whole_row else (k_first, n_full)
        if count:
            carry = jax.lax.fori_loop(0, count, lambda k, c: step(first + k, c, False), carry)
        if tail:
            carry = step(n_full, carry, True)
        return carry

    def load_scalar_or_rows(ref):
        if a_per_row:
            v = ref[...] if rmask is None else pltriton.load(ref, mask=rmask, other=1)
        else:
            v = ref[...]
        return v.astype(f32)

    # row_bcast (M == 1): a's tile is its one row [1, bk] (quantized here in the "dynamic" /
    # "static" modes), broadcast to the dot's 16 rows (all equal; row 0 is stored), so shared
    # memory, the statistics and the quantization cost one row, not a 16-row tile of padding.
    a_rows, a_mask = (1, None) if row_bcast else (bm, rmask)
    a_scale = None
    inv = None
    if a_mode == "dynamic":
        zero = jnp.zeros((a_rows, 1), f32)

        def stats(k, carry, masked_k):
            nan, amax = carry
            x = load_tile(a_ref, k, a_mask, masked_k).astype(f32)
            nan = jnp.maximum(nan, jnp.max(jnp.where(x != x, 1.0, 0.0).astype(f32), axis=1, keepdims=True))
            amax = jnp.maximum(amax, jnp.max(finite_or_zero(jnp.abs(x)), axis=1, keepdims=True))
            return nan, amax

        nan, amax = k_loop(stats, (zero, zero), whole_row=True)
        t = amax * jnp.asarray(np.float32(1 / QMAX), f32)
        a_scale = jnp.where(nan > 0, jnp.asarray(np.nan, f32), jnp.where(t < TINY, jnp.asarray(TINY, f32), t))
        inv = recip(a_scale, fast)
    elif a_mode == "static":
        a_scale = as_ref[...].astype(f32)
        inv = recip(a_scale, fast)
    elif has_a_scale:
        a_scale = load_scalar_or_rows(as_ref)

    def a_codes(k, masked_k):
        a = load_tile(a_ref, k, a_mask, masked_k)
        if a_mode != "int8":
            a = to_code(rne(a.astype(f32) * inv, fast), QMIN, QMAX, fast).astype(jnp.int8)
        return jnp.broadcast_to(a, (bm, a.shape[1])) if row_bcast else a

    def mm(k, acc, masked_k):
        a = a_codes(k, masked_k)
        w = load_w(k, masked_k)
        return acc + jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)

    acc = k_loop(mm, jnp.zeros((bm, bn), jnp.int32))

    if s_out_ref is not None:  # every program writes the same value
        s_out_ref[...] = a_scale
    if split > 1 or (a_scale is None and not has_w_scale and not has_bias):  # raw int32 (partials)
        out = acc.astype(out_dtype)
    else:
        y = acc.astype(f32)
        # mul_rn (column_epilogue says why): the epilogue is then bit-exact with the reference.
        if a_scale is not None:
            y = mul_rn(y, jnp.broadcast_to(a_scale, y.shape), fast)
        out = column_epilogue(y, ws_ref, b_ref, cmask, fast).astype(out_dtype)
    store_tile(o_ref, out, rmask, cmask)


def int8_matmul(a, w, *, a_scale=None, w_scale=None, bias=None, a_mode: str = "int8", out_dtype=None,
                config: Config | None = None, device_kind: str | None = None, interpret: bool = False):
    """``epilogue(quant(a) @ w^T)`` in one ``pallas_call`` (see the module docstring).

    Args:
      a: ``[M, K]``: int8 codes (``a_mode="int8"``) or a float16/bfloat16/float32 activation
        (``"dynamic"``: quantized per row in the kernel; ``"static"``: with ``a_scale``).
      w: int8 ``[N, K]`` weight codes (contracted on K: the fast layout).
      a_scale: float32 ``[M, 1]`` (per row) or ``[1, 1]`` (per tensor); required for
        ``"static"``, ignored (computed) for ``"dynamic"``, optional for ``"int8"``.
      w_scale: float32 ``[1, N]`` per output channel, or None.
      bias: ``[1, N]`` (any float dtype, added in float32), or None.
      out_dtype: the result dtype; int32 (the raw accumulator) is allowed only with no scale and
        no bias. Default: int32 if there is no epilogue, else float32.
      config: tile override; default ``heuristics(M, N, K, device_kind=...)``.
    Returns ``[M, N]`` in ``out_dtype``.
    """
    if a_mode not in A_MODES:
        raise ValueError(f"a_mode: expected one of {A_MODES}, got {a_mode!r}")
    m, k = a.shape
    n, k2 = w.shape
    assert k == k2, (a.shape, w.shape)
    has_epilogue = a_mode != "int8" or a_scale is not None or w_scale is not None or bias is not None
    if out_dtype is None:
        out_dtype = np.float32 if has_epilogue else np.int32
    out_dtype = np.dtype(out_dtype)
    if has_epilogue and out_dtype == np.int32:
        raise ValueError("out_dtype: int32 (the raw accumulator) needs a_mode='int8' and no scales / bias")
    if a_mode == "static" and a_scale is None:
        raise ValueError("a_scale: required for a_mode='static'")
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    if k == 0:  # an empty sum: acc = 0 (the epilogue then gives 0 * scales + bias)
        a = jnp.zeros((m, 16), a.dtype)
        w = jnp.zeros((n, 16), w.dtype)
        k = 16
    for name, size in (("a", m * k), ("w", n * k), ("output", m * n)):
        if size > MAX_ELEMENTS:
            raise NotImplementedError(
                f"jaxquant int8_matmul: {name} has {size} elements; one kernel call handles < 2**31 "
                "(split the problem along M or N)")
    cfg = config or heuristics(m, n, k, device_kind=device_kind)
    bm, bn, bk, nm, nn, nk, group_m = gemm_blocks(cfg, m, n, k, MIN_BLOCK_K)
    split = effective_split(cfg.split_k, k, bk, a_mode, m)
    row_bcast = m == 1 and (a_mode != "int8" or cfg.row_bcast is not False)
    epilogue = None
    if split > 1:
        # The kernel writes int32 partials [split, M, N] (one program per tile and K run, no
        # epilogue); they are summed exactly in XLA, then the reference epilogue applies the same
        # float32 operations as the in-kernel one (a "static" scale still quantizes in the kernel;
        # a "dynamic" one is computed there and written out for the epilogue).
        epilogue = (a_scale, w_scale, bias, out_dtype)
        a_scale = a_scale if a_mode == "static" else None
        w_scale = bias = None
        out_dtype = np.dtype(np.int32)

    def ij(pid):
        return grid_ij(pid, nm, nn, group_m)

    width = bk * nk
    operands = [a]
    in_specs = [pl.BlockSpec((1, width), lambda p, *_: (0, 0)) if row_bcast
                else pl.BlockSpec((bm, width), lambda p, *_: (ij(p)[0], 0))]
    has_a_scale = a_scale is not None and a_mode != "dynamic"
    a_per_row = False
    if has_a_scale:
        a_scale = jnp.asarray(a_scale, jnp.float32)
        if a_scale.size != 1:  # one scale per row (with M == 1 that is one per tensor)
            assert a_scale.shape == (m, 1), (a_scale.shape, m)
            a_per_row = True
            in_specs.append(pl.BlockSpec((bm, 1), lambda p, *_: (ij(p)[0], 0)))
        else:
            a_scale = jnp.reshape(a_scale, (1, 1))
            in_specs.append(pl.BlockSpec((1, 1), lambda p, *_: (0, 0)))
        operands.append(a_scale)
    operands.append(w)
    in_specs.append(pl.BlockSpec((bn, width), lambda p, *_: (ij(p)[1], 0)))
    if w_scale is not None:
        operands.append(jnp.reshape(jnp.asarray(w_scale, jnp.float32), (1, n)))
        in_specs.append(pl.BlockSpec((1, bn), lambda p, *_: (0, ij(p)[1])))
    if bias is not None:
        operands.append(jnp.reshape(bias, (1, n)))
        in_specs.append(pl.BlockSpec((1, bn), lambda p, *_: (0, ij(p)[1])))
    kernel = functools.partial(
        _kernel, a_mode=a_mode, has_a_scale=has_a_scale, a_per_row=a_per_row, has_w_scale=w_scale is not None,
        has_bias=bias is not None, dims=(m, n, k), blocks=(bm, bn, bk), nmn=(nm, nn), group_m=group_m,
        out_dtype=out_dtype, fast=not interpret, split=split, row_bcast=row_bcast)
    out_shape, out_spec, grid = gemm_output(m, n, bm, bn, split, out_dtype, ij)
    if split > 1 and a_mode == "dynamic":  # + the activation scale [1, 1] (row_bcast: M == 1)
        out_shape = (out_shape, kernel_out((1, 1), jnp.float32))
        out_spec = (out_spec, pl.BlockSpec((1, 1), lambda p, s: (0, 0)))
    y = triton_call(kernel, operands, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec, cfg=cfg,
                    interpret=interpret, name=f"jaxquant_int8_matmul_{a_mode}")
    if epilogue is None:
        return y
    a_s, w_s, b, final_dtype = epilogue
    if a_mode == "dynamic":
        y, a_s = y
    acc = jnp.sum(y, axis=0, dtype=jnp.int32)
    if a_s is not None:
        a_s = jnp.asarray(a_s, jnp.float32)
        a_s = jnp.reshape(a_s, (1, 1)) if a_s.size == 1 else a_s
    return int8_epilogue(acc, a_s, w_s, b, final_dtype)
