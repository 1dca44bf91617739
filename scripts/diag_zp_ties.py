"""Diagnostic: XLA:GPU choose_qparams vs the CPU at zero-point ties (why dynamic_quantize takes the kernel for zp). GPU only."""
# Does XLA:GPU's choose_qparams (the old path) differ from the CPU reference at hi == -lo ties?
import numpy as np, jax, jax.numpy as jnp
from jaxquant import reference as ref
import jaxquant as jq
rng = np.random.default_rng(1)
x = rng.uniform(-1, 1, (33, 40)).astype(np.float32)
a = np.asarray(jnp.asarray(rng.uniform(0.5, 8, 40), jnp.bfloat16).astype(np.float32))
x = x * a; x[0], x[5] = -a, a
for qmax in (15, 255):
    f = lambda x: ref.choose_qparams(x, granularity=jq.PerChannel(-1), qmin=0, qmax=qmax, symmetric=False)
    g = jax.jit(f, backend="gpu")(x)[1]; c = jax.jit(f, backend="cpu")(x)[1]
    print("old XLA path, qmax", qmax, ": zp differs GPU vs CPU in", int((np.asarray(g) != np.asarray(c)).sum()), "of 40 channels")
