"""Benchmarks of the W8A8 ``quantized_linear`` (PERF.md targets), and a tile sweep for its table.

Per shape ``(M, N, K)`` (``jaxquant.shapes``: M in TOKENS_M x the Llama-like (N, K)), timed in one
run with PERF.md's method, weights rotated out of L2 (``harness.rotations``):

* ``jaxquant``: ``quantized_linear(x_bf16, quantize_weight(w, bits=8))`` (dynamic per-token
  activation quantization + int8 GEMM + fused epilogue; the Pallas kernels on a GPU);
* ``bf16``: XLA's ``x_bf16 @ w_bf16.T`` with ``w`` stored ``[N, K]``;
* ``jnp``: the plain-jnp W8A8 pipeline a JAX user writes today (the reference: per-token quantize
  + ``lax.dot_general(int8, int8, preferred_element_type=int32)`` + scale epilogue) under jit;
* for M >= 2048 also XLA's bare int8 dot (``xla_int8_tops``) and our bare GEMM on pre-quantized
  codes (``gemm_tops``), to separate GEMM speed from the activation quantization;
* Qwix PTQ W8A8 of the same layer, only if ``qwix`` imports.

Targets (H200): >= 1.6x bf16 at M >= 4096, >= 1.4x at M = 2048, >= 1.15x jnp for M >= 2048,
>= 1.8x bf16 at M <= 16, never slower than bf16 (>= 1.0x) elsewhere.

``python -m jaxquant.bench.linear --sweep [--out DIR]`` times tile configurations for the tuned
table in ``jaxquant.pallas.int8_matmul``.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import shapes
from jaxquant.bench import harness
from jaxquant.bench.harness import Context, rotations, timeit
from jaxquant.pallas import int8_matmul as mm_k
from jaxquant.primitives import linear as L
from jaxquant.weights import quantize_weight


def _target(m):
    """(ratio to bf16, ratio to jnp or None, description) for a token count M."""
    if m <= 16:
        return 1.8, None, ">= 1.8x bf16"
    if m >= 4096:
        return 1.6, 1.15, ">= 1.6x bf16, >= 1.15x jnp"
    if m >= 2048:
        return 1.4, 1.15, ">= 1.4x bf16, >= 1.15x jnp"
    return 1.0, None, ">= 1.0x bf16"


def _make_set(i, m, n, k):
    key = jax.random.fold_in(jax.random.PRNGKey(7), i)
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(k2, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
    qw = quantize_weight(w, bits=8)
    return x, qw, w


def _fns(auto):
    def ours(x, qw, w):
        with jq.implementation(auto):
            return L.quantized_linear(x, qw)

    def plain(x, qw, w):
        with jq.implementation("reference"):
            return L.quantized_linear(x, qw)

    def bf16(x, qw, w):
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                                   ).astype(jnp.bfloat16)

    return jax.jit(ours), jax.jit(plain), jax.jit(bf16)


def _qwix_fn():
    """A jitted Qwix PTQ W8A8 Dense of the same layer, or None when qwix is not importable."""
    try:
        import qwix  # noqa: F401
    except Exception:
        return None

    def make(x, w):
        from flax import linen as nn
        import qwix

        model = nn.Dense(w.shape[0], use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        rules = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
        qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
        abstract = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)
        params = qwix.quantize_params({"params": {"kernel": w.T}}, abstract)
        return jax.jit(qmodel.apply), params

    return make


def run(ctx: Context) -> list[dict]:
    rows = []
    auto = "interpret" if ctx.platform == "cpu" else "auto"
    if ctx.quick:
        cases = [(1, 256, 128), (16, 256, 128), (256, 384, 256)]
    else:
        cases = [(m, n, k) for (n, k) in shapes.LINEAR_NK for m in shapes.TOKENS_M]
        cases += [(m, n, k) for (n, k) in shapes.RAGGED_NK for m in shapes.RAGGED_M]
    ours, plain, bf16 = _fns(auto)
    qwix_make = _qwix_fn()
    for m, n, k in cases:
        ctx.say(f"quantized_linear {m}x{n}x{k}")
        per_set = m * k * 2 + n * k * 3  # x bf16, codes int8, w bf16
        sets = rotations(functools.partial(_make_set, m=m, n=n, k=k), per_set)
        t = timeit(ours, sets, repeats=ctx.repeats)
        tb = timeit(bf16, sets, repeats=ctx.repeats)
        tj = timeit(plain, sets, repeats=ctx.repeats)
        flops = 2.0 * m * n * k
        vb, vj = tb / t, tj / t
        want_b, want_j, desc = _target(m)
        row = dict(section="linear", op="quantized_linear W8A8", shape=[m, n, k], dtype="bfloat16",
                   ms=t * 1e3, bf16_ms=tb * 1e3, jnp_ms=tj * 1e3, tops=flops / t / 1e12, vs_bf16=vb, vs_jnp=vj,
                   config=str(mm_k.heuristics(m, n, k, device_kind=ctx.device)), target=desc,
                   met=bool(vb >= want_b and (want_j is None or vj >= want_j)))
        if m >= 2048 and ctx.platform != "cpu":
            x, qw, _ = sets[0]
            q, s = L.quantize_activation_reference(x)
            xla_int8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                                preferred_element_type=jnp.int32))
            gemm = jax.jit(lambda a, b, s, ws: L.int8_matmul(a, b, s[:, 0], ws, out_dtype=jnp.bfloat16))
            ti = timeit(xla_int8, [(q, st[1].codes) for st in sets], repeats=ctx.repeats)
            tg = timeit(gemm, [(q, st[1].codes, s, st[1].scale) for st in sets], repeats=ctx.repeats)
            row.update(xla_int8_ms=ti * 1e3, xla_int8_tops=flops / ti / 1e12, gemm_ms=tg * 1e3,
                       gemm_tops=flops / tg / 1e12)
        if qwix_make is not None:
            try:
                x, _, w = sets[0]
                fq, params = qwix_make(x, w)
                tq = timeit(fq, [(params, st[0]) for st in sets], repeats=ctx.repeats)
                row.update(qwix_ms=tq * 1e3, vs_qwix=tq / t)
            except Exception as e:  # a Qwix API mismatch is reported, not fatal
                row.update(qwix_error=str(e)[:200])
        rows.append(row)
        ctx.say(_fmt_row(row))
        del sets
    return rows


# ------------------------------------------------------------------------------------------
# Tile sweep (for the tuned table).
# ------------------------------------------------------------------------------------------

_BIG = [mm_k.Config(128, 256, 128, 8, 8, 3), mm_k.Config(128, 256, 128, 8, 8, 4), mm_k.Config(256, 128, 128, 8, 8, 3),
        mm_k.Config(256, 128, 128, 8, 8, 4), mm_k.Config(128, 128, 128, 8, 4, 4), mm_k.Config(128, 128, 128, 8, 8, 4),
        mm_k.Config(128, 256, 64, 8, 8, 4), mm_k.Config(128, 128, 256, 8, 8, 3), mm_k.Config(64, 256, 128, 8, 4, 4),
        mm_k.Config(128, 256, 128, 16, 8, 3)]
_SMALL = [mm_k.Config(16, bn, bk, 1, w, st) for bn, bk, w, st in
          [(16, 256, 4, 4), (16, 512, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3), (32, 512, 4, 5),
           (64, 256, 4, 4), (64, 512, 4, 4), (32, 1024, 4, 3), (16, 1024, 4, 3), (64, 128, 4, 6)]]


def sweep(ctx: Context) -> list[dict]:
    rows = []

    def time_cfg(tag, m, n, k, cfg, fn, sets):
        try:
            t = timeit(fn, sets, repeats=ctx.repeats)
        except Exception as e:  # a tile that does not compile is reported, not fatal
            rows.append(dict(section="sweep", op=tag, shape=[m, n, k], config=str(cfg), error=str(e)[:300]))
            ctx.say(_fmt_row(rows[-1]))
            return
        rows.append(dict(section="sweep", op=tag, shape=[m, n, k], config=str(cfg), ms=t * 1e3,
                         tops=2.0 * m * n * k / t / 1e12))
        ctx.say(_fmt_row(rows[-1]))

    for m, n, k in [(8192, 8192, 8192), (2048, 4096, 4096)]:
        x, qw, _ = _make_set(0, m, n, k)
        q, s = L.quantize_activation_reference(x)
        for cfg in _BIG:
            ctx.say(f"sweep gemm {cfg}")
            f = jax.jit(lambda a, b, s, ws, cfg=cfg: L.int8_matmul(a, b, s[:, 0], ws, out_dtype=jnp.bfloat16,
                                                                  config=cfg))
            time_cfg("gemm", m, n, k, cfg, f, [(q, qw.codes, s, qw.scale)])
    for m, n, k in [(16, 8192, 8192), (16, 4096, 4096), (1, 4096, 14336)]:
        sets = rotations(functools.partial(_make_set, m=m, n=n, k=k), n * k * 3)
        for cfg in _SMALL:
            ctx.say(f"sweep decode {cfg}")
            fused = jax.jit(lambda x, qw, w, cfg=cfg: L.linear_kernel(x, qw.codes, qw.scale, out_dtype=jnp.bfloat16,
                                                                       config=cfg))
            time_cfg("decode fused", m, n, k, cfg, fused, sets)

            def unfused(x, qw, w, cfg=cfg):
                q, s = L._quantize_rows_kernel(x, None, False)
                return mm_k.int8_matmul(q, qw.codes, a_scale=s, w_scale=qw.scale[None], a_mode="int8",
                                        out_dtype=jnp.bfloat16, config=cfg)
            time_cfg("decode unfused", m, n, k, cfg, jax.jit(unfused), sets)
        del sets
    return rows


def _fmt_row(r) -> str:
    if "error" in r:
        return f"= {r['op']:16s} {str(r['shape']):20s} {r['config']}  ERROR {r['error'][:160]}"
    extra = "".join(f" {key}={r[key]:.2f}" for key in ("vs_bf16", "vs_jnp", "bf16_ms", "jnp_ms", "gemm_tops",
                                                       "xla_int8_tops") if key in r)
    met = "" if "met" not in r else (" met" if r["met"] else " MISSED")
    cfg = str(r.get("config", "")).replace("Config", "").replace("block_", "").replace("num_", "")
    return f"= {r['op']:16s} {str(r['shape']):20s} {r['ms']:.4f} ms {r['tops']:.0f} TOP/s{extra}{met} {cfg}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxquant.bench.linear")
    p.add_argument("--sweep", action="store_true", help="tile sweep (otherwise: the benchmark section)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    ctx = harness.make_context(args.quick)
    ctx.progress = lambda msg: print(msg, flush=True)
    rows = sweep(ctx) if args.sweep else run(ctx)
    path = harness.write_results(args.out, ctx, rows, {"section": "linear-sweep" if args.sweep else "linear"})
    print("results:", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
