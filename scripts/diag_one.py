"""Run one weight_only_linear call (for ncu): python3 scripts/diag_one.py M N K BITS GROUP BM BN BK SPLIT WARPS STAGES"""
import sys
import jax, jax.numpy as jnp
import jaxquant as jq
from jaxquant.pallas import weight_only as K

m, n, k, bits, group, bm, bn, bk, split, warps, stages = (int(a) for a in sys.argv[1:12])
group = group or None
qw = jq.quantize_weight(jax.random.normal(jax.random.PRNGKey(0), (n, k), jnp.float32), bits=bits, group_size=group)
x = jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.bfloat16)
f = jax.jit(lambda x, q: jq.weight_only_linear(x, q, config=K.Config(bm, bn, bk, split, warps, stages)))
for _ in range(3):
    jax.block_until_ready(f(x, qw))
