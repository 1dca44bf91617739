"""Benchmarks of the quantize family and dynamic quantization (targets in docs/performance.md).

Each op is timed three ways in one run: jaxquant (the Pallas kernel on a GPU), the same op in
plain jnp under ``jax.jit`` (the plain-jnp reference: what a JAX user writes today) and, for
scale, the device copy bandwidth. Targets (H200): dynamic per-token >= 3.6 TB/s and >= 2.0x
plain jnp; every other op >= 90% of the copy bandwidth and >= 1.0x plain jnp.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import granularity as G

from jaxquant import shapes
from jaxquant.bench.harness import Context, nbytes, rotations, timeit
from jaxquant.pallas.affine import triton as affine_k
from jaxquant.pallas.dynamic import triton as dynamic_k

COPY_TARGET = 0.90
DYN_TARGET_GBPS = 3600.0


def _ops(shape):
    """(name, granularity, fn(x, dy, scale, q) using jq, same with the reference, bytes moved)."""
    m, d = shape
    out = []
    for gname, g in [("per-token", jq.PerToken()), ("per-channel", jq.PerChannel(-1)),
                     ("per-group128", jq.PerGroup(128)), ("per-tensor", jq.PerTensor())]:
        out.append(("fake_quantize", gname, g))
    out.append(("quantize", "per-token", jq.PerToken()))
    out.append(("quantize", "per-group128", jq.PerGroup(128)))
    out.append(("dequantize", "per-token", jq.PerToken()))
    out.append(("fake_quantize_backward", "per-channel", jq.PerChannel(-1)))
    out.append(("quantize_backward", "per-token", jq.PerToken()))
    return out


def _fn(op, g, impl):
    def f(x, dy, scale, q):
        with jq.implementation(impl):
            if op == "fake_quantize":
                return jq.fake_quantize(x, scale, granularity=g, qmin=-128, qmax=127)
            if op == "quantize":
                return jq.quantize(x, scale, granularity=g)
            if op == "dequantize":
                return jq.dequantize(q, scale, granularity=g, dtype=x.dtype)
            if op == "fake_quantize_backward":
                return jq.fake_quantize_backward(dy, x, scale, granularity=g, qmin=-128, qmax=127)
            return jq.quantize_backward(dy, x, scale, granularity=g, qmin=-128, qmax=127)
    return jax.jit(f)


def _moved(op, x, dy, scale, q, out):
    ins = {"fake_quantize": (x, scale), "quantize": (x, scale), "dequantize": (q, scale),
           "fake_quantize_backward": (dy, x, scale), "quantize_backward": (dy, x, scale)}[op]
    return nbytes(*ins) + nbytes(out)


def run(ctx: Context, *, sweep: bool = False) -> list[dict]:
    rows = []
    act = [(2048, 1024)] if ctx.quick else shapes.ACTIVATIONS[:2]
    auto = "interpret" if ctx.platform == "cpu" else "auto"
    for shape in act:
        key = jax.random.PRNGKey(0)

        def make(i, g):
            k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
            x = (jax.random.normal(k1, shape, jnp.float32) * 2).astype(jnp.bfloat16)
            dy = jax.random.normal(k2, shape, jnp.bfloat16)
            scale = jax.random.uniform(k3, G.param_shape(g, shape), jnp.float32, 0.01, 0.05)
            q = jax.random.randint(k1, shape, -128, 128, jnp.int32).astype(jnp.int8)
            return x, dy, scale, q

        for op, gname, g in _ops(shape):
            ctx.say(f"{op} {gname} {shape}")
            sets = rotations(functools.partial(make, g=g), 3 * shape[0] * shape[1] * 2)
            ours, base = _fn(op, g, auto), _fn(op, g, "reference")
            out = ours(*sets[0])
            moved = _moved(op, *sets[0], out)
            t = timeit(ours, sets, repeats=ctx.repeats)
            tb = timeit(base, sets, repeats=ctx.repeats)
            gbps = moved / t / 1e9
            frac = gbps / ctx.copy_gbps
            rows.append(dict(section="quant", op=op, granularity=gname, shape=list(shape), dtype="bfloat16",
                             ms=t * 1e3, jnp_ms=tb * 1e3, gbps=gbps, copy_frac=frac, vs_jnp=tb / t,
                             target=f">= {COPY_TARGET:.0%} copy and >= 1.0x jnp",
                             met=bool(frac >= COPY_TARGET and tb / t >= 1.0)))
            del sets
        # dynamic per-token (bf16 -> int8 + float32 scale), symmetric and asymmetric
        for sym in (True, False):
            ctx.say(f"dynamic_quantize per-token sym={sym} {shape}")
            sets = rotations(lambda i: (make(i, jq.PerToken())[0],), shape[0] * shape[1] * 2)
            dt = jnp.int8 if sym else jnp.uint8

            def dyn(impl):
                def f(x):
                    with jq.implementation(impl):
                        return jq.dynamic_quantize(x, symmetric=sym, dtype=dt)
                return jax.jit(f)
            ours, base = dyn(auto), dyn("reference")
            out = ours(*sets[0])
            moved = nbytes(sets[0][0]) + nbytes(out[0], out[1]) + (0 if sym else nbytes(out[2]))
            t = timeit(ours, sets, repeats=ctx.repeats)
            tb = timeit(base, sets, repeats=ctx.repeats)
            gbps = moved / t / 1e9
            rows.append(dict(section="quant", op="dynamic_quantize" + ("" if sym else "(asym,uint8)"),
                             granularity="per-token", shape=list(shape), dtype="bfloat16", ms=t * 1e3,
                             jnp_ms=tb * 1e3, gbps=gbps, copy_frac=gbps / ctx.copy_gbps, vs_jnp=tb / t,
                             target=">= 3.6 TB/s (H200) and >= 2.0x jnp",
                             met=bool(gbps >= DYN_TARGET_GBPS and tb / t >= 2.0)))
            del sets
    if sweep and ctx.platform != "cpu":
        rows += _sweep(ctx)
    return rows


def _sweep(ctx: Context) -> list[dict]:
    """Tile sweep for the tuned tables (affine per-token / per-channel, dynamic per-token)."""
    rows = []
    shape = shapes.ACTIVATIONS[0]
    x = (jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)).astype(jnp.bfloat16)
    for gname, g in [("per-token", jq.PerToken()), ("per-channel", jq.PerChannel(-1)), ("per-group128", jq.PerGroup(128))]:
        s = jnp.full(G.param_shape(g, shape), 0.02, jnp.float32)
        for br, bc, w in [(1, 8192, 8), (2, 4096, 8), (4, 2048, 8), (8, 1024, 8), (16, 512, 8), (32, 256, 8),
                          (64, 128, 4), (8, 2048, 8), (16, 1024, 8), (4, 4096, 16), (2, 2048, 4), (4, 1024, 4)]:
            cfg = affine_k.Config(br, bc, w)
            f = jax.jit(lambda x, s: jq.fake_quantize(x, s, granularity=g, qmin=-128, qmax=127, config=cfg))
            try:
                t = timeit(f, [(x, s)], repeats=ctx.repeats)
            except Exception as e:  # a tile that does not compile is reported, not fatal
                rows.append(dict(section="sweep", op="fake_quantize", granularity=gname, config=str(cfg), error=str(e)[:200]))
                continue
            gbps = 2 * nbytes(x) / t / 1e9
            rows.append(dict(section="sweep", op="fake_quantize", granularity=gname, config=str(cfg), ms=t * 1e3,
                             gbps=gbps, copy_frac=gbps / ctx.copy_gbps))
    dy = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.bfloat16)
    for gname, g in [("per-channel", jq.PerChannel(-1)), ("per-token", jq.PerToken())]:
        s = jnp.full(G.param_shape(g, shape), 0.02, jnp.float32)
        for br, bc, w in [(1, 8192, 8), (1, 8192, 16), (2, 4096, 8), (4, 2048, 8), (8, 1024, 8), (16, 1024, 8),
                          (32, 512, 8), (2, 8192, 16), (1, 4096, 4), (2, 2048, 4)]:
            cfg = affine_k.Config(br, bc, w)
            f = jax.jit(lambda dy, x, s: jq.fake_quantize_backward(dy, x, s, granularity=g, qmin=-128, qmax=127,
                                                                   config=cfg))
            t = timeit(f, [(dy, x, s)], repeats=ctx.repeats)
            gbps = 3 * nbytes(x) / t / 1e9
            rows.append(dict(section="sweep", op="fake_quantize_backward", granularity=gname, config=str(cfg),
                             ms=t * 1e3, gbps=gbps, copy_frac=gbps / ctx.copy_gbps))
    for br, bc, w in [(1, 8192, 4), (1, 8192, 8), (2, 8192, 8), (1, 4096, 8)]:
        cfg = dynamic_k.Config(br, bc, w)
        f = jax.jit(lambda x: jq.dynamic_quantize(x, config=cfg))
        try:
            t = timeit(f, [(x,)], repeats=ctx.repeats)
        except Exception as e:
            rows.append(dict(section="sweep", op="dynamic_quantize", config=str(cfg), error=str(e)[:200]))
            continue
        gbps = (nbytes(x) * 1.5 + shape[0] * 4) / t / 1e9
        rows.append(dict(section="sweep", op="dynamic_quantize", granularity="per-token", config=str(cfg),
                         ms=t * 1e3, gbps=gbps, copy_frac=gbps / ctx.copy_gbps))
    shape2 = shapes.ACTIVATIONS[1]
    x2 = jax.random.normal(jax.random.PRNGKey(3), shape2, jnp.float32).astype(jnp.bfloat16)
    for br, bc, w in [(1, 16384, 8), (1, 16384, 16), (1, 16384, 32), (1, 8192, 8), (1, 4096, 8), (1, 2048, 4),
                      (2, 2048, 8)]:
        cfg = dynamic_k.Config(br, bc, w)
        f = jax.jit(lambda x: jq.dynamic_quantize(x, config=cfg))
        t = timeit(f, [(x2,)], repeats=ctx.repeats)
        gbps = (nbytes(x2) * 1.5 + shape2[0] * 4) / t / 1e9
        rows.append(dict(section="sweep", op="dynamic_quantize", granularity="per-token", shape=list(shape2),
                         config=str(cfg), ms=t * 1e3, gbps=gbps, copy_frac=gbps / ctx.copy_gbps))
    return rows
