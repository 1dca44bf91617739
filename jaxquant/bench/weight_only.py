"""Benchmarks of ``weight_only_linear`` (W4A16 / W8A16) against XLA's bf16 matmul and plain jnp
(method and targets: docs/performance.md).

For each variant (W4A16 group 128, W4A16 per channel, W8A16 per channel), shape ``(N, K)`` from
``jaxquant.shapes`` and token count M, one run times, side by side:

* ours: ``weight_only_linear(x, qweight)`` (the fused Pallas kernel on a GPU: Triton, or the
  Mosaic GPU prefill kernel on Hopper where ``use_mgpu`` picks it; ``config`` names the tile in use),
* ``bf16``: XLA's ``x @ w.T`` with ``w`` bfloat16 ``[N, K]`` (what a bf16 model runs),
* ``jnp``: plain jnp dequantize-then-matmul under ``jax.jit`` (``dequantize_weight`` in bf16,
  then ``x @ w.T``: what a JAX user writes today without a fused kernel).

Weight sets are rotated (``harness.rotations``) so weights stream from HBM, not L2. Each op is timed
twice: one jitted call per layer (``ms``, ``vs_bf16``, ``vs_jnp``: docs/performance.md's method),
and as a chain of ``chain_layers`` layers with distinct weights inside ONE jitted call (``chain_ms`` per
layer, ``vs_bf16_chain``, ``vs_jnp_chain``, ``gbps``): the GPU time per layer, as in a model's
jitted forward. At decode a single-layer call is bound by the host's dispatch (~25 us a call on
the H200: a bf16 4096x4096 GEMV took 27 us per call and 12 us per layer in a chain), so the
per-call ratios there compare two dispatch floors; targets are judged on the chain ratios.
A chain has enough layers to stream >= 512 MiB of bf16 weights (``harness.chain_layers``, 4 to 32):
the dispatch of one jitted call must stay below its GPU time, which 4-layer chains of 4096x4096
decode layers did not (per-layer time against chain length 4..32 on an H200, jax 0.11.2,
2026-11-21).
Also reported: ``tops`` (2*M*N*K / chain time), ``gbps`` (weight bytes + x + y per chain time:
the weight stream dominates at decode), ``copy_frac`` (gbps / device copy bandwidth).
Targets (H200): W4A16 g128 on 8192x8192 and 4096x14336 >= 3.0x bf16 at M <= 16 (and >= 8x plain
jnp), >= 1.5x at M = 128..512, >= 0.9x at M >= 2048; W8A16 per channel >= 1.8x at M <= 16.

``python -m jaxquant.bench.weight_only --sweep --out DIR`` times a grid of kernel tiles on the
decode and prefill shapes (the source of ``jaxquant/tuned/h200/weight_only.json``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import shapes
from jaxquant.bench import harness
from jaxquant.bench.harness import Context, chain, chain_layers, nbytes, rotations, timeit
from jaxquant.pallas.weight_only import triton as K
from jaxquant.primitives.weight_only.api import weight_only_linear
from jaxquant.primitives.weight_only.primitive import kernel_config
from jaxquant.primitives.weights import dequantize_weight, quantize_weight

M_LIST = [1, 16, 64, 128, 512, 2048, 8192]
TARGET_NK = [(8192, 8192), (4096, 14336)]
VARIANTS = [("W4A16-g128", 4, 128), ("W4A16-perchannel", 4, None), ("W8A16-perchannel", 8, None)]


def _target(variant, nk, m):
    """(description, ratio needed vs bf16, ratio needed vs jnp) or None where docs/performance.md sets
    none."""
    if variant == "W4A16-g128" and tuple(nk) in TARGET_NK:
        if m <= 16:
            return ">= 3.0x bf16, >= 8x jnp", 3.0, 8.0
        if 128 <= m <= 512:
            return ">= 1.5x bf16", 1.5, None
        if m >= 2048:
            return ">= 0.9x bf16", 0.9, None
    if variant == "W8A16-perchannel" and m <= 16:
        return ">= 1.8x bf16", 1.8, None
    return None


def _plan(ctx: Context):
    """(variant, bits, group, (N, K), [M...]) to run."""
    if ctx.quick:
        return [(v, b, g, (256, 512), [1, 16]) for v, b, g in VARIANTS]
    plan = [("W4A16-g128", 4, 128, nk, M_LIST) for nk in TARGET_NK]
    plan += [("W4A16-g128", 4, 128, nk, [1, 16, 128, 2048]) for nk in shapes.LINEAR_NK if nk not in TARGET_NK]
    for v, b, g in VARIANTS[1:]:
        plan += [(v, b, g, nk, [1, 16, 128, 2048]) for nk in TARGET_NK]
    return plan


def _weights(n, k, count, seed=0):
    key = jax.random.PRNGKey(seed)
    return [(jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
            for i in range(count)]


def run(ctx: Context) -> list[dict]:
    rows = []
    auto = "interpret" if ctx.platform == "cpu" else "auto"
    min_time = 0.01 if ctx.quick else 0.03
    for variant, bits, group, (n, k), ms in _plan(ctx):
        qbytes = n * k * bits // 8 + n * (k // (group or k)) * 4
        # One weight set per chained layer (harness.chain_layers: enough that the host's dispatch does
        # not bound the chain), at least as many as rotate out of L2, the same count for both sides.
        layers = max(chain_layers(n * k * 2, quick=ctx.quick), len(rotations(lambda i: i, qbytes)),
                     len(rotations(lambda i: i, n * k * 2)))
        w_bf16 = _weights(n, k, layers)
        quant = jax.jit(lambda w: quantize_weight(w, bits=bits, group_size=group))
        qws = [quant(w) for w in w_bf16]
        jax.block_until_ready((qws, w_bf16))

        def ours_fn(impl):
            def f(x, qw):
                with jq.implementation(impl):
                    return weight_only_linear(x, qw)
            return jax.jit(f)

        ours = ours_fn(auto)
        bf16 = jax.jit(lambda x, w: x @ w.T)
        plain = jax.jit(lambda x, qw: x @ dequantize_weight(qw, jnp.bfloat16).T)
        for m in ms:
            ctx.say(f"weight_only {variant} M={m} N={n} K={k}")
            xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (m, k), jnp.bfloat16) for i in range(layers)]
            sets_q = list(zip(xs, qws))
            sets_b = list(zip(xs, w_bf16))
            t = timeit(ours, sets_q, repeats=ctx.repeats, min_time=min_time)
            tb = timeit(bf16, sets_b, repeats=ctx.repeats, min_time=min_time)
            tj = timeit(plain, sets_q, repeats=ctx.repeats, min_time=min_time)
            xt = tuple(xs)
            qc, bc = [(xt, *((q,) for q in qws))], [(xt, *((w,) for w in w_bf16))]
            tc = timeit(chain(ours), qc, repeats=ctx.repeats, min_time=min_time) / layers
            tbc = timeit(chain(bf16), bc, repeats=ctx.repeats, min_time=min_time) / layers
            tjc = timeit(chain(plain), qc, repeats=ctx.repeats, min_time=min_time) / layers
            moved = nbytes(qws[0]) + m * k * 2 + m * n * 2
            gbps = moved / tc / 1e9
            cfg = kernel_config(m, n, k, bits=bits, group_size=group, x_dtype=jnp.bfloat16, device_kind=ctx.device)
            tgt = _target(variant, (n, k), m)
            met = None
            if tgt is not None:
                met = bool(tbc / tc >= tgt[1] and (tgt[2] is None or tjc / tc >= tgt[2]))
            rows.append(dict(section="weight_only", op=variant, granularity=f"M={m}", shape=[m, n, k],
                             dtype="bfloat16", ms=t * 1e3, bf16_ms=tb * 1e3, jnp_ms=tj * 1e3,
                             vs_bf16=tb / t, vs_jnp=tj / t, chain_layers=layers, chain_ms=tc * 1e3,
                             bf16_chain_ms=tbc * 1e3, jnp_chain_ms=tjc * 1e3, vs_bf16_chain=tbc / tc,
                             vs_jnp_chain=tjc / tc, tops=2 * m * n * k / tc / 1e12, gbps=gbps,
                             copy_frac=gbps / ctx.copy_gbps, weight_bytes=nbytes(qws[0]),
                             config=cfg.tag(), target=None if tgt is None else tgt[0], met=met))
            del xs, sets_q, sets_b
        del qws, w_bf16
    return rows


# ----------------------------------------------------------------------------------------
# tile sweep
# ----------------------------------------------------------------------------------------

def _sweep_cases():
    """The tiles timed for the tuned table (decode: block_m = 16 tensor-core tiles; prefill)."""
    C = K.Config
    dec4 = [C(16, bn, bk, sp, w, st) for bn, bk, sp, w, st in (
        (32, 256, 1, 2, 4), (32, 256, 1, 2, 3), (32, 512, 1, 2, 4), (32, 128, 1, 2, 4), (32, 512, 2, 2, 4),
        (32, 256, 2, 2, 4), (64, 512, 2, 2, 4), (16, 512, 1, 2, 4), (64, 512, 1, 4, 4))]
    dec8 = [C(16, bn, bk, sp, w, st) for bn, bk, sp, w, st in (
        (32, 512, 1, 4, 3), (32, 512, 1, 4, 4), (32, 256, 1, 2, 4), (32, 1024, 1, 4, 3), (64, 512, 1, 2, 3))]
    pre = [C(*c) for c in ((64, 128, 128, 1, 4, 4), (128, 64, 128, 1, 4, 4), (64, 128, 128, 1, 4, 3),
                           (128, 64, 256, 1, 4, 3), (64, 64, 128, 1, 4, 4), (32, 64, 128, 1, 4, 4))]
    return [
        ((16, 8192, 8192, 4, 128), dec4),
        ((1, 4096, 14336, 4, 128), dec4),
        ((16, 8192, 8192, 8, None), dec8),
        ((128, 8192, 8192, 4, 128), pre),
        ((512, 8192, 8192, 4, 128), pre),
        ((2048, 8192, 8192, 4, 128), pre),
    ]


def sweep(ctx: Context, cases=None, budget_s: float = 1e9) -> list[dict]:
    """Time each Config on each (M, N, K, bits, group); errors are reported, not fatal.

    Stops starting new cases after ``budget_s`` seconds (what ran is returned).
    """
    import time
    t_end = time.time() + budget_s
    rows = []
    for (m, n, k, bits, group), cfgs in (cases or _sweep_cases()):
        if time.time() > t_end:
            break
        qbytes = n * k * bits // 8
        nq = len(rotations(lambda i: i, qbytes))
        ws = _weights(n, k, nq, seed=7)
        qws = [quantize_weight(w, bits=bits, group_size=group) for w in ws]
        xs = [jax.random.normal(jax.random.PRNGKey(i), (m, k), jnp.bfloat16) for i in range(nq)]
        sets = list(zip(xs, qws))
        bf16 = jax.jit(lambda x, w: x @ w.T)
        tb = timeit(bf16, [(xs[i], ws[i]) for i in range(min(4, nq))], repeats=ctx.repeats, min_time=0.02)
        for cfg in cfgs:
            if time.time() > t_end:
                break
            ctx.say(f"sweep {m}x{n}x{k} w{bits} g{group} {cfg}")
            f = jax.jit(lambda x, qw, cfg=cfg: weight_only_linear(x, qw, config=cfg))
            try:
                t = timeit(f, sets, repeats=ctx.repeats, min_time=0.02)
            except Exception as e:  # a tile that does not compile is reported
                rows.append(dict(section="weight_only_sweep", op=f"w{bits} g{group}", shape=[m, n, k], bits=bits,
                                 group=group, config=cfg.tag(), error=str(e)[:300]))
                continue
            rows.append(dict(section="weight_only_sweep", op=f"w{bits} g{group}", shape=[m, n, k], bits=bits,
                             group=group, config=cfg.tag(), cfg=dataclass_dict(cfg), ms=t * 1e3, bf16_ms=tb * 1e3, vs_bf16=tb / t,
                             gbps=(nbytes(qws[0]) + m * k * 2 + m * n * 2) / t / 1e9))
        del ws, qws, xs, sets
    return rows


def dataclass_dict(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jaxquant.bench.weight_only")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--budget", type=float, default=1e9, help="sweep: seconds after which no new tile starts")
    args = p.parse_args(argv)
    ctx = harness.make_context(args.quick)
    ctx.progress = lambda s: print(s, flush=True)
    ctx.copy_gbps = harness.copy_bandwidth(ctx)
    rows = sweep(ctx, budget_s=args.budget) if args.sweep else run(ctx)
    path = harness.write_results(args.out, ctx, rows, extra={"section": "weight_only" + ("_sweep" if args.sweep else "")})
    for r in rows:
        if "error" in r:
            print("ERR", r["shape"], r["op"], r["config"], r["error"][:160].replace("\n", " "))
        elif r.get("section") == "weight_only_sweep":
            print(f"{r['shape']} {r['op']} {r['config']:>22} {r['ms']:.4f}ms x{r['vs_bf16']:.2f} {r['gbps']:.0f}GB/s")
        else:
            print(f"{r['op']:>17} {r['shape']} {r['config']:>22} {r['ms']:.4f}ms bf16 x{r['vs_bf16']:.2f} "
                  f"jnp x{r['vs_jnp']:.2f} {r['gbps']:.0f}GB/s {r['tops']:.0f}T met={r['met']}")
    best = {}
    for r in rows:
        if "ms" in r:
            key = (tuple(r["shape"]), r.get("bits"), r.get("group"), r.get("op"))
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    for key, r in best.items():
        print(key, f"{r['ms']:.4f} ms", f"vs_bf16 {r.get('vs_bf16', 0):.2f}", r.get("config"))
    print("results:", path)


if __name__ == "__main__":
    main()
