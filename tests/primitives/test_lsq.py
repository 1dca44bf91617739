"""LSQ (learnable scale / zero point): torch oracle, kernel (interpret) vs reference, CUDA lowering, transforms.

Tolerance of dscale / dzp. Each per-element term is computed in torch's operation order (so the
terms are the same float32 numbers); only the order of the final float32 sum differs. Any
summation order of n float32 terms t_i is within gamma_{n-1} * sum|t_i| (gamma_k = k u / (1 - k u),
u = 2**-24) of the exact sum, so two orders differ by at most 2 * gamma_{n-1} * sum|t_i|: that is
the bound we assert (per parameter element, with n its number of elements).
"""

import re

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import torch

import jaxquant as jq
from conftest import skip_without_cuda_lowering
from jaxquant.primitives.lsq import reference as rl
from jaxquant.primitives.lsq.api import fake_quantize_learnable, lsq_backward
from tests.conftest import assert_same_bits, run_impl

U = 2.0**-24


def _bound(n, abs_sum):
    g = (n - 1) * U / (1 - (n - 1) * U)
    return 2 * g * abs_sum + 1e-30


def _make(rng, shape, scale_b, zp_b, qmin, qmax, ties=True):
    span = (qmax - qmin + 1) * 0.7
    x = rng.standard_normal(shape) * span * scale_b
    if ties:
        flat = x.reshape(-1)
        sb = np.broadcast_to(scale_b, shape).reshape(-1)
        zb = np.broadcast_to(zp_b, shape).reshape(-1)
        idx = rng.choice(flat.size, flat.size // 4, replace=False)
        flat[idx] = (rng.integers(qmin - 3, qmax + 3, idx.size) - zb[idx] + 0.5) * sb[idx]
        x = flat.reshape(shape)
    return x.astype(np.float32)


def _torch_grads(x, scale, zp, dy, axis, qmin, qmax, gf):
    tx = torch.tensor(x, requires_grad=True)
    ts = torch.tensor(np.atleast_1d(scale), requires_grad=True)
    tz = torch.tensor(np.atleast_1d(zp), requires_grad=True)
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, qmin, qmax, gf)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, axis, qmin, qmax, gf)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), tx.grad.numpy(), ts.grad.numpy(), tz.grad.numpy()


def _ours(x, scale, zp, dy, gran, qmin, qmax, gf, impl="reference"):
    def f(x, s, z):
        y, vjp = jax.vjp(lambda a, b, c: fake_quantize_learnable(a, b, c, granularity=gran, qmin=qmin, qmax=qmax,
                                                                 grad_factor=gf), x, s, z)
        return (y,) + vjp(jnp.asarray(dy))
    return run_impl(impl, f, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(zp))


def _check_sums(ours, theirs, terms, sum_axes, what):
    a = np.abs(np.asarray(terms, np.float64))
    n = np.prod([terms.shape[i] for i in sum_axes]) if sum_axes else 1
    tol = _bound(n, np.sum(a, axis=sum_axes))
    diff = np.abs(np.asarray(ours, np.float64).reshape(tol.shape) - np.asarray(theirs, np.float64).reshape(tol.shape))
    assert (diff <= tol).all(), f"{what}: max excess {np.max(diff - tol)}"


@pytest.mark.parametrize("gf", [1.0, 0.37])
@pytest.mark.parametrize("qmin,qmax,zp", [(-128, 127, 0.0), (0, 255, 37.0), (0, 15, 6.3), (-8, 7, 0.0)])
def test_per_tensor_vs_torch(rng, gf, qmin, qmax, zp):
    scale = np.float32(2.0**-4)
    x = _make(rng, (33, 70), scale, round(zp), qmin, qmax)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    ty, tdx, tds, tdz = _torch_grads(x, scale, np.float32(zp), dy, None, qmin, qmax, gf)
    y, dx, ds, dz = _ours(x, scale, np.float32(zp), dy, jq.PerTensor(), qmin, qmax, gf)
    assert_same_bits(y, ty, "forward")
    assert_same_bits(dx, tdx, "dx")
    _, tds_terms, tdz_terms = rl.lsq_terms(jnp.asarray(dy), jnp.asarray(x), jnp.float32(scale),
                                           jnp.float32(round(zp)), qmin=qmin, qmax=qmax, grad_factor=gf)
    _check_sums(ds, tds, np.asarray(tds_terms), (0, 1), "dscale")
    _check_sums(dz, tdz, np.asarray(tdz_terms), (0, 1), "dzp")


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("qmin,qmax", [(-128, 127), (0, 15)])
def test_per_channel_vs_torch(rng, axis, qmin, qmax):
    shape = (5, 19, 24)
    c = shape[axis]
    pshape = [1, 1, 1]
    pshape[axis] = c
    scale = (2.0 ** rng.integers(-6, -2, c)).astype(np.float32)  # powers of two: exact ties
    zp = rng.uniform(qmin, qmax, c).astype(np.float32)  # non-integer float zero points
    zpr = np.clip(np.round(zp), qmin, qmax)
    sb, zb = scale.reshape(pshape), zpr.reshape(pshape)
    x = _make(rng, shape, sb.astype(np.float64), zb, qmin, qmax, ties=True)
    dy = rng.standard_normal(shape).astype(np.float32)
    ty, tdx, tds, tdz = _torch_grads(x, scale, zp, dy, axis % 3, qmin, qmax, 0.5)
    y, dx, ds, dz = _ours(x, scale, zp, dy, jq.PerChannel(axis), qmin, qmax, 0.5)
    assert_same_bits(y, ty, "forward")
    assert_same_bits(dx, tdx, "dx")
    _, t_s, t_z = rl.lsq_terms(jnp.asarray(dy), jnp.asarray(x), jnp.asarray(sb), jnp.asarray(zb, jnp.float32),
                               qmin=qmin, qmax=qmax, grad_factor=0.5)
    axes = tuple(i for i in range(3) if i != axis % 3)
    _check_sums(ds, tds, np.asarray(t_s), axes, "dscale")
    _check_sums(dz, tdz, np.asarray(t_z), axes, "dzp")


@pytest.mark.parametrize("shape,gran,dtype", [
    ((37, 70), jq.PerTensor(), jnp.float32),
    ((3, 45, 130), jq.PerChannel(1), jnp.float32),   # parameters on the middle axis
    ((45, 33), jq.PerChannel(-1), jnp.bfloat16),
    ((2, 3, 5, 7), jq.PerChannel(2), jnp.float32),   # more than three runs: expanded view
    ((300, 17), jq.PerChannel(0), jnp.float16),
])
def test_kernel_interpret_vs_reference(rng, tier, shape, gran, dtype):
    from jaxquant import granularity as G
    pshape = G.param_shape(gran, shape)
    scale = jnp.asarray(2.0 ** rng.integers(-5, -1, pshape), jnp.float32)
    zp = jnp.asarray(rng.uniform(-3, 20, pshape), jnp.float32)
    x = jnp.asarray(rng.standard_normal(shape) * 4, jnp.float32).astype(dtype)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    def f(dy, x, s, z):
        return lsq_backward(dy, x, s, z, granularity=gran, qmin=0, qmax=15, grad_factor=0.25)

    r = run_impl("reference", f, dy, x, scale, zp)
    k = run_impl(tier, f, dy, x, scale, zp)
    assert_same_bits(k[0], r[0], "dx")
    for a, b, name in ((k[1], r[1], "dscale"), (k[2], r[2], "dzp")):
        assert a.shape == b.shape == tuple(pshape), name
        # both are float32 sums of identical terms in different orders (tile partials vs XLA)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4, err_msg=name)


def test_symmetric_no_zero_point_grad(rng):
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    s = jnp.full((16,), 0.05, jnp.float32)
    g = jax.grad(lambda x, s: jnp.sum(fake_quantize_learnable(x, s, None, granularity=jq.PerChannel(1), qmin=-8,
                                                              qmax=7) ** 2), argnums=(0, 1))(x, s)
    assert g[0].shape == x.shape and g[1].shape == s.shape
    with jq.implementation("interpret"):
        g2 = jax.jit(jax.grad(lambda x, s: jnp.sum(fake_quantize_learnable(
            x, s, None, granularity=jq.PerChannel(1), qmin=-8, qmax=7) ** 2), argnums=(0, 1)))(x, s)
    assert_same_bits(g2[0], g[0], "dx")
    np.testing.assert_allclose(g2[1], g[1], rtol=1e-5, atol=1e-6)


def test_vmap_of_grad_matches_loop(rng):
    x = jnp.asarray(rng.standard_normal((4, 6, 10)) * 2, jnp.float32)
    s = jnp.asarray(rng.uniform(0.05, 0.3, (4, 10)), jnp.float32)
    z = jnp.asarray(rng.uniform(0, 15, (4, 10)), jnp.float32)

    def loss(x, s, z):
        return jnp.sum(fake_quantize_learnable(x, s, z, granularity=jq.PerChannel(1), qmin=0, qmax=15) * x)

    g = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(x, s, z)
    for i in range(4):
        gi = jax.grad(loss, argnums=(0, 1, 2))(x[i], s[i], z[i])
        for a, b in zip(g, gi):
            np.testing.assert_allclose(a[i], b, rtol=1e-6, atol=1e-6)
    # Unbatched parameters under vmap: per-example parameter gradients.
    gu = jax.vmap(jax.grad(loss, argnums=(1, 2)), in_axes=(0, None, None))(x, s[0], z[0])
    assert gu[0].shape == (4, 10)


def test_validation():
    x = jnp.ones((4, 8))
    with pytest.raises(TypeError, match="granularity"):
        fake_quantize_learnable(x, jnp.ones((4,)), None, granularity=jq.PerToken(), qmin=-8, qmax=7)
    with pytest.raises(ValueError, match="scale"):
        fake_quantize_learnable(x, jnp.ones((3,)), None, granularity=jq.PerChannel(1), qmin=-8, qmax=7)
    with pytest.raises(TypeError, match="FLOAT"):
        fake_quantize_learnable(x, jnp.ones((8,)), jnp.zeros((8,), jnp.int32), granularity=jq.PerChannel(1),
                                qmin=0, qmax=15)
    with pytest.raises(ValueError, match="include 0"):
        fake_quantize_learnable(x, jnp.ones(()), None, granularity=jq.PerTensor(), qmin=1, qmax=15)


@pytest.mark.lowering
@pytest.mark.parametrize("gran,pshape", [(jq.PerTensor(), ()), (jq.PerChannel(0), (6,)), (jq.PerChannel(1), (40,)),
                                         (jq.PerChannel(-1), (96,))])
def test_cuda_lowering(gran, pshape):
    x = jnp.ones((6, 40, 96), jnp.bfloat16)

    def f(x, s, z):
        return jax.value_and_grad(lambda x, s, z: jnp.sum(fake_quantize_learnable(x, s, z, granularity=gran, qmin=0, qmax=255)
                                                .astype(jnp.float32)), argnums=(0, 1, 2))(x, s, z)

    try:
        hlo = jax.jit(f).trace(x, jnp.ones(pshape), jnp.zeros(pshape)).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # pragma: no cover
        skip_without_cuda_lowering(e)
        raise
    names = re.findall(r'name = "(jaxquant_\w+)"', hlo)
    assert names.count("jaxquant_lsq_backward") == 1, names
    assert "jaxquant_fake_quantize" in names
