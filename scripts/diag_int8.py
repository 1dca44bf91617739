"""GPU diagnostic: int8 x int8 -> int32 products vs numpy (XLA int8, XLA int32, Pallas kernel)."""
import numpy as np, jax, jax.numpy as jnp
from jaxquant.primitives.linear import int8_matmul
from jaxquant.pallas import int8_matmul as mm_k
DN = (((1,), (1,)), ((), ()))
rng = np.random.default_rng(0)
for (m, k, n) in [(6, 50, 33), (37, 96, 50), (70, 130, 20), (256, 512, 256)]:
    a_np = rng.integers(-128, 128, (m, k)).astype(np.int8); w_np = rng.integers(-128, 128, (n, k)).astype(np.int8)
    ref = a_np.astype(np.int64) @ w_np.astype(np.int64).T
    a, w = jnp.asarray(a_np), jnp.asarray(w_np)
    back = np.asarray(a)
    r = {"roundtrip": bool((back == a_np).all()),
         "xla_i8": np.asarray(jax.lax.dot_general(a, w, DN, preferred_element_type=jnp.int32)),
         "xla_i32": np.asarray(jax.lax.dot_general(a.astype(jnp.int32), w.astype(jnp.int32), DN)),
         "kernel": np.asarray(int8_matmul(a, w)),
         "kernel_cfg": np.asarray(int8_matmul(a, w, config=mm_k.Config(16, 32, 16)))}
    out = {kk: (v if isinstance(v, bool) else (bool((v == ref).all()) or f"ratio {np.median(v[ref != 0] / ref[ref != 0]):.3f}")) for kk, v in r.items()}
    print((m, k, n), out)
