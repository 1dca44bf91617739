"""Diagnostic: run each decode kernel twice, as a program for Nsight Compute (``ncu``) to profile.

Usage: ncu --clock-control none --set full -k regex:jaxquant -c 6 -o OUT/decode \
           python3 scripts/diag_ncu_decode.py [M] [N] [K]
One jitted call each of W4A16-g128, W8A16 and W8A8 at decode, twice (the second launch is the warm one).
"""
import sys

import jax, jax.numpy as jnp
import jaxquant as jq

m, n, k = (int(a) for a in (sys.argv[1:] + ["1", "8192", "8192"][len(sys.argv) - 1:])[:3])
w = jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32) * 0.02
x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
for name, f, qw in [("w4a16", jq.weight_only_linear, jq.quantize_weight(w, bits=4, group_size=128)),
                    ("w8a16", jq.weight_only_linear, jq.quantize_weight(w, bits=8)),
                    ("w8a8", jq.quantized_linear, jq.quantize_weight(w, bits=8)),
                    ("bf16", lambda x, w: x @ w.T, w.astype(jnp.bfloat16))]:
    g = jax.jit(f)
    for _ in range(2):
        jax.block_until_ready(g(x, qw))
    print(name, "done", flush=True)
