"""GPU diagnostic: which in-kernel step differs from XLA on the CPU (reciprocal, product, rounding)?"""
import functools
import numpy as np
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jaxquant.pallas import common as C

R, N = 64, 4096
rng = np.random.default_rng(0)
s = rng.uniform(0.003, 0.2, (R, 1)).astype(np.float32)
k = rng.integers(-130, 130, (R, N))
x = ((k + 0.5) * s.astype(np.float64)).astype(np.float32)
x[:, ::2] = (rng.standard_normal((R, N // 2)) * 50 * s).astype(np.float32)

def kern(x_ref, s_ref, inv_ref, p_ref, rf_ref, rp_ref, *, variant):
    x = x_ref[...]; s = s_ref[...]
    inv = C.recip(s, fast=bool(variant))
    p = x * inv
    inv_ref[...] = jnp.broadcast_to(inv, x.shape)
    p_ref[...] = p
    rf_ref[...] = C.rne(p, fast=True)
    rp_ref[...] = C.rne(p, fast=False)

def run(variant):
    f = pl.pallas_call(functools.partial(kern, variant=variant),
        out_shape=[jax.ShapeDtypeStruct((R, N), jnp.float32)] * 4, grid=(R // 8, N // 1024),
        in_specs=[pl.BlockSpec((8, 1024), lambda i, j: (i, j)), pl.BlockSpec((8, 1), lambda i, j: (i, 0))],
        out_specs=[pl.BlockSpec((8, 1024), lambda i, j: (i, j))] * 4,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1), name="diag")
    return [np.asarray(o) for o in jax.jit(f)(x, s)]

inv_ref = (np.float32(1) / s).astype(np.float32)
for variant in (0, 1):
    inv, p, rf, rp = run(variant)
    print(f"variant {'rcp.rn' if variant else '1/s'}: recip mismatches {int((inv[:, :1] != inv_ref).sum())} of {R}, "
          f"product mismatches {int((p != x * inv_ref).sum())}")
p_ref = x * inv_ref
