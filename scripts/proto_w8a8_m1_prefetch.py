"""Prototype (not library code): W8A8 at M = 1 in ONE GEMM kernel that quantizes the activation
itself, with the program's weights requested BEFORE the activation's statistics.

Question (#3, decode >= 1.8x bf16): the per-layer profile (session 9, ``diag_profile.py``) of
8192^2 at M = 1 is quantize 2.3 us + int8 GEMM 17.5 us (3.83 TB/s) + a shared split-K sum; bf16
takes 33.7 us, so 1.8x needs <= 18.7 us: the separate quantization launch is what is over. The
library's in-kernel ``a_mode="dynamic"`` (session 4) was slower than two launches: every program
first walked the whole row in 256-wide pipelined steps for its statistics (a chain of dependent
L2 round trips), and only then did its weights start to stream.

Here a program (one ``[bn, run]`` weight block, K split into ``K / run`` runs):

1. issues the load of its whole weight block (registers; no loop, no pipeline),
2. loads x's whole row in one wide masked load (L2 after the first program) and reduces
   ``amax`` (NaN-propagating integer max of |x|'s bits) while the weights are in flight,
3. computes ``s = max(amax / 127, tiny)``, ``inv = rcp.rn(s)``, quantizes its ``run`` of the row
   (``rne``, clamp, NaN -> -128: the library's rule), broadcast to the dot's 16 rows,
4. one int8 dot, int32 partial ``[split, 1, N]``; the scale goes out for XLA's epilogue
   (``jaxquant.reference.int8_epilogue`` on the exact int32 sum), as the library's split-K path.

Result must equal ``jaxquant.quantized_linear`` bit for bit (checked per variant).

Result (H200, session 9, ``benchmarks/results/session9/w8a8_m1_prefetch.json``): bit-exact, but by
kernel time 0.65-0.84x the library's two kernels on 8192^2 / 4096x14336 / 14336x4096 (0.94-1.10x
on 4096^2): unpipelined, the weights stream at ~2.6 TB/s. Kept in git only.
Usage (H100 / H200): ``PYTHONPATH=. python3 scripts/proto_w8a8_m1_prefetch.py OUT``: per shape,
chained timing (the bench's method) and the kernels' GPU time through PyTorch's CUPTI profiler
(``diag_profile.kernels``), for bf16, the library and each variant; writes
``OUT/w8a8_m1_prefetch.json``. On the CPU: ``--check`` runs every variant in interpret mode on
small shapes against the library, ``--lower`` lowers the real shapes for CUDA.
"""
import functools
import json
import os
import sys

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxquant import reference as ref
from jaxquant.pallas.common import abs_max_bits, bits_to_float, next_pow2, recip, rne, to_code

TINY = float(np.finfo(np.float32).tiny)


def _kernel(x_ref, w_ref, o_ref, s_ref, *, k, kp, run, w_first, fast):
    f32 = jnp.float32
    if w_first:
        w = w_ref[...]  # [bn, run] int8: requested before the statistics
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, kp), 1)
    xr = x_ref[...] if kp == k else pltriton.load(x_ref, mask=cols < k, other=0)
    amax = bits_to_float(jnp.max(abs_max_bits(xr.astype(f32)), axis=1, keepdims=True))  # [1, 1], NaN kept
    t = amax * jnp.asarray(np.float32(1 / 127), f32)
    a_scale = jnp.where(t < TINY, jnp.asarray(TINY, f32), t)  # NaN stays NaN
    inv = recip(a_scale, fast)
    off = pl.multiple_of(pl.program_id(1) * run, run)
    xs = x_ref[:, pl.ds(off, run)].astype(f32)
    q = to_code(rne(xs * inv, fast), -128, 127, fast).astype(jnp.int8)
    qb = jnp.broadcast_to(q, (16, run))
    if not w_first:
        w = w_ref[...]
    acc = jax.lax.dot_general(qb, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)  # [16, bn]
    rows = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 0)
    pltriton.store(o_ref, acc, mask=rows < 1)
    s_ref[...] = a_scale


def linear_m1(x, codes, w_scale, *, bn=128, run=512, num_warps=4, w_first=True, interpret=False):
    """W8A8 ``x [1, K] @ W^T`` (dynamic per-token int8 x, int8 W ``[N, K]``, scale ``[N]``)."""
    m, k = x.shape
    n = codes.shape[0]
    assert m == 1 and k % run == 0 and n % bn == 0, (x.shape, codes.shape, bn, run)
    split = k // run
    kp = next_pow2(k)
    kern = functools.partial(_kernel, k=k, kp=kp, run=run, w_first=w_first, fast=not interpret)
    parts, s = pl.pallas_call(
        kern,
        out_shape=(jax.ShapeDtypeStruct((split, 1, n), jnp.int32), jax.ShapeDtypeStruct((1, 1), jnp.float32)),
        grid=(n // bn, split),
        in_specs=[pl.BlockSpec((1, kp), lambda j, s: (0, 0)), pl.BlockSpec((bn, run), lambda j, s: (j, s))],
        out_specs=(pl.BlockSpec((None, 16, bn), lambda j, s: (s, 0, j)), pl.BlockSpec((1, 1), lambda j, s: (0, 0))),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxquant_w8a8_m1_prefetch_proto",
    )(x, codes)
    acc = jnp.sum(parts, axis=0)  # int32, exact
    return ref.int8_epilogue(acc, s, w_scale, None, x.dtype)


SHAPES = [(8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)]
VARIANTS = [dict(bn=bn, run=run, num_warps=w, w_first=f)
            for bn, run, w in ((128, 512, 4), (64, 512, 4), (64, 1024, 4), (128, 1024, 8), (32, 1024, 2),
                               (64, 256, 2), (128, 256, 4), (256, 512, 8))
            for f in (True,)] + [dict(bn=128, run=512, num_warps=4, w_first=False)]


def _fits(kw, n, k):
    return k % kw["run"] == 0 and n % kw["bn"] == 0


def main(out):
    import jaxquant as jq
    from jaxquant.bench.harness import CHAIN_LAYERS, chain, timeit
    sys.path.insert(0, os.path.dirname(__file__))
    import torch
    from diag_profile import kernels

    torch.zeros(1, device="cuda")
    os.makedirs(out, exist_ok=True)
    rows = []

    def measure(f, args):
        t = timeit(f, [args]) / CHAIN_LAYERS * 1e6
        try:
            ks = kernels(f, args)
        except Exception as e:  # the profiler is an extra
            print("profiler failed:", str(e)[:200])
            ks = []
        return t, sum(r["us"] for r in ks) / CHAIN_LAYERS, len(ks)

    for n, k in SHAPES:
        key = jax.random.PRNGKey(n + k)
        ws = [(jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
              for i in range(CHAIN_LAYERS)]
        qws = [jq.quantize_weight(w, bits=8) for w in ws]
        xs = tuple(jax.random.normal(jax.random.PRNGKey(100 + i), (1, k), jnp.bfloat16) for i in range(CHAIN_LAYERS))
        tb, kb, _ = measure(chain(lambda x, w: x @ w.T), (xs, *((w,) for w in ws)))
        lib = jax.jit(lambda x, qw: jq.quantized_linear(x, qw))
        tl, kl, _ = measure(chain(lib), (xs, *((q,) for q in qws)))
        want = np.asarray(lib(xs[0], qws[0]), np.float32)
        print(f"{n}x{k}: bf16 {tb:.1f} us ({kb:.1f} kernels), library {tl:.1f} ({kl:.1f})", flush=True)
        for kw in VARIANTS:
            if not _fits(kw, n, k):
                continue
            row = dict(shape=[1, n, k], kw=kw, bf16_us=tb, bf16_kernel_us=kb, library_us=tl, library_kernel_us=kl)
            try:
                f = jax.jit(lambda x, qw, kw=kw: linear_m1(x, qw.codes, qw.scale, **kw))
                got = np.asarray(f(xs[0], qws[0]), np.float32)
                row.update(bit_exact=bool(np.array_equal(got, want, equal_nan=True)), mismatches=int(np.sum(got != want)))
                t, kt, nk = measure(chain(f), (xs, *((q,) for q in qws)))
                row.update(us=t, kernel_us=kt, kernels=nk, vs_bf16=tb / t, vs_bf16_kernels=kb / kt,
                           vs_library_kernels=kl / kt)
            except Exception as e:  # report, do not stop the sweep
                row.update(error=str(e)[:400])
            print({a: (round(v, 3) if isinstance(v, float) else v) for a, v in row.items() if a not in ("shape",)},
                  flush=True)
            rows.append(row)
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                      open(os.path.join(out, "w8a8_m1_prefetch.json"), "w"), indent=1)


def check():
    """Interpret mode on small shapes, edge rows included, against the library (CPU)."""
    import jaxquant as jq
    rng = np.random.default_rng()
    for n, k, run, bn in ((64, 1024, 256, 32), (32, 768, 256, 32), (64, 512, 512, 64)):
        w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32) * 0.02
        qw = jq.quantize_weight(w, bits=8)
        base = rng.standard_normal((1, k)).astype(np.float32)
        cases = {"random": base, "zero": np.zeros_like(base), "ties": np.round(base * 8) / 8 + 0.5,
                 "inf": np.where(np.arange(k) == 3, np.inf, base), "nan": np.where(np.arange(k) == 5, np.nan, base)}
        for name, xv in cases.items():
            for dt in (jnp.float32, jnp.bfloat16):
                x = jnp.asarray(xv, dt)
                got = np.asarray(linear_m1(x, qw.codes, qw.scale, bn=bn, run=run, interpret=True), np.float32)
                want = np.asarray(jq.quantized_linear(x, qw), np.float32)
                assert np.array_equal(got, want, equal_nan=True), (n, k, name, dt, np.sum(got != want))
    print("interpret mode: bit-exact against quantized_linear")


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
    elif sys.argv[1:] == ["--lower"]:
        import jaxquant as jq
        S = jax.ShapeDtypeStruct
        for n, k in SHAPES:
            qw = jax.eval_shape(lambda w: jq.quantize_weight(w, bits=8), S((n, k), jnp.float32))
            for kw in VARIANTS:
                if _fits(kw, n, k):
                    f = jax.jit(lambda x, qw, kw=kw: linear_m1(x, qw.codes, qw.scale, **kw))
                    txt = f.trace(S((1, k), jnp.bfloat16), qw).lower(lowering_platforms=("cuda",)).as_text()
                    assert "jaxquant_w8a8_m1_prefetch_proto" in txt
        print("lowered for CUDA")
    else:
        main(sys.argv[1])
