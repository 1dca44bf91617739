"""jaxquant in one minute: quantize per token and per group, look at the codes, measure the
round-trip error, and differentiate through fake_quantize under jit(grad(vmap(...))).

Runs on the CPU (the plain-jnp lowering) or on a GPU (the Pallas kernels): `make demo`.
"""

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq


def main():
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (4, 256), jnp.float32)
    x = x.at[:, 7].mul(20.0)  # an outlier channel, as in real activations

    # 1. Dynamic per-token int8: one fused pass computes max|x|, the scale and the codes.
    q, scale, _ = jq.dynamic_quantize(x)
    x_hat = jq.dequantize(q, scale, granularity=jq.PerToken())
    print("\nper-token int8 (dynamic, symmetric)")
    print("  codes[0, :8]   ", np.asarray(q[0, :8]))
    print("  scales         ", np.asarray(scale))
    err = jnp.linalg.norm(x_hat - x) / jnp.linalg.norm(x)
    print(f"  relative round-trip error {float(err):.2e}")

    # 2. Per-group int4 (groups of 32 along the last axis), asymmetric: the outlier only costs
    #    precision inside its own group.
    s4, z4 = jq.choose_qparams(x, granularity=jq.PerGroup(32), qmin=0, qmax=15, symmetric=False)
    q4 = jq.quantize(x, s4, z4, granularity=jq.PerGroup(32), qmin=0, qmax=15, dtype=jnp.uint8)
    x4 = jq.dequantize(q4, s4, z4, granularity=jq.PerGroup(32))
    print("\nper-group (g=32) uint4 codes in uint8, asymmetric")
    print("  codes[0, :8]   ", np.asarray(q4[0, :8]), " zero points[0]", np.asarray(z4[0]))
    err4 = jnp.linalg.norm(x4 - x) / jnp.linalg.norm(x)
    s4t, _ = jq.choose_qparams(x, granularity=jq.PerTensor(), qmin=-8, qmax=7)
    xt = jq.fake_quantize(x, s4t, granularity=jq.PerTensor(), qmin=-8, qmax=7)
    errt = jnp.linalg.norm(xt - x) / jnp.linalg.norm(x)
    print(f"  relative error {float(err4):.2e} (per-tensor int4: {float(errt):.2e})")

    # 3. Quantization-aware training: the straight-through estimator under jit(grad(vmap(...))).
    w = jax.random.normal(jax.random.PRNGKey(1), (256, 16)) * 0.1
    sw = jnp.full((16,), 0.02)

    def loss(w, xrow):
        wq = jq.fake_quantize(w, sw, granularity=jq.PerChannel(1), qmin=-8, qmax=7)
        return jnp.sum(jnp.tanh(xrow @ wq) ** 2)

    per_example = jax.jit(jax.grad(lambda w, xs: jnp.sum(jax.vmap(loss, (None, 0))(w, xs))))
    g = per_example(w, x)
    v = jnp.round(w * (1 / sw))
    inside = (v >= -8) & (v <= 7)  # the STE mask: rne(w / s) inside [qmin, qmax]
    print("\nQAT gradient through fake_quantize under jit(grad(vmap(...)))")
    print(f"  grad shape {g.shape}; zero where the weight is clipped: "
          f"{bool(jnp.all(jnp.where(inside, True, g == 0)))}; "
          f"{int((~inside).sum())} of {w.size} weights clipped")


if __name__ == "__main__":
    main()
