"""jit, grad, vmap, vmap-of-grad, remat, scan and check_grads, on the reference and the kernels."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.test_util import check_grads

import jaxquant as jq
from conftest import assert_same_bits, run_impl

IMPLS = ["reference", "interpret"]


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_is_the_ste(rng, impl):
    x = jnp.asarray(rng.standard_normal((8, 48)) * 0.5, jnp.float32)
    s = jnp.asarray(rng.uniform(0.01, 0.05, (8,)), jnp.float32)
    g = jq.PerToken()

    def loss(x):
        return (jq.fake_quantize(x, s, granularity=g, qmin=-8, qmax=7) ** 2).sum()

    gx = run_impl(impl, jax.grad(loss), x)
    y = run_impl("reference", lambda x: jq.fake_quantize(x, s, granularity=g, qmin=-8, qmax=7), x)
    v = jnp.round(x / s[:, None])
    m = (v >= -8) & (v <= 7)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(2 * y * m), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_float_code_quantize_grad(rng, impl):
    x = jnp.asarray(rng.standard_normal((5, 32)), jnp.float32)
    s = jnp.float32(0.125)
    f = lambda x: jq.quantize(x, s, granularity=jq.PerTensor(), dtype=jnp.float32, qmin=-8, qmax=7).sum()
    gx = run_impl(impl, jax.grad(f), x)
    m = (jnp.round(x * 8) >= -8) & (jnp.round(x * 8) <= 7)
    np.testing.assert_array_equal(np.asarray(gx), np.asarray(jnp.where(m, 8.0, 0.0)))


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_equals_loop(rng, impl):
    x = jnp.asarray(rng.standard_normal((3, 7, 40)), jnp.bfloat16)
    s = jnp.asarray(rng.uniform(0.01, 0.05, (3, 40)), jnp.float32)  # per-channel(-1), batched scales
    z = jnp.asarray(rng.integers(-3, 4, (40,)), jnp.int32)  # unbatched zero point
    f = lambda x, s: jq.fake_quantize(x, s, z, granularity=jq.PerChannel(-1), qmin=-128, qmax=127)
    got = run_impl(impl, jax.vmap(f), x, s)
    want = jnp.stack([run_impl("reference", f, x[i], s[i]) for i in range(3)])
    assert_same_bits(got, want, "vmap")
    # vmap over a non-leading axis of x with a shared scale
    f2 = lambda x: jq.quantize(x, s[0], z, granularity=jq.PerChannel(-1))
    got = run_impl(impl, jax.vmap(f2, in_axes=1, out_axes=1), x)
    assert_same_bits(got, run_impl("reference", f2, x), "vmap axis 1")
    # nested vmap, middle-axis per-channel: the longest broadcast pattern
    x4 = jnp.asarray(rng.standard_normal((2, 3, 5, 6, 4)), jnp.float32)
    s4 = jnp.asarray(rng.uniform(0.05, 0.1, (2, 3, 6)), jnp.float32)
    f4 = lambda x, s: jq.quantize(x, s, granularity=jq.PerChannel(1))
    got = run_impl(impl, jax.vmap(jax.vmap(f4)), x4, s4)
    want = jnp.stack([jnp.stack([run_impl("reference", f4, x4[i, j], s4[i, j]) for j in range(3)]) for i in range(2)])
    assert_same_bits(got, want, "nested vmap")


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_of_grad_and_remat_and_scan(rng, impl):
    x = jnp.asarray(rng.standard_normal((4, 6, 32)), jnp.float32)
    s = jnp.asarray(rng.uniform(0.01, 0.05, (4, 6)), jnp.float32)
    loss = lambda x, s: jnp.sum(jq.fake_quantize(x, s, granularity=jq.PerToken(), qmin=-8, qmax=7) ** 2)
    vg = run_impl(impl, jax.vmap(jax.grad(loss)), x, s)
    want = jnp.stack([run_impl("reference", jax.grad(loss), x[i], s[i]) for i in range(4)])
    assert_same_bits(vg, want, "vmap(grad)")
    rg = run_impl(impl, jax.vmap(jax.grad(jax.checkpoint(loss))), x, s)
    assert_same_bits(rg, want, "remat")

    def scan_loss(x):
        def body(c, xs):
            xi, si = xs
            return c + loss(xi, si), None
        return jax.lax.scan(body, jnp.float32(0), (x, s))[0]

    sg = run_impl(impl, jax.grad(scan_loss), x)
    assert_same_bits(sg, want, "scan")


@pytest.mark.parametrize("impl", IMPLS)
def test_check_grads_on_linear_functions(rng, impl):
    """Differentiable parts: dequantize is linear in scale; the STE backward is linear in dy.

    Checked in float64: central differences in float32 on values up to 127 carry rounding noise
    of ~1e-3 relative, the size of check_grads' float32 tolerance (a flaky test); in float64 the
    check is exact to ~1e-10.
    """
    with jax.enable_x64(True):
        q = jnp.asarray(rng.integers(-128, 128, (6, 16)), jnp.int8)
        s = jnp.asarray(rng.uniform(0.5, 1.0, (6,)), jnp.float64)
        x = jnp.asarray(rng.standard_normal((6, 16)), jnp.float64)
        with jq.implementation(impl):
            check_grads(lambda s: jq.dequantize(q, s, granularity=jq.PerChannel(0), dtype=jnp.float64), (s,),
                        order=1, modes=["rev"])
            check_grads(lambda dy: jq.fake_quantize_backward(dy, x, s, granularity=jq.PerChannel(0), qmin=-8,
                                                             qmax=7), (x,), order=1, modes=["rev"])
            check_grads(lambda dy: jq.quantize_backward(dy, x, s, granularity=jq.PerChannel(0), qmin=-8, qmax=7),
                        (x,), order=1, modes=["rev"])


def test_scale_and_int_code_gradients_are_zero(rng):
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    s = jnp.full((4,), 0.1, jnp.float32)
    gs = jax.grad(lambda s: jq.fake_quantize(x, s, granularity=jq.PerToken(), qmin=-8, qmax=7).sum())(s)
    np.testing.assert_array_equal(np.asarray(gs), 0)
    gx = jax.grad(lambda x: jq.quantize(x, s, granularity=jq.PerToken()).astype(jnp.float32).sum())(x)
    np.testing.assert_array_equal(np.asarray(gx), 0)
