"""Diagnostic: decode (M = 1, 16) tiles with split-K for the W8A8 and weight-only kernels vs XLA bf16.

Times each op as a chain of SETS layers with distinct weights inside one jitted call (per-layer GPU
time: at decode one jitted call of one layer is bound by the host's dispatch, ~25 us on the H200,
so timing calls one by one measures the host, not the kernel). Prints one line per (shape, kernel)
with each tile's speed-up over the bf16 matmul chain, and writes OUT/decode_sweep.json.
H100/H200; not part of the suite. Usage: python3 scripts/diag_decode.py OUT [mid | w8a8]
(``mid``: W4A16 tiles at M = 128 and 512 instead, written to OUT/mid_sweep.json; ``w8a8``: W8A8
split / tile options where it is slower than bf16, OUT/w8a8_small_sweep.json).
"""
import functools
import json, os, sys
SETS = 8
import jax, jax.numpy as jnp
import jaxquant as jq
from jaxquant.bench.harness import timeit  # PERF.md's method
from jaxquant.pallas.int8_matmul import Config as C8
from jaxquant.pallas.weight_only import Config as CW

W8A8 = [None, C8(16, 32, 512, 1, 2, 4), C8(16, 32, 256, 1, 2, 3, split_k=2), C8(16, 32, 256, 1, 2, 3, split_k=4),
        C8(16, 32, 256, 1, 2, 3, split_k=8), C8(16, 32, 128, 1, 2, 4, split_k=4), C8(16, 32, 128, 1, 2, 4, split_k=8),
        C8(16, 64, 256, 1, 4, 3, split_k=2), C8(16, 64, 256, 1, 4, 3, split_k=4), C8(16, 16, 256, 1, 1, 3, split_k=4),
        C8(16, 64, 512, 1, 4, 3), C8(16, 128, 256, 1, 4, 3, split_k=2), C8(16, 128, 256, 1, 8, 3, split_k=4)]
WO = [None, CW(16, 32, 512, 1, 2, 4), CW(16, 32, 256, 2, 2, 3), CW(16, 32, 256, 4, 2, 3), CW(16, 32, 256, 8, 2, 3),
      CW(16, 32, 128, 4, 2, 4), CW(16, 32, 128, 8, 2, 4), CW(16, 64, 256, 2, 4, 3), CW(16, 64, 256, 4, 4, 3),
      CW(16, 16, 256, 4, 1, 3), CW(16, 16, 256, 8, 1, 3),
      CW(16, 64, 512, 1, 4, 3), CW(16, 128, 256, 2, 4, 3), CW(16, 128, 256, 4, 8, 3)]


MID = [None, CW(64, 64, 128, 1, 4, 3), CW(64, 64, 128, 2, 4, 3), CW(64, 64, 128, 4, 4, 3), CW(32, 64, 128, 2, 4, 3),
       CW(32, 64, 128, 4, 4, 3), CW(64, 64, 64, 2, 4, 4), CW(128, 64, 64, 2, 4, 3), CW(64, 128, 64, 2, 4, 3),
       CW(64, 128, 64, 4, 4, 3), CW(128, 128, 64, 1, 8, 3), CW(128, 128, 64, 2, 8, 3)]


def tag(c):
    if c is None:
        return "auto"
    return f"{c.block_m}x{c.block_n}x{c.block_k}/w{c.num_warps}/st{c.num_stages}/s{c.split_k}"


def chain(f):
    """``f`` applied to every weight set in one jitted call (outputs summed)."""
    return jax.jit(lambda x, *ws: functools.reduce(jnp.add, [f(x, w) for w in ws]))


def main(out):
    os.makedirs(out, exist_ok=True)
    rows = []
    for (n, k) in ((8192, 8192), (4096, 14336), (14336, 4096)):
        ws = [jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02 for i in range(SETS)]
        wb = [w.astype(jnp.bfloat16) for w in ws]
        q8 = [jq.quantize_weight(w, bits=8) for w in ws]
        q4 = [jq.quantize_weight(w, bits=4, group_size=128) for w in ws]
        del ws
        for m in (1, 16):
            x = jax.random.normal(jax.random.PRNGKey(9), (m, k), jnp.bfloat16)
            tb = timeit(chain(lambda x, w: x @ w.T), [(x, *wb)]) / SETS
            for name, fn, qs, cfgs in (("w8a8", jq.quantized_linear, q8, W8A8), ("w4a16", jq.weight_only_linear, q4, WO),
                                       ("w8a16", jq.weight_only_linear, q8, WO)):
                line = []
                for c in cfgs:
                    try:
                        t = timeit(chain(lambda x, q, c=c, fn=fn: fn(x, q, config=c)), [(x, *qs)]) / SETS
                        rows.append(dict(op=name, shape=[m, n, k], config=tag(c), us=t * 1e6, bf16_us=tb * 1e6, vs_bf16=tb / t))
                        line.append(f"{tag(c)} {tb / t:.2f}")
                    except Exception as e:  # a tile that does not compile is reported, not fatal
                        rows.append(dict(op=name, shape=[m, n, k], config=tag(c), error=str(e)[:300]))
                        line.append(f"{tag(c)} ERR")
                print(f"{name} M={m} N={n} K={k} bf16 {tb * 1e6:.1f}us: " + " | ".join(line), flush=True)
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                      open(os.path.join(out, "decode_sweep.json"), "w"), indent=1)


def mid(out):
    """W4A16 g128 at M = 128 and 512 (PERF.md target 1.5x bf16), same chained timing."""
    rows = []
    for (n, k) in ((8192, 8192), (4096, 14336)):
        ws = [jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02 for i in range(SETS)]
        wb = [w.astype(jnp.bfloat16) for w in ws]
        q4 = [jq.quantize_weight(w, bits=4, group_size=128) for w in ws]
        del ws
        for m in (128, 512):
            x = jax.random.normal(jax.random.PRNGKey(9), (m, k), jnp.bfloat16)
            tb = timeit(chain(lambda x, w: x @ w.T), [(x, *wb)]) / SETS
            line = []
            for c in MID:
                try:
                    t = timeit(chain(lambda x, q, c=c: jq.weight_only_linear(x, q, config=c)), [(x, *q4)]) / SETS
                    rows.append(dict(op="w4a16", shape=[m, n, k], config=tag(c), us=t * 1e6, bf16_us=tb * 1e6, vs_bf16=tb / t))
                    line.append(f"{tag(c)} {tb / t:.2f}")
                except Exception as e:
                    rows.append(dict(op="w4a16", shape=[m, n, k], config=tag(c), error=str(e)[:300]))
                    line.append(f"{tag(c)} ERR")
            print(f"w4a16 M={m} N={n} K={k} bf16 {tb * 1e6:.1f}us: " + " | ".join(line), flush=True)
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                      open(os.path.join(out, "mid_sweep.json"), "w"), indent=1)


SMALL = [None, C8(16, 32, 256, 1, 2, 3, split_k=1), C8(16, 32, 256, 1, 2, 3, split_k=2),
         C8(16, 32, 256, 1, 2, 3, split_k=4), C8(16, 64, 256, 1, 4, 3, split_k=1), C8(16, 64, 256, 1, 4, 3, split_k=2),
         C8(16, 32, 512, 1, 2, 3, split_k=1)]
MID8 = [None, C8(64, 64, 256, 8, 4, 3, split_k=2), C8(64, 64, 256, 8, 4, 3, split_k=4), C8(32, 64, 256, 8, 4, 3),
        C8(32, 64, 256, 8, 4, 3, split_k=2), C8(64, 32, 256, 8, 4, 3), C8(128, 64, 128, 8, 4, 3, split_k=2)]


def w8a8(out):
    """W8A8 where it is slower than bf16 (M = 16 on 4096^2, M = 128 on 4096x14336): split / tile options."""
    rows = []
    for (n, k) in ((4096, 4096), (4096, 14336)):
        ws = [jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02 for i in range(SETS)]
        wb = [w.astype(jnp.bfloat16) for w in ws]
        q8 = [jq.quantize_weight(w, bits=8) for w in ws]
        del ws
        for m, cfgs in ((16, SMALL), (128, MID8)):
            xs = tuple(jax.random.normal(jax.random.PRNGKey(9 + i), (m, k), jnp.bfloat16) for i in range(SETS))
            def ch(f):
                return jax.jit(lambda xs, *ws: functools.reduce(jnp.add, [f(x, w) for x, w in zip(xs, ws)]))
            tb = timeit(ch(lambda x, w: x @ w.T), [(xs, *wb)]) / SETS
            line = []
            for c in cfgs:
                try:
                    t = timeit(ch(lambda x, q, c=c: jq.quantized_linear(x, q, config=c)), [(xs, *q8)]) / SETS
                    rows.append(dict(op="w8a8", shape=[m, n, k], config=tag(c), us=t * 1e6, bf16_us=tb * 1e6, vs_bf16=tb / t))
                    line.append(f"{tag(c)} {tb / t:.2f}")
                except Exception as e:
                    rows.append(dict(op="w8a8", shape=[m, n, k], config=tag(c), error=str(e)[:300]))
                    line.append(f"{tag(c)} ERR")
            print(f"w8a8 M={m} N={n} K={k} bf16 {tb * 1e6:.1f}us: " + " | ".join(line), flush=True)
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                      open(os.path.join(out, "w8a8_small_sweep.json"), "w"), indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "mid":
        mid(sys.argv[1])
    elif len(sys.argv) > 2 and sys.argv[2] == "w8a8":
        w8a8(sys.argv[1])
    else:
        main(sys.argv[1])
