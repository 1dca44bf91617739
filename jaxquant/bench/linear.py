"""Benchmarks of the W8A8 ``quantized_linear`` (docs/performance.md targets), and a tile sweep for
its table.

Per shape ``(M, N, K)`` (``jaxquant.shapes``: M in TOKENS_M x the Llama-like (N, K)), timed in one
run with the method of docs/performance.md, weights rotated out of L2 (``harness.rotations``):

* ``jaxquant``: ``quantized_linear(x_bf16, quantize_weight(w, bits=8))`` (dynamic per-token
  activation quantization + int8 GEMM + fused epilogue; the Pallas kernels on a GPU);
* ``bf16``: XLA's ``x_bf16 @ w_bf16.T`` with ``w`` stored ``[N, K]``;
* ``jnp``: the plain-jnp W8A8 pipeline a JAX user writes today (the reference: per-token quantize
  + ``lax.dot_general(int8, int8, preferred_element_type=int32)`` + scale epilogue) under jit;
* for M >= 2048 also XLA's bare int8 dot (``xla_int8_tops``) and our bare GEMM on pre-quantized
  codes (``gemm_tops``), to separate GEMM speed from the activation quantization;
* Qwix PTQ W8A8 of the same layer, only if ``qwix`` imports.

Each op is timed twice: one jitted call per layer (``ms``, ``vs_bf16``, ``vs_jnp``: the method of
docs/performance.md) and as a chain of ``chain_layers`` layers with distinct weights in ONE
jitted call (``chain_ms`` per layer, ``vs_bf16_chain``, ``vs_jnp_chain``): the GPU time per
layer, as in a model's jitted forward. At decode one call per layer is bound by the host's
dispatch (~25 us a call on the H200; bf16 4096x4096 at M = 1: 27 us per call, 12 us per layer in
a chain), so the targets are judged on the chain ratios.
A chain has enough layers to stream >= 512 MiB of bf16 weights (``harness.chain_layers``, 4 to 32):
the dispatch of one jitted call must stay below its GPU time, which 4-layer chains of 4096x4096
decode layers did not (per-layer time against chain length 4..32 on an H200, jax 0.11.2,
2026-11-21).

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
from jaxquant.bench.harness import Context, chain, chain_layers, rotations, timeit
from jaxquant.pallas.int8_matmul import triton as mm_k
from jaxquant.primitives.int8_matmul import primitive as L
from jaxquant.primitives.int8_matmul.reference import quantize_activation_reference
from jaxquant.core.weights import QuantizedWeight
from jaxquant.primitives.weights import quantize_weight


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


def _fns(auto, n, k):
    """jitted (ours, plain jnp W8A8, XLA bf16), each taking only the arrays it reads."""
    def qw_of(codes, scale):
        return QuantizedWeight(codes, scale, None, bits=8, group_size=None, symmetric=True, shape=(n, k))

    def ours(x, codes, scale):
        with jq.implementation(auto):
            return jq.quantized_linear(x, qw_of(codes, scale))

    def plain(x, codes, scale):
        # What a JAX user writes today (docs/performance.md): per-token quantize in jnp, XLA's
        # int8 x int8 -> int32 dot, scale epilogue. Written out: the library's reference
        # accumulates int32 operands (exact everywhere, but slow on the GPU), which is not the
        # user's pipeline.
        q, s = quantize_activation_reference(x)
        acc = jax.lax.dot_general(q, codes, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        return ((acc.astype(jnp.float32) * s) * scale[None, :]).astype(x.dtype)

    def bf16(x, w):
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                                   ).astype(jnp.bfloat16)

    return jax.jit(ours), jax.jit(plain), jax.jit(bf16), chain(ours), chain(bf16), chain(plain)


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
    qwix_make = _qwix_fn()
    for m, n, k in cases:
        ctx.say(f"quantized_linear {m}x{n}x{k}")
        ours, plain, bf16, ours_chain, bf16_chain, plain_chain = _fns(auto, n, k)
        per_set = m * k * 2 + n * k * 3  # x bf16, codes int8, w bf16
        sets = rotations(functools.partial(_make_set, m=m, n=n, k=k), per_set)
        # one distinct weight set per chained layer (harness.chain_layers: enough that the host's
        # dispatch does not bound the chain); a chain reusing one weight lets XLA merge the bf16
        # dots into one (its dot merger reads the weight once)
        sets += [_make_set(i, m, n, k) for i in range(len(sets), chain_layers(n * k * 2, quick=ctx.quick))]
        q_sets = [(x, qw.codes, qw.scale) for x, qw, _ in sets]
        b_sets = [(x, w) for x, _, w in sets]
        t = timeit(ours, q_sets, repeats=ctx.repeats)
        tb = timeit(bf16, b_sets, repeats=ctx.repeats)
        tj = timeit(plain, q_sets, repeats=ctx.repeats)
        flops = 2.0 * m * n * k
        layers = len(sets)
        xs = tuple(st[0] for st in sets)
        qc = [(xs,) + tuple((c, s_) for _, c, s_ in q_sets)]
        tc = timeit(ours_chain, qc, repeats=ctx.repeats) / layers
        tbc = timeit(bf16_chain, [(xs,) + tuple((w,) for _, w in b_sets)], repeats=ctx.repeats) / layers
        tjc = timeit(plain_chain, qc, repeats=ctx.repeats) / layers
        vb, vj = tbc / tc, tjc / tc
        want_b, want_j, desc = _target(m)
        row = dict(section="linear", op="quantized_linear W8A8", shape=[m, n, k], dtype="bfloat16",
                   ms=t * 1e3, bf16_ms=tb * 1e3, jnp_ms=tj * 1e3, vs_bf16=tb / t, vs_jnp=tj / t,
                   chain_layers=layers, chain_ms=tc * 1e3, bf16_chain_ms=tbc * 1e3, jnp_chain_ms=tjc * 1e3,
                   vs_bf16_chain=vb, vs_jnp_chain=vj, tops=flops / tc / 1e12,
                   config=str(L.gemm_config(m, n, k, device_kind=ctx.device)), target=desc,
                   met=bool(vb >= want_b and (want_j is None or vj >= want_j)))
        if m >= 2048 and ctx.platform != "cpu":
            x, qw, _ = sets[0]
            q, s = quantize_activation_reference(x)
            xla_int8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                                preferred_element_type=jnp.int32))
            gemm = jax.jit(lambda a, b, s, ws: jq.int8_matmul(a, b, s[:, 0], ws, out_dtype=jnp.bfloat16))
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

_BIG = [mm_k.Config(*c) for c in [
    (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 4), (128, 256, 128, 16, 8, 3), (128, 128, 128, 8, 4, 3),
    (128, 256, 128, 8, 8, 2), (256, 128, 128, 16, 8, 4), (128, 256, 256, 8, 8, 2), (256, 128, 64, 8, 8, 5),
    (128, 256, 64, 8, 8, 5), (256, 128, 128, 4, 8, 3)]]
_MID = [mm_k.Config(*c) for c in [
    (128, 32, 128, 1, 4, 4), (128, 64, 128, 1, 4, 4), (128, 32, 256, 1, 4, 3), (64, 64, 128, 8, 4, 4),
    (64, 32, 256, 8, 4, 3), (128, 64, 128, 8, 8, 3), (128, 128, 128, 8, 8, 3), (64, 128, 128, 8, 4, 4)]]
_SMALL = [mm_k.Config(*c) for c in [
    (16, 16, 512, 1, 4, 4), (16, 32, 256, 1, 4, 4), (16, 32, 512, 1, 4, 5), (16, 64, 256, 1, 4, 4),
    (16, 64, 512, 1, 4, 4), (16, 128, 256, 1, 4, 4), (16, 32, 1024, 1, 4, 3)]]


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

    m, n, k = 8192, 8192, 8192
    x, qw, _ = _make_set(0, m, n, k)
    q, s = quantize_activation_reference(x)
    for cfg in _BIG:
        f = jax.jit(lambda a, b, s, ws, cfg=cfg: jq.int8_matmul(a, b, s[:, 0], ws, out_dtype=jnp.bfloat16, config=cfg))
        time_cfg("gemm", m, n, k, cfg, f, [(q, qw.codes, s, qw.scale)])
    del x, qw, q, s
    shapes_ = [(m_, n_, k_, _MID) for m_ in (128, 512) for (n_, k_) in [(4096, 4096), (4096, 14336), (8192, 8192)]]
    shapes_ += [(m_, n_, k_, _SMALL) for (m_, n_, k_) in [(16, 8192, 8192), (1, 4096, 14336), (16, 14336, 4096),
                                                          (16, 4096, 4096)]]
    for m, n, k, cfgs in shapes_:
        sets = rotations(functools.partial(_make_set, m=m, n=n, k=k), n * k * 3 + m * k * 2)
        sets = [(x, qw.codes, qw.scale) for x, qw, _ in sets]
        for cfg in cfgs:
            f = jax.jit(lambda x, c, s, cfg=cfg: L.linear_kernel(x, c, s, out_dtype=jnp.bfloat16, config=cfg))
            time_cfg("linear", m, n, k, cfg, f, sets)
        del sets
    return rows


def _fmt_row(r) -> str:
    if "error" in r:
        return f"= {r['op']:16s} {str(r['shape']):20s} {r['config']}  ERROR {r['error'][:160]}"
    extra = "".join(f" {key}={r[key]:.2f}" for key in ("vs_bf16", "vs_jnp", "bf16_ms", "jnp_ms", "vs_bf16_chain",
                                                       "chain_ms", "gemm_tops", "xla_int8_tops") if key in r)
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
