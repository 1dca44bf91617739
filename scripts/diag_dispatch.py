"""Diagnostic: host dispatch floor vs device time at decode shapes (H200; not part of the suite).

Times the same ops two ways: n jitted calls back to back (PERF.md, one op per dispatch) and
L ops unrolled inside one jitted program (L different weight sets, one dispatch), per op.
"""
import time, statistics
import jax, jax.numpy as jnp
import jaxquant as jq
from jaxquant.bench.harness import timeit as per_call  # PERF.md's method: one op per dispatch


def unrolled(op, sets, reps=20):
    g = jax.jit(lambda all_sets: [op(*s) for s in all_sets])
    jax.block_until_ready(g(sets))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            o = g(sets)
        jax.block_until_ready(o)
        ts.append((time.perf_counter() - t0) / reps / len(sets))
    return statistics.median(ts)


def main():
    tiny = jnp.ones((16,), jnp.float32)
    print(f"dispatch floor jit(x+1) [16]: {per_call(jax.jit(lambda a: a + 1), [(tiny,)])*1e6:.1f} us")
    L = 8
    for (n, k) in ((8192, 8192), (4096, 14336)):
        ws = [(jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16) for i in range(L)]
        q4 = [jq.quantize_weight(w, bits=4, group_size=128) for w in ws]
        q8 = [jq.quantize_weight(w, bits=8) for w in ws]
        for m in (1, 16):
            xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (m, k), jnp.bfloat16) for i in range(L)]
            ops = {
                "bf16": (lambda x, w: x @ w.T, list(zip(xs, ws))),
                "w4g128": (lambda x, q: jq.weight_only_linear(x, q), list(zip(xs, q4))),
                "w8": (lambda x, q: jq.weight_only_linear(x, q), list(zip(xs, q8))),
                "jnp4": (lambda x, q: x @ jq.dequantize_weight(q, jnp.bfloat16).T, list(zip(xs, q4))),
            }
            res = {}
            for name, (op, sets) in ops.items():
                res[name] = (per_call(jax.jit(op), sets), unrolled(op, sets))
            b = res["bf16"]
            print(f"M={m} N={n} K={k}: " + "  ".join(
                f"{nm} call {t[0]*1e6:.1f}us dev {t[1]*1e6:.1f}us (x{b[1]/t[1]:.2f})" for nm, t in res.items()), flush=True)


if __name__ == "__main__":
    main()
