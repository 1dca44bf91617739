"""Check and time the fp8 GEMM kernels on a GPU (H100 / H200), side by side with XLA.

    PYTHONPATH=. python tools/fp8_gpu_check.py [--quick] [--no-sweep] [--sweep-only] [--bound-probe]

For M in {1, 16, 128, 2048, 8192} and (N, K) in {(8192, 8192), (4096, 14336)} it runs

* ``triton-row`` / ``triton-block``: ``jaxquant.pallas.fp8_matmul.triton.fp8_matmul`` with per-token x
  per-channel scales / DeepSeek 1 x 128 x 128 x 128 block scales (heuristic config);
* ``mgpu-row`` / ``mgpu-block``: the Mosaic GPU kernel (Hopper, shapes it ``supports``);
* ``xla-fp8``: XLA's own fp8 dot (``lax.dot_general`` of float8_e4m3fn operands,
  ``preferred_element_type=float32``) with the same rowwise scales applied in XLA, bf16 out;
  ``xla-fp8-dot``: the bare dot (float32 out); ``bf16``: XLA's bf16 matmul ``x @ W^T``.

Every kernel's output is checked against the float64 oracle (``jaxquant.pallas.fp8_matmul.oracle``,
bound ``TENSOR_CORE_C``) on 16 sampled rows x 4 sampled 128-column blocks (XLA's fp8 result is
checked the same way, for information). Timing: compile, then n calls issued back to
back over 4 rotating input sets and one ``block_until_ready``; the median of 5 repeats. Small M
(<= 128) runs chains of 8 GEMMs over different weights in one jitted call and reports a GEMM's
share (one call is ~10 us of GPU time, less than the host's dispatch). Then, at 8192^3, a small
sweep of kernel configs. Prints a table and the targets (fp8 8192^3 >= 1300 TFLOP/s and >= XLA's
fp8; block-scaled >= 1200) and writes ``$OUT/fp8_gpu_check.json`` (or ``benchmarks/results/``).
Exits 1 if any check fails.

``--bound-probe`` instead measures the tensor-core error the bound's ``c`` rests on: every kernel
(Mosaic GPU configs, Triton), float32 outputs, 512 x 512 problems with K = 1152 / 4096, codes spread
over ``2**-10 .. 2**8`` ("wide") or normal, scales ``2**U(-12, 2)``; prints ``|err| / bound`` at
``c = 2**-10`` per case and the max / median per kernel and layout (``jaxquant.pallas.fp8_matmul.oracle``
gives the figures measured on an H100).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant.pallas.fp8_matmul import mosaic as FM
from jaxquant.pallas.fp8_matmul import oracle as O
from jaxquant.pallas.fp8_matmul import triton as FT
from jaxquant.core.device import device_kind, is_hopper, num_sms

E4M3 = jnp.float8_e4m3fn
FMAX = 448.0
INV_FMAX = np.float32(1 / FMAX)
TINY = np.float32(2.0**-126)
MS = (1, 16, 128, 2048, 8192)
NKS = ((8192, 8192), (4096, 14336))
SETS = 4  # rotating input sets
CHAIN = 8  # GEMMs a jitted call at M <= 128
TARGETS = {"row": 1300.0, "block": 1200.0}
BIG = (8192, 8192, 8192)  # the targets' shape (and the sweep's)
F32_CHECK_MS = (16, 2048)  # M at which each kernel is also checked with float32 outputs (the bound's c term)


# ------------------------------------------------------------------------------ inputs

def _quant_rows(x):
    """Dynamic per-row e4m3 quantization (the contract's rule): codes, float32 scale [rows, 1]."""
    s = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True) * INV_FMAX, TINY)
    return jnp.clip(x * (1 / s), -FMAX, FMAX).astype(E4M3), s


def _quant_blocks(x, rows: int):
    """e4m3 codes with one scale per ``rows x 128`` block: scales [R / rows, K / 128]."""
    r, k = x.shape
    xb = x.reshape(r // rows, rows, k // 128, 128)
    s = jnp.maximum(jnp.max(jnp.abs(xb), axis=(1, 3)) * INV_FMAX, TINY)
    q = jnp.clip(xb * (1 / s)[:, None, :, None], -FMAX, FMAX).astype(E4M3)
    return q.reshape(r, k), s


def make_set(i: int, m: int, n: int, k: int):
    """One input set: bf16 x [M, K] and W [N, K] and their fp8 codes and scales in both layouts."""
    kx, kw = jax.random.split(jax.random.key(1000 + i))
    x = jax.random.normal(kx, (m, k), jnp.float32)
    w = jax.random.normal(kw, (n, k), jnp.float32) * 0.02
    a_row, sa_row = _quant_rows(x)
    w_row, sw_row = _quant_rows(w)
    a_blk, sa_blk = _quant_blocks(x, 1)
    w_blk, sw_blk = _quant_blocks(w, 128)
    return dict(x=x.astype(jnp.bfloat16), w=w.astype(jnp.bfloat16),
                row=(a_row, w_row, sa_row, sw_row.reshape(n)), block=(a_blk, w_blk, sa_blk, sw_blk))


# ------------------------------------------------------------------------------ the candidates

def kernels(m: int, n: int, k: int, hopper: bool, out_dtype=jnp.bfloat16):
    """Our kernels: name -> (scale tag, function of (a, w, a_scale, w_scale))."""
    out = {}
    for layout, tag in (("rowwise", "row"), ("blockwise", "block")):
        out[f"triton-{tag}"] = (tag, lambda a, w, sa, sw, layout=layout: FT.fp8_matmul(
            a, w, sa, sw, layout=layout, out_dtype=out_dtype))
        cfg = FM.heuristics(m, n, k, layout=layout)
        if hopper and FM.supports(m, n, k, layout=layout, config=cfg):
            out[f"mgpu-{tag}"] = (tag, lambda a, w, sa, sw, layout=layout, cfg=cfg: FM.fp8_matmul_mgpu(
                a, w, sa, sw, layout=layout, out_dtype=out_dtype, config=cfg, num_sms=num_sms()))
    return out


def fns(m: int, n: int, k: int, hopper: bool):
    """name -> (scale tag or "bf16", function of one GEMM's operands): our kernels, then XLA's."""
    out = kernels(m, n, k, hopper)
    dims = (((1,), (1,)), ((), ()))

    def xla_fp8(a, w, sa, sw):
        acc = jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)
        return ((acc * sa) * sw[None, :]).astype(jnp.bfloat16)

    out["xla-fp8"] = ("row", xla_fp8)
    out["xla-fp8-dot"] = ("row", lambda a, w, sa, sw: jax.lax.dot_general(a, w, dims,
                                                                          preferred_element_type=jnp.float32))
    out["bf16"] = ("bf16", lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.bfloat16))
    return out


def pick(act, wset, tag):
    """The operands of one GEMM: the activation (and its scales) of set ``act``, the weight (and
    its scales) of set ``wset``."""
    if tag == "bf16":
        return act["x"], wset["w"]
    a, _, sa, _ = act[tag]
    _, w, _, sw = wset[tag]
    return a, w, sa, sw


def time_fn(f, tag, sets, chain: int, repeats: int, min_time: float):
    """Median seconds of one GEMM, and the first GEMM's output and operands.

    One jitted call runs ``chain`` GEMMs of one activation with successive weights; successive
    calls rotate over the input sets."""
    g = jax.jit(lambda calls: [f(*ops) for ops in calls])
    calls = [[pick(sets[c], sets[(c + j) % len(sets)], tag) for j in range(chain)] for c in range(len(sets))]
    first = g(calls[0])  # compile
    jax.block_until_ready(first)
    t0 = time.perf_counter()
    jax.block_until_ready(g(calls[1 % len(calls)]))
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(len(calls), min(200, int(min_time / one) + 1))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = None
        for i in range(n):
            r = g(calls[i % len(calls)])
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t0) / (n * chain))
    return statistics.median(times), first[0], calls[0][0]


def sample_check(y, ops, tag, rng):
    """Oracle check on 16 sampled rows x 4 sampled 128-column blocks: (ok, worst ratio)."""
    a, w, sa, sw = (np.asarray(v) for v in ops)
    y = np.asarray(y)
    m, n = y.shape
    rows = np.sort(rng.choice(m, size=min(16, m), replace=False))
    blocks = np.sort(rng.choice(n // 128, size=min(4, n // 128), replace=False))
    cols = (blocks[:, None] * 128 + np.arange(128)[None, :]).reshape(-1)
    sa_s = sa[rows] if sa.shape[0] == m else sa
    if tag == "row":
        sw_s, layout = sw[cols], "rowwise"
    else:
        sw_s, layout = sw[blocks], "blockwise"
    ok, ratio, _ = O.check(y[rows][:, cols], a[rows], w[cols], sa_s, sw_s, layout=layout)
    return ok, ratio


# ------------------------------------------------------------------------------ main

SWEEP = {  # 8192^3: a few configs around the heuristic's
    "triton-row": [FT.Config(128, 256, 128, group_m=16, num_warps=8, num_stages=3),
                   FT.Config(128, 128, 256, group_m=16, num_warps=8, num_stages=3),
                   FT.Config(256, 128, 128, group_m=16, num_warps=8, num_stages=3),
                   FT.Config(128, 128, 128, group_m=16, num_warps=4, num_stages=4)],
    "triton-block": [FT.Config(128, 128, 128, group_m=16, num_warps=8, num_stages=3),
                     FT.Config(128, 128, 128, group_m=16, num_warps=4, num_stages=4),
                     FT.Config(64, 128, 128, group_m=16, num_warps=4, num_stages=4)],
    "mgpu": [FM.Config(), FM.Config(grid_tile_width=16), FM.Config(grid_tile_width=4), FM.Config(minor_n=False),
             FM.Config(stages=3), FM.Config(stages=6, epi_n=64), FM.Config(epi_n=64),
             FM.Config(tile_m=64, part_m=None), FM.Config(tile_n=64, part_m=None)],
}


def run_sweep(sets, hopper, repeats, min_time, rows_out, deadline):
    m, n, k = BIG
    cands = [(f"triton-row", "row", c, lambda a, w, sa, sw, c=c: FT.fp8_matmul(
        a, w, sa, sw, out_dtype=jnp.bfloat16, config=c)) for c in SWEEP["triton-row"]]
    cands += [(f"triton-block", "block", c, lambda a, w, sa, sw, c=c: FT.fp8_matmul(
        a, w, sa, sw, layout="blockwise", out_dtype=jnp.bfloat16, config=c)) for c in SWEEP["triton-block"]]
    if hopper:
        for layout, tag in (("rowwise", "row"), ("blockwise", "block")):
            cands += [(f"mgpu-{tag}", tag, c, lambda a, w, sa, sw, c=c, layout=layout: FM.fp8_matmul_mgpu(
                a, w, sa, sw, layout=layout, out_dtype=jnp.bfloat16, config=c, num_sms=num_sms()))
                for c in SWEEP["mgpu"] if FM.supports(m, n, k, layout=layout, config=c)]
    for name, tag, cfg, f in cands:
        if time.perf_counter() > deadline:
            print(f"  sweep: time budget spent, skipping the rest")
            break
        rec = dict(kind="sweep", kernel=name, m=m, n=n, k=k, config=repr(cfg))
        try:
            t = time_fn(f, tag, sets, 1, repeats, min_time)[0]
            rec.update(ms=t * 1e3, tflops=2 * m * n * k / t / 1e12)
            print(f"  sweep {name:13s} {rec['tflops']:7.0f} TFLOP/s  {cfg}")
        except Exception as e:  # a config that does not compile is a finding, not a crash
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"  sweep {name:13s} ERROR {rec['error'][:200]}")
        rows_out.append(rec)


def run_problem(m, n, k, sets, hopper, repeats, min_time, rng, failures):
    """Time and check every candidate on one problem; print its table rows, return its records."""
    chain = CHAIN if m <= 128 else 1
    res = {}
    for name, (tag, f) in fns(m, n, k, hopper).items():
        rec = dict(kind="gemm", kernel=name, m=m, n=n, k=k)
        where = f"{name} M={m} N={n} K={k}"
        try:
            t, y, ops = time_fn(f, tag, sets, chain, repeats, min_time)
            rec.update(ms=t * 1e3, tflops=2 * m * n * k / t / 1e12, chain=chain)
            if name not in ("bf16", "xla-fp8-dot"):
                ok, ratio = sample_check(y, ops, tag, rng)
                rec.update(check_ok=bool(ok), check_ratio=float(ratio))
                if not ok and not name.startswith("xla"):  # XLA's result is checked for information
                    failures.append(f"{where}: |err|/bound = {ratio:.3g}")
            if m in F32_CHECK_MS and name in kernels(m, n, k, hopper):
                # float32 outputs: the accumulation's error, not hidden by bfloat16's rounding
                y32 = jax.jit(kernels(m, n, k, hopper, jnp.float32)[name][1])(*ops)
                ok32, ratio32 = sample_check(y32, ops, tag, rng)
                rec.update(check_f32_ok=bool(ok32), check_f32_ratio=float(ratio32))
                if not ok32:
                    failures.append(f"{where} (float32 out): |err|/bound = {ratio32:.3g}")
        except Exception as e:  # a kernel that fails is a finding: record it, go on with the others
            rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
            failures.append(f"{where}: {rec['error'][:200]}")
            traceback.print_exc(limit=3)
        res[name] = rec
    base = res.get("bf16", {}).get("ms")
    for name, rec in res.items():
        if "error" in rec:
            print(f"{m:5d} {n:6d} {k:6d} {name:13s} ERROR {rec['error'][:120]}")
            continue
        rec["x_bf16"] = base / rec["ms"] if base else None
        chk = "" if "check_ok" not in rec else ("ok " if rec["check_ok"] else "FAIL ") + f"{rec['check_ratio']:.2g}"
        if "check_f32_ratio" in rec:
            chk += f" f32 {rec['check_f32_ratio']:.2g}"
        print(f"{m:5d} {n:6d} {k:6d} {name:13s} {rec['ms']:9.4f} {rec['tflops']:8.0f} {rec['x_bf16'] or 0:7.2f} "
              f"{chk:>22}")
    return list(res.values())


def bound_probe(budget: float) -> int:
    """``--bound-probe`` (module docstring)."""
    t0 = time.perf_counter()
    cands = {"mgpu": FM.Config(), "mgpu-n64": FM.Config(tile_n=64, part_m=None), "triton": None}
    res = {}
    for seed in range(64):
        if time.perf_counter() - t0 > budget:
            break
        rng = np.random.default_rng(seed)
        k = 1152 if seed % 2 else 4096
        for wide in (True, False):
            def codes(shape):
                x = rng.standard_normal(shape) * (2.0 ** rng.integers(-10, 8, size=shape) if wide else 16.0)
                return jnp.asarray(np.clip(x, -FMAX, FMAX), jnp.float32).astype(E4M3)
            a, w = codes((512, k)), codes((512, k))
            for layout in FT.LAYOUTS:
                u = lambda *shape: jnp.asarray(2.0 ** rng.uniform(-12, 2, size=shape), jnp.float32)
                sa, sw = (u(512, 1), u(512)) if layout == "rowwise" else (u(512, k // 128), u(4, k // 128))
                for name, cfg in cands.items():
                    if cfg is None:
                        y = FT.fp8_matmul(a, w, sa, sw, layout=layout, out_dtype=jnp.float32)
                    else:
                        y = FM.fp8_matmul_mgpu(a, w, sa, sw, layout=layout, out_dtype=jnp.float32, config=cfg)
                    ratio = O.check(y, a, w, sa, sw, layout=layout, c=2.0**-10)[1]
                    res.setdefault((name, layout, "wide" if wide else "normal"), []).append(ratio)
                    print(f"seed {seed} K {k} {name} {layout} {'wide' if wide else 'normal'}: {ratio:.3g}", flush=True)
    for key, v in sorted(res.items()):
        print(*key, f"n {len(v)} max {max(v):.3g} median {statistics.median(v):.3g}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="M in {16, 2048} on 8192^2 only, 3 repeats")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--bound-probe", action="store_true", help="measure the tensor-core error (module docstring)")
    p.add_argument("--sweep-only", action="store_true", help="only the config sweep at 8192^3 (no problem table)")
    p.add_argument("--budget", type=float, default=280.0,
                   help="seconds; problems and sweep configs not started by then are skipped (default 280)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    kind = device_kind()
    if kind is None:
        print("no GPU visible: this script times the kernels on a GPU", file=sys.stderr)
        return 2
    hopper = is_hopper(kind)
    if args.bound_probe:
        return bound_probe(args.budget)
    repeats, min_time = (3, 0.02) if args.quick else (5, 0.05)
    ms, nks = ((16, 2048), NKS[:1]) if args.quick else (MS, NKS)
    rng = np.random.default_rng(0)
    rows, failures = [], []
    print(f"device {kind} ({num_sms()} SMs), jax {jax.__version__}, hopper={hopper}")
    print(f"{'M':>5} {'N':>6} {'K':>6} {'kernel':13s} {'ms':>9} {'TFLOP/s':>8} {'x bf16':>7} {'check (err/bound)':>22}")
    big_sets = None
    # the targets' shape first, so that it is measured whatever the time budget leaves
    problems = sorted(((m, n, k) for n, k in nks for m in ms), key=lambda p: p != BIG)
    if args.sweep_only:
        print("config sweep at 8192^3:")
        run_sweep([make_set(i, *BIG) for i in range(SETS)], hopper, 3, min_time, rows, start + args.budget)
        problems = []
    deadline = start + args.budget
    for m, n, k in problems:
        if time.perf_counter() > deadline:
            print(f"{m:5d} {n:6d} {k:6d} skipped: time budget ({args.budget:.0f} s) spent")
            rows.append(dict(kind="skipped", m=m, n=n, k=k))
            continue
        sets = [make_set(i, m, n, k) for i in range(SETS)]
        rows += run_problem(m, n, k, sets, hopper, repeats, min_time, rng, failures)
        if (m, n, k) == BIG:
            big_sets = sets
        del sets
    if big_sets is not None and not args.no_sweep:
        print("config sweep at 8192^3:")
        run_sweep(big_sets, hopper, 3, min_time, rows, deadline)

    # targets at 8192^3
    summary = {}
    at = {r["kernel"]: r for r in rows if r["kind"] == "gemm" and (r["m"], r["n"], r["k"]) == BIG
          and "tflops" in r}
    sweep_best = {}
    for r in rows:
        if r["kind"] == "sweep" and "tflops" in r:
            tag = r["kernel"].split("-")[1]
            sweep_best[tag] = max(sweep_best.get(tag, 0), r["tflops"])
    if at:
        xla = at.get("xla-fp8", {}).get("tflops", 0)
        for tag in ("row", "block"):
            best = max([at[nm]["tflops"] for nm in (f"triton-{tag}", f"mgpu-{tag}") if nm in at] or [0])
            meets = best >= TARGETS[tag] and (tag == "block" or best >= xla)
            summary[tag] = dict(best_default_tflops=best, best_sweep_tflops=sweep_best.get(tag),
                                target_tflops=TARGETS[tag], meets=meets)
        summary["xla_fp8_tflops"] = xla
        print("targets at 8192^3 (default configs): "
              + ", ".join(f"{t}: {summary[t]['best_default_tflops']:.0f} TFLOP/s (target {TARGETS[t]:.0f}"
                          f"{' and >= XLA fp8 ' + format(xla, '.0f') if t == 'row' else ''}) "
                          f"{'MET' if summary[t]['meets'] else 'missed'}" for t in ("row", "block")))
    meta = dict(device=kind, num_sms=num_sms(), jax=jax.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                seconds=round(time.perf_counter() - start, 1), method=f"median of {repeats}, {SETS} rotating sets, "
                f"chains of {CHAIN} at M <= 128", bound_c=O.TENSOR_CORE_C)
    out_dir = os.environ.get("OUT") or os.path.join("benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fp8_gpu_check.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, summary=summary, failures=failures, rows=rows), fh, indent=1)
    print(f"wrote {path} ({meta['seconds']} s)")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
