"""Diagnostic: W8A8 quantized_linear tiles at M = 16 and M = 128 vs XLA bf16 (H200; not part of the suite)."""
import jax, jax.numpy as jnp
from jaxquant.bench.harness import timeit  # PERF.md's method
import jaxquant as jq
from jaxquant.pallas.int8_matmul import Config as C


cases = {
    16: [None, C(16, 64, 512, 1, 4, 4), C(16, 32, 512, 1, 4, 4), C(16, 32, 512, 1, 2, 4), C(16, 32, 256, 1, 2, 4),
         C(16, 64, 256, 1, 4, 4), C(16, 128, 256, 1, 4, 3), C(16, 32, 1024, 1, 4, 3)],
    128: [None, C(64, 64, 128, 8, 4, 4), C(32, 64, 128, 8, 4, 4), C(64, 32, 128, 8, 4, 4), C(32, 32, 128, 8, 4, 4),
          C(64, 64, 256, 8, 4, 3), C(32, 64, 256, 8, 4, 4), C(128, 32, 128, 8, 4, 4), C(16, 64, 256, 1, 4, 4)],
}
for (n, k) in ((4096, 14336), (8192, 8192), (14336, 4096)):
    ws = [(jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02) for i in range(4)]
    wb = [w.astype(jnp.bfloat16) for w in ws]
    qs = [jq.quantize_weight(w, bits=8) for w in ws]
    del ws
    for m, cfgs in cases.items():
        xs = [jax.random.normal(jax.random.PRNGKey(9 + i), (m, k), jnp.bfloat16) for i in range(4)]
        tb = timeit(jax.jit(lambda x, w: x @ w.T), list(zip(xs, wb)))
        out = []
        for c in cfgs:
            try:
                t = timeit(jax.jit(lambda x, q, c=c: jq.quantized_linear(x, q, config=c)), list(zip(xs, qs)))
                out.append(f"{'auto' if c is None else f'{c.block_m}x{c.block_n}x{c.block_k}/w{c.num_warps}/st{c.num_stages}'} x{tb/t:.2f}")
            except Exception as e:
                out.append(f"{c} ERR {str(e)[:80]}")
        print(f"M={m} N={n} K={k} bf16 {tb*1e6:.1f}us: " + " | ".join(out), flush=True)
