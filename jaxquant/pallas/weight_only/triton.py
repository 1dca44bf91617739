"""Weight-only dequant-matmul (Pallas Triton): ``y = x @ dequant(W)^T`` with int4 / int8 weights.

Operands (``jaxquant.core.weights`` documents the layout): ``x [M, K]`` (float16 / bfloat16 /
float32), ``codes`` int8 ``[N, K // 2]`` (bits=4, byte j = k 2j in the low nibble, 2j+1 in the
high nibble) or ``[N, K]`` (bits=8), ``scale`` float32 ``[N, K // g]`` or ``[N]`` (per
channel), optional int32 ``zero_point`` of the same shape, optional float ``bias [N]``.

Math. The weight is never materialised in memory: each program streams its ``[BN, BK]`` tile of
codes, converts them to ``q - z`` in registers and contracts it on K against ``x``'s tile
(float32 accumulation); the converted weights are the LEFT operand, ``acc[n, m] += (q - z)[n, :]
. x[m, :]``, so on Hopper the wgmma takes them straight from registers (only x's tile and the
raw codes go through shared memory), and the output tile is transposed once at the end::

    group-wise:   y[m, n] = sum_groups  s[n, grp] * sum_{k in grp} x[m, k] * (q[n, k] - z[n, grp])
    per-channel:  y[m, n] = s[n] * sum_k x[m, k] * (q[n, k] - z[n])
    y = (y + bias[n]) cast to x's dtype

``q - z`` is an integer with ``|q - z| <= 255``, exact in the dot's operand dtype (x's dtype:
bfloat16 holds integers up to 256 exactly), and each product ``x * (q - z)`` is exact in float32,
so the tensor-core dot is exact up to float32 accumulation order; the scale is applied once per
group (or once per row) to the float32 partial sum. This differs from the reference
(dequantize to float32, then a float32 dot) only by float32 rounding: see
``tests/primitives/test_weight_only.py`` for the bound. float32 x follows ``jax.default_matmul_precision``
like XLA's own float32 matmuls on the GPU (``float32_dot_algorithm``): one TF32 tensor-core product
by default, three (Triton's ``tf32x3``, x to ~2**-22 relative: inside the same bound) under
"highest" / "float32"; IEEE float32 dots run on the CUDA cores and were 20-70x slower on an H200
(a float32 MiniLM forward with W4A16 layers: 13 ms against 0.4 ms in float32).

Tiling. Grid ``(N / BN, M / BM, split_k)``; a program owns a ``[BM, BN]`` output tile and a
contiguous 1 / ``split_k`` of K, walked in ``BK`` steps by a pipelined loop (``num_stages``).
Group-wise scales: a step handles ``BK`` consecutive k as ``BK / min(BK, g)`` sub-dots, each
followed by one multiply with its group's scale (``BK`` a multiple or a divisor of ``g``).
With ``split_k > 1`` the kernel writes float32 partials ``[split_k, M, N]`` that a small XLA
reduction sums (then bias and the cast fuse into it); with ``split_k == 1`` bias and the cast are
fused in the kernel. Decode (small M) takes ``BM = 16`` (the smallest tensor-core tile; rows past
M are masked) and enough ``N / BN * split_k`` programs to stream weights on every SM; prefill
takes 64/128-row tiles. Ragged M and N (and K, per channel) are masked, never padded.

int4 without an in-register interleave: the low nibbles hold the even k and the high nibbles the
odd k, so each unit is two dots, ``lo . x_even^T + hi . x_odd^T``. Decode tiles (``block_m == 16``,
16-bit x; ``Config.x_pairs``) read x as uint32 words, each an (even, odd) column pair (a bitcast of
x, no copy), and split them in registers (two ``prmt`` a word); wider tiles, whose wgmma reads x
from shared memory, take x's even and odd columns from two XLA slices (``x[:, 0::2]``,
``x[:, 1::2]``: ~3% of the time at M = 8192, but two ~1 us kernels a layer at decode: 8192^2 at
M = 1 went from 1.71x to 1.97x bf16 without them, 4096^2 from 0.84x to 1.29x, same-run sweep
of chained layers on an H200, jax 0.11.2, 2026-11-21). The group scales (and zero points)
of the next step are loaded one step ahead: Triton does not pipeline these ``[BN, 1]`` loads.

Nibble conversion (``Config.fast_dequant``, GPU only; interpret mode and ``fast_dequant=False``
use shifts and converts, same values): PTX inline assembly on 4 code bytes at a time, ~1.75
instructions a weight: ``prmt``/``lop3`` build the half-precision number ``B + u`` (bfloat16
``B = 128`` / float16 ``B = 1024``) and one ``fma.rn`` half2 subtracts ``B + z`` exactly; for
float32 x, ``bfe``/``xor`` build the float32 ``2**23 + u`` (``_int4_ptx``, ``_int4_f32_ptx``).

Offsets of every load are products of Python ints with the loop index (``pl.multiple_of``): a
traced floor division in an offset hid its divisibility from Triton, which then issued byte-wide,
unpipelined loads (measured on an H200: 2.5x slower at decode, 2.7x at M = 2048).

At M = 1 x's tile is its one row (``Config.row_bcast``), broadcast in registers to the dot's 16
rows: x's shared-memory buffers shrink from 16 rows to one (24.6 -> 9.2 KB a program on the decode
tile; registers, 79 a thread, then allow 12 programs an SM, more than the 7.75 that the 1024-program
grid gives). Same-run sweep (H200, jax 0.11.2, 2026-11-21; 8-layer chains): W4A16 g128 at M = 1,
8192^2 2.20x bf16 against 1.83x with the 16-row tile, 4096x14336 2.01x / 1.69x, 14336x4096 2.18x /
1.81x; W8A16 within noise (1.76x / 1.74x on 8192^2).

Measured on an H200 (jax 0.11.2, Triton 3.6, 2026-11-21), per layer inside one jitted call: W4A16
g128 at M = 1 2.0-2.1x XLA's bf16 matmul (~2.1 TB/s of weights), M = 16 1.8-1.95x (target 3x), per
channel 2.5-2.6x at M = 1; W8A16 1.55-1.7x; M = 128 0.5-0.67x and M >= 2048 0.45-0.5x (targets 1.5x
/ 0.9x). Nsight Compute on the M = 1 tile
(``benchmarks/results/h200/ncu-weight_only-w4-m1-2026-11-21.txt``): 44% of DRAM bandwidth, issue
slots 40% busy, ~7.3 cycles between a warp's instructions with ~15 warps an SM (the whole grid is
resident, one wave): issue- and latency-bound; more programs (K split 8, 16-wide tiles) or deeper
pipelines measured slower (same device and date). Decode takes 16x32x256 tiles (2 warps) with K
split until ~8 programs an SM. At M >= 64 the per-group float32 partial sums (one per group, scaled,
then added) make Triton wait for each tensor-core dot, so dequantization and the dots do not
overlap.

Configs come from ``heuristics(M, N, K, bits, group_size)``: a pure function of the shapes over
the tuned table ``jaxquant/tuned/h200/weight_only.json`` (measured on an H200; see ``bench/weight_only``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant.pallas.common import check_fields, kernel_out, next_pow2, triton_call
from jaxquant.core import tuned
from jaxquant.core.device import NUM_SMS  # H100 / H200 SXM: 132
from jaxquant.core.weights import nibbles

__all__ = ["Config", "heuristics", "fit_block_k", "choose_split", "float32_dot_algorithm", "weight_only_matmul", "NUM_SMS", "MIN_GROUP", "supports"]


@dataclasses.dataclass(frozen=True)
class Config:
    """A ``[block_m, block_n]`` output tile, ``block_k`` (unpacked) k per loop step, K split ``split_k`` ways."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    fast_dequant: bool = True  # int4 on a GPU: the PTX nibble conversion (else shifts and converts)
    # int4 with 16-bit x: x's (even, odd) column pairs as one uint32 word each, split in registers
    # (no XLA copies of x's even / odd columns). None: for decode tiles (block_m == 16), whose x
    # tile feeds the warp-level dot from registers; wider tiles' wgmma reads x from shared memory,
    # where the split halves would be stored back (scripts/local_sass.py: STS in the loop).
    x_pairs: bool | None = None
    # M == 1: x's tile is its one row [1, BK], broadcast in registers to the dot's block_m rows
    # (all equal; only row 0 is stored), so x's pipeline buffers in shared memory hold one row,
    # not block_m rows of padding. None: whenever M == 1.
    row_bcast: bool | None = None

    def __post_init__(self):
        check_fields("weight_only", self, pow2=(("block_m", 16), ("block_n", 16), ("block_k", 16), "num_warps"),
                     positive=("split_k", "num_stages"))

    def tag(self) -> str:
        """Compact form for tables: ``BMxBNxBK/sSPLIT/wWARPS/stSTAGES``."""
        return (f"{self.block_m}x{self.block_n}x{self.block_k}/s{self.split_k}/w{self.num_warps}"
                f"/st{self.num_stages}{'' if self.fast_dequant else '/shift'}"
                f"{'' if self.x_pairs is None else '/pairs' if self.x_pairs else '/slices'}"
                f"{'' if self.row_bcast is None else '/bcast' if self.row_bcast else '/rows'}")


# ----------------------------------------------------------------------------------------
# heuristics over the tuned table
# ----------------------------------------------------------------------------------------

def choose_split(total_steps: int, bk: int, group_size: int | None, want: int) -> int:
    """Largest ``s <= want`` cutting the K steps into equal runs that are whole groups."""
    best = 1
    for s in range(1, max(1, min(want, total_steps)) + 1):
        if total_steps % s == 0 and (group_size is None or (total_steps // s * bk) % group_size == 0):
            best = s
    return best


def heuristics(m: int, n: int, k: int, bits: int, group_size: int | None, *, num_sms: int = NUM_SMS,
               device_kind: str | None = None) -> Config:
    """Pure function: the Config for ``x [m, k] @ W[n, k]^T`` with ``bits``-bit weights.

    Picks the tuned tile for M's bucket (first row of the table with ``m <= m_max`` and matching
    ``bits``, 0 = any), fits the tile to the shape (no larger than needed; ``block_k`` a multiple
    or divisor of the group size and a divisor of K when possible) and, when the tile grid
    has fewer than ~2 programs per SM, splits K (a divisor of the number of K steps) so the whole
    GPU streams weights.
    """
    table = tuned.table("weight_only", device_kind)["table"]
    row = next(r for r in table if m <= r["m_max"] and r["bits"] in (0, bits))
    c = dict(row["config"])
    bm = max(16, min(c["block_m"], next_pow2(m)))
    bn = max(16, min(c["block_n"], next_pow2(n)))
    bk = fit_block_k(c["block_k"], k, group_size)
    steps = pl.cdiv(k, bk)
    tiles = pl.cdiv(m, bm) * pl.cdiv(n, bn)
    split = 1
    target = c.get("programs", 2 * num_sms)
    if k % bk == 0 and tiles < target:
        split = choose_split(steps, bk, group_size, min(pl.cdiv(target, tiles), c.get("max_split", 16)))
    return Config(bm, bn, bk, split, c["num_warps"], c["num_stages"])


def fit_block_k(bk: int, k: int, group_size: int | None) -> int:
    """``bk`` adjusted to K and the group size (a power of two >= 16)."""
    bk = max(16, min(bk, next_pow2(k)))
    if group_size is not None:
        # a multiple of the group size dividing K, or a divisor of the group size
        if bk >= group_size:
            while bk > group_size and k % bk:
                bk //= 2
        return bk
    # per channel: prefer a divisor of K (no K masking), but not below 64
    b = bk
    while b > 64 and k % b:
        b //= 2
    return b if k % b == 0 else bk


# ----------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------


def _unpack_parts(b, bits, symmetric):
    """int8 bytes ``[BN, W]`` -> the code parts: ``[q]`` (bits=8) or ``[low nibbles, high nibbles]`` (int8).

    The low nibble of byte j is k = 2j, the high nibble k = 2j + 1: they contract against x's even
    and odd columns (split off x by the wrapper), so no in-register interleave is needed.
    """
    if bits == 8:
        return [b]
    return list(nibbles(b, signed=symmetric))


def _half_bits(v: float, dt) -> int:
    """The 16-bit pattern of ``v`` in ``dt`` (bfloat16 / float16), as an int."""
    return int(np.asarray(v, dtype=dt).view(np.uint16))


def _int4_ptx(b, off, *, symmetric: bool, dt):
    """int4 bytes -> (low, high) nibble values ``q - z`` in ``dt`` (bfloat16/float16), exact, in PTX.

    Per 32-bit register of 4 bytes (8 weights), 12 integer/half2 instructions instead of ~5 an
    element (two asm blocks, one per nibble): ``prmt`` spreads bytes b0, b1 (b2, b3) into the two 16-bit halves; ``lop3`` computes
    ``(t & 0x000F000F) ^ MAGIC`` which is the half-precision number ``B + u`` with
    ``B = 128`` (bfloat16, 7 mantissa bits) or ``1024`` (float16, 10) and ``u`` the nibble
    (XOR 8 turns a two's-complement nibble v into u = v + 8); the high nibbles are the same after a
    4-bit shift; one ``fma.rn`` ``(B + u) * 1 - (B + z)`` per pair gives ``u - z`` exactly
    (``z = 8`` symmetric; |u - z| <= 15, ``B + z`` <= 143 / 1039 are exact in ``dt``).
    ``off`` is ``-(B + z)`` in ``dt`` broadcast to ``b``'s shape (None: symmetric, a constant).
    """
    bf = np.dtype(dt) == np.dtype(jnp.bfloat16)
    base = 128 if bf else 1024
    magic = _half_bits(base, dt) | (8 if symmetric else 0)
    one = _half_bits(1.0, dt)
    op = "fma.rn.bf16x2" if bf else "fma.rn.f16x2"
    if off is None:
        neg = _half_bits(-(base + 8), dt)
        offs = f"mov.b32 o0, {neg | neg << 16:#010x}; mov.b32 o1, o0;"
        args = [b]
    else:
        offs = "mov.b32 o0, $3; mov.b32 o1, $4;"
        args = [b, off]
    cons = "=r,=r,r" + (",r,r" if off is not None else "")
    out = kernel_out(b.shape, dt)
    parts = []
    # one asm per nibble (Pallas lowers single-result inline asm only): $0, $1 = the 4 results as
    # two half2 registers, $2 = the 4 bytes, $3, $4 = the offsets as two half2 registers
    for shift in ("", "shr.u32 t0, t0, 4; shr.u32 t1, t1, 4;"):
        asm = "\n".join([
            "{",
            ".reg .b32 t0, t1, one, o0, o1, mk, mg, zr;",
            f"mov.b32 one, {one | one << 16:#010x};",
            f"mov.b32 mg, {magic | magic << 16:#010x};",
            "mov.b32 mk, 0x000f000f;",
            "mov.b32 zr, 0;",
            offs,
            "prmt.b32 t0, $2, zr, 0x4140;",
            "prmt.b32 t1, $2, zr, 0x4342;",
            shift,
            "lop3.b32 t0, t0, mk, mg, 0x6a;",
            "lop3.b32 t1, t1, mk, mg, 0x6a;",
            f"{op} $0, t0, one, o0;",
            f"{op} $1, t1, one, o1;",
            "}",
        ])
        parts.append(pltriton.elementwise_inline_asm(asm, args=args, constraints=cons, pack=4,
                                                     result_shape_dtypes=[out])[0])
    return parts


_F32_MAGIC = 1 << 23  # float32 2**23: its ulp is 1, so bits 0x4B000000 | u are the number 2**23 + u


def _int4_f32_ptx(b, *, symmetric: bool):
    """int4 bytes -> (low, high) nibbles as float32 ``2**23 + u`` (exact; subtract ``2**23 + z`` for q - z).

    ``bfe.u32`` extracts each nibble of the 4-byte register, ``xor`` with ``0x4B000000`` (``| 8`` for
    two's-complement nibbles, which maps v to u = v + 8) makes the float32 ``2**23 + u``: two
    integer instructions an element instead of shifts and a quarter-rate integer-to-float convert.
    """
    mg = 0x4B000000 | (8 if symmetric else 0)
    out = kernel_out(b.shape, jnp.float32)
    parts = []
    for first in (0, 4):
        lines = ["{", ".reg .b32 t<4>;"]
        lines += [f"bfe.u32 t{i}, $4, {first + 8 * i}, 4;" for i in range(4)]
        lines += [f"xor.b32 t{i}, t{i}, {mg:#010x};" for i in range(4)]
        lines += [f"mov.b32 ${i}, t{i};" for i in range(4)]
        lines.append("}")
        parts.append(pltriton.elementwise_inline_asm("\n".join(lines), args=[b], constraints="=f,=f,=f,=f,r",
                                                     pack=4, result_shape_dtypes=[out])[0])
    return parts


def _dequant(wb, z, *, bits, symmetric, dt, fast):
    """Code bytes ``[BN, W]`` (and the zero point ``[BN, 1]`` int32 or None) -> the parts ``q - z`` in ``dt``."""
    if fast and bits == 4 and np.dtype(dt) == np.dtype(jnp.float32):
        off = jnp.float32(_F32_MAGIC + 8) if z is None else z.astype(jnp.float32) + jnp.float32(_F32_MAGIC)
        return [p - off for p in _int4_f32_ptx(wb, symmetric=symmetric and z is None)]
    if fast and bits == 4 and np.dtype(dt) in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
        off = None
        if z is not None:
            base = 128 if np.dtype(dt) == np.dtype(jnp.bfloat16) else 1024
            off = jnp.broadcast_to((-(z + base)).astype(jnp.float32).astype(dt), wb.shape)
        return _int4_ptx(wb, off, symmetric=symmetric and z is None, dt=dt)
    parts = _unpack_parts(wb, bits, symmetric)
    if z is not None:
        zf = z.astype(jnp.float32)
        return [(q.astype(jnp.float32) - zf).astype(dt) for q in parts]
    return [q.astype(dt) for q in parts]


def _pair_half(u, h, dt):
    """Half ``h`` (0: low = the even column, 1: high = the odd column) of uint32 pair words ``u``, as
    ``dt`` (a 16-bit float: the words are x's (even, odd) column pairs, little-endian)."""
    v = u if h == 0 else jnp.right_shift(u, jnp.uint32(16))
    return jax.lax.bitcast_convert_type(v.astype(jnp.uint16), dt)


def _kernel(*refs, n_x, x_pairs, row_bcast, bm, bn, bk, unit, steps, m_total, n_total, k_total, bits, group, symmetric, has_zp,
            has_bias, cdt, out_dtype, fast, f32_algorithm):
    x_refs = refs[:n_x]
    w_ref, s_ref = refs[n_x], refs[n_x + 1]
    rest = refs[n_x + 2:]
    z_ref = rest[0] if has_zp else None
    b_ref = rest[int(has_zp)] if has_bias else None
    o_ref = rest[-1]
    pn, pm = pl.program_id(0), pl.program_id(1)
    wdiv = 2 if bits == 4 else 1
    uw = unit // wdiv  # code bytes per row per unit = width of each x part
    sw = bk // wdiv  # code bytes per row per step
    mask_m = m_total % bm != 0
    mask_n = n_total % bn != 0
    mask_k = k_total % bk != 0  # only with split == 1 (per-channel weights)

    rmask = ((pm * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m_total) if mask_m else None
    nmask_col = ((pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)) < n_total) if mask_n else None
    nmask_1d = ((pn * bn + jax.lax.broadcasted_iota(jnp.int32, (bn,), 0)) < n_total) if mask_n else None

    def both(a, b):
        if a is None:
            return b
        return a if b is None else a & b

    def load(ref, mask, other):
        if mask is None:
            return ref[...]
        return pltriton.load(ref, mask=mask, other=other)

    def col(ref, g):  # column g of a per-(row, group) operand: [BN, 1]
        return load(ref.at[:, pl.ds(g, 1)], nmask_col, 0)

    dot_prec = f32_algorithm if cdt == np.dtype(np.float32) else None
    zc = load(z_ref, nmask_1d, 0)[:, None] if (group is None and has_zp) else None

    # acc[n, m] += (q - z)[n, k] . x[m, k]: the dequantized weights are the left (register) operand
    # of the tensor-core dot (wgmma takes it from registers); x's tile is the right (shared) one.
    # Offsets are built from products of Python ints so that Triton sees their divisibility and
    # vectorises the loads (a traced floor division hides it: byte-wide loads, no pipelining).
    units = bk // unit

    def group_params(t):
        """Per unit of step t: (its group's scale column, zero-point column or None)."""
        if group is None:
            return ()
        out = []
        for u in range(units):
            g = t * (bk // group) + u if bk >= group else t // (group // bk)
            out.append((col(s_ref, g), col(z_ref, g) if has_zp else None))
        return tuple(out)

    # The group parameters are loaded one step ahead (carried through the loop): Triton does not
    # pipeline these [BN, 1] loads, and a load used at once stalled every step on its latency.
    def body(t, carry):
        acc, params = carry
        nxt = group_params(jnp.minimum(t + 1, steps - 1))
        base = pl.multiple_of(t * sw, sw)
        for u in range(units):
            off = base + u * uw
            km = None
            if mask_k:
                km = (off + jax.lax.broadcasted_iota(jnp.int32, (1, uw), 1)) < k_total // wdiv
            wb = load(w_ref.at[:, pl.ds(off, uw)], both(nmask_col, km), 0)
            z = (params[u][1] if group is not None else zc) if has_zp else None
            ws = _dequant(wb, z, bits=bits, symmetric=symmetric, dt=cdt, fast=fast)
            xmask = km if row_bcast else both(rmask, km)
            if x_pairs:
                # one load of the (even, odd) column pairs, one uint32 word each; split in registers
                pw = load(x_refs[0].at[:, pl.ds(off, uw)], xmask, 0)
                xts = [_pair_half(pw, h, cdt) for h in (0, 1)]
            else:
                xts = [load(xr.at[:, pl.ds(off, uw)], xmask, 0).astype(cdt) for xr in x_refs]
            if row_bcast:
                xts = [jnp.broadcast_to(xt, (bm, uw)) for xt in xts]
            part = None
            for xt, w in zip(xts, ws):
                d = jax.lax.dot_general(w, xt, (((1,), (1,)), ((), ())), precision=dot_prec,
                                        preferred_element_type=jnp.float32)
                part = d if part is None else part + d
            if group is not None:
                part = part * params[u][0]
            acc = acc + part
        return acc, nxt

    acc, _ = jax.lax.fori_loop(0, steps, body, (jnp.zeros((bn, bm), jnp.float32), group_params(0)))
    if group is None:
        acc = acc * load(s_ref, nmask_1d, 0)[:, None]
    if has_bias:
        acc = acc + load(b_ref, nmask_1d, 0).astype(jnp.float32)[:, None]
    out = acc.T.astype(out_dtype)
    nmask_row = ((pn * bn + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)) < n_total) if mask_n else None
    omask = both(rmask, nmask_row)
    if omask is None:
        o_ref[...] = out
    else:
        pltriton.store(o_ref, out, mask=omask)


# Smallest group the kernel serves: a group is one tensor-core dot (per nibble half for int4) and a
# dot needs K >= 16. With 8-wide int4 halves (group 16) the float32 (TF32) dot returned wrong sums
# on an H200 (test_convert, w4a16-g16: off by 5); smaller groups take XLA's dequantize-then-dot.
MIN_GROUP = {4: 32, 8: 16}


def supports(bits: int, group_size: int | None) -> bool:
    """Whether the kernel serves this weight format (every per-channel format; groups >= MIN_GROUP)."""
    return group_size is None or group_size >= MIN_GROUP[bits]


_HIGH_PRECISIONS = ("high", "highest", "float32", "tensorfloat32_3x", "f32_f32_f32", "tf32_tf32_f32_x3")


def float32_dot_algorithm(interpret: bool = False):
    """The kernel's dot for float32 x, following ``jax.default_matmul_precision`` like XLA's float32
    matmuls on the GPU: by default one TF32 tensor-core product (x rounded to TF32, 11 significant
    bits; ``q - z`` is exact in TF32), which is what XLA runs for a float32 ``x @ w.T`` there; under
    ``"high"`` / ``"highest"`` / ``"float32"``, three TF32 products (x = x_big + x_small), accurate
    to ~2**-22 |x| |w| a product. (IEEE float32 dots run on the CUDA cores: 20-70x slower on an
    H200.) Interpret mode (CPU) computes exact float32 products."""
    if interpret:
        return jax.lax.Precision.HIGHEST
    p = jax.config.jax_default_matmul_precision
    if p is not None and str(p).lower() in _HIGH_PRECISIONS:
        return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32


def k_plan(cfg: Config, k: int, bits: int, group_size: int | None) -> tuple[int, int]:
    """``(block_k, split)`` a config runs with on K: ``block_k`` fitted to K and the group
    (``fit_block_k``; >= 32 for int4, whose nibble halves are >= 16-wide dots), and K split only
    into equal runs of whole steps and whole groups (1 when K has a ragged tail)."""
    bk = fit_block_k(cfg.block_k, k, group_size)
    if bits == 4:
        bk = max(bk, 32)  # each nibble half of a unit is a >= 16-wide dot
    if group_size is not None and not (bk % group_size == 0 or group_size % bk == 0):
        raise ValueError(f"weight_only: block_k={bk} must be a multiple or divisor of group_size={group_size}")
    split = 1 if k % bk else choose_split(pl.cdiv(k, bk), bk, group_size, cfg.split_k)
    return bk, split


def weight_only_matmul(x, codes, scale, zero_point=None, bias=None, *, bits: int, group_size: int | None,
                       symmetric: bool, k: int, config: Config | None = None, interpret: bool = False):
    """``x [M, K] @ dequant(codes, scale, zero_point)^T + bias`` in x's dtype (see the module doc).

    Inputs are assumed validated (``jaxquant.primitives.weight_only``).
    """
    if not supports(bits, group_size):
        raise ValueError(f"weight_only kernel: group_size={group_size} with bits={bits}: expected per-channel or "
                         f">= {MIN_GROUP[bits]} (weight_only_linear takes XLA's path for smaller groups)")
    m = x.shape[0]
    n = codes.shape[0]
    out_dtype = np.dtype(x.dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    if k == 0:
        y = jnp.zeros((m, n), jnp.float32)
        if bias is not None:
            y = y + bias.astype(jnp.float32)[None, :]
        return y.astype(out_dtype)
    cfg = config or heuristics(m, n, k, bits, group_size)
    bm = max(16, min(cfg.block_m, next_pow2(m)))
    bn = max(16, min(cfg.block_n, next_pow2(n)))
    bk, split = k_plan(cfg, k, bits, group_size)
    steps = pl.cdiv(k, bk) // split
    k_span = steps * bk
    unit = bk if group_size is None else min(bk, group_size)
    wdiv = 2 if bits == 4 else 1
    has_zp = zero_point is not None
    has_bias = bias is not None and split == 1
    cdt = np.dtype(x.dtype)

    grid = (pl.cdiv(n, bn), pl.cdiv(m, bm), split)
    # int4: x's even / odd columns meet the low / high nibbles (no interleave of the codes in
    # registers): as (even, odd) pair words split in the kernel, or as two XLA slices of x
    x_pairs = bits == 4 and cdt.itemsize == 2 and (bm == 16 if cfg.x_pairs is None else cfg.x_pairs)
    if bits == 8:
        xs = [x]
    elif x_pairs:
        # each (even, odd) column pair as one uint32 word: a bitcast of x, no copy
        xs = [jax.lax.bitcast_convert_type(x.reshape(m, k // 2, 2), jnp.uint32)]
    else:
        xs = [x[:, 0::2], x[:, 1::2]]
    row_bcast = m == 1 and cfg.row_bcast is not False
    in_specs = [pl.BlockSpec((1 if row_bcast else bm, k_span // wdiv), lambda i, j, s: (j, s)) for _ in xs]
    in_specs.append(pl.BlockSpec((bn, k_span // wdiv), lambda i, j, s: (i, s)))
    operands = xs + [codes]
    if group_size is not None:
        pspec = pl.BlockSpec((bn, k_span // group_size), lambda i, j, s: (i, s))
    else:
        pspec = pl.BlockSpec((bn,), lambda i, j, s: (i,))
    in_specs.append(pspec)
    operands.append(scale.astype(jnp.float32))
    if has_zp:
        in_specs.append(pspec)
        operands.append(zero_point.astype(jnp.int32))
    if has_bias:
        in_specs.append(pl.BlockSpec((bn,), lambda i, j, s: (i,)))
        operands.append(bias)
    if split == 1:
        out_shape = kernel_out((m, n), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (j, i))
        kdt = out_dtype
    else:
        out_shape = kernel_out((split, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, j, i))
        kdt = np.dtype(np.float32)
    kernel = functools.partial(
        _kernel, n_x=len(xs), x_pairs=x_pairs, row_bcast=row_bcast, bm=bm, bn=bn, bk=bk, unit=unit, steps=steps, m_total=m, n_total=n, k_total=k,
        bits=bits, group=group_size, symmetric=symmetric, has_zp=has_zp, has_bias=has_bias, cdt=cdt,
        out_dtype=kdt, fast=cfg.fast_dequant and not interpret, f32_algorithm=float32_dot_algorithm(interpret))
    y = triton_call(kernel, operands, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec, cfg=cfg,
                    interpret=interpret, name=f"jaxquant_weight_only_w{bits}")
    if split == 1:
        return y
    y = jnp.sum(y, axis=0)
    if bias is not None:
        y = y + bias.astype(jnp.float32)[None, :]
    return y.astype(out_dtype)
