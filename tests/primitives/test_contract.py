"""Contract rules checked on their own: the W8A8 epilogue's two roundings under jit, the
asymmetric zero point's reciprocal, dynamic statistics ignoring infinities, concrete bad scales,
and the implementation choice being part of jax.jit's cache key."""

import threading

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
from conftest import HAS_GPU, assert_same_bits, run_impl


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_w8a8_epilogue_rounds_twice_under_jit(impl):
    """(acc * s_a) * w_scale is rounded before the bias add: 1 * (1/3) * 3 - 1 is 0.0 (an FMA gives 2.98e-08)."""
    args = (jnp.array([[1]], jnp.int8), jnp.array([[1]], jnp.int8), jnp.float32(1 / 3), jnp.array([3.], jnp.float32),
            jnp.array([-1.], jnp.float32))
    f = lambda a, w, s, ws, b: jq.int8_matmul(a, w, s, ws, b)
    got = run_impl(impl, f, *args)
    assert float(got[0, 0]) == 0.0
    assert float(f(*args)[0, 0]) == 0.0  # eager


def test_asymmetric_zero_point_uses_the_reciprocal():
    """zp = qmin - rne(lo * f32(1/scale)): 128 here, where a correctly rounded lo / scale gives 127."""
    x = jnp.array([[-0.34286046, 0.34286046]], jnp.float32)
    _, s, z = jq.dynamic_quantize(x, dtype=jnp.uint8, symmetric=False)
    lo = np.float32(-0.34286046)
    inv = np.float32(1) / np.asarray(s, np.float32)[0]
    assert int(z[0]) == 0 - int(np.round(lo * inv)) == 128
    assert 0 - int(np.round(np.float64(lo) / np.float64(np.asarray(s)[0]))) == 127


@pytest.mark.parametrize("sym,dtype", [(True, jnp.int8), (False, jnp.uint8)])
@pytest.mark.parametrize("g", [jq.PerToken(), jq.PerGroup(32), jq.PerTensor(), jq.PerChannel(0)], ids=str)
def test_dynamic_statistics_ignore_infinities(tier, rng, g, sym, dtype):
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1, 3], x[1, 40], x[2, 7] = np.inf, -np.inf, np.inf
    finite = x.copy()
    finite[~np.isfinite(finite)] = 0.0
    f = lambda x: jq.dynamic_quantize(x, granularity=g, dtype=dtype, symmetric=sym)
    for impl in ("reference", tier):
        q, s, z = run_impl(impl, f, jnp.asarray(x))
        q0, s0, z0 = run_impl(impl, f, jnp.asarray(finite))
        assert np.isfinite(np.asarray(s)).all()
        assert_same_bits(s, s0, f"{impl} scale")
        assert_same_bits(z, z0, f"{impl} zero point")
        qmin, qmax = (-128, 127) if sym else (0, 255)
        q, q0 = np.asarray(q), np.asarray(q0)
        assert q[1, 3] == qmax and q[2, 7] == qmax and q[1, 40] == qmin
        keep = np.isfinite(x)
        np.testing.assert_array_equal(q[keep], q0[keep])


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf, -0.0])
def test_concrete_bad_scales_raise(bad):
    x = jnp.ones((4, 8))
    s = jnp.array([0.1, bad, 0.1, 0.1], jnp.float32)
    with pytest.raises(ValueError, match=r"scale: expected finite values > 0"):
        jq.fake_quantize(x, s, granularity=jq.PerToken(), qmin=-128, qmax=127)
    with pytest.raises(ValueError, match=r"scale: expected finite values > 0"):
        jq.quantize(x, s, granularity=jq.PerToken())
    with pytest.raises(ValueError, match=r"scale: expected finite values > 0"):
        jq.dequantize(jnp.ones((4, 8), jnp.int8), s, granularity=jq.PerToken())
    with pytest.raises(ValueError, match=r"act_scale: expected finite values > 0"):
        jq.quantized_linear(x, jq.quantize_weight(jnp.ones((3, 8))), act_scale=jnp.float32(bad))
    with pytest.raises(ValueError, match=r"a_scale: expected finite values > 0"):
        jq.int8_matmul(jnp.ones((4, 8), jnp.int8), jnp.ones((3, 8), jnp.int8), s)
    with pytest.raises(ValueError, match=r"scale: expected finite values > 0"):
        jq.fake_quantize_learnable(x, jnp.float32(bad), granularity=jq.PerTensor(), qmin=-128, qmax=127)


def test_traced_scales_are_not_checked():
    """Under jit a scale is a tracer: no check, the formula's result (docs/numerics.md)."""
    f = jax.jit(lambda x, s: jq.fake_quantize(x, s, granularity=jq.PerTensor(), qmin=-128, qmax=127))
    y = f(jnp.ones((2, 2)), jnp.float32(0.0))
    assert y.shape == (2, 2)


def test_data_with_nan_still_quantizes():
    """Parameters the library computes are not value-checked: a NaN row gets a NaN scale by the contract."""
    x = jnp.array([[1.0, np.nan], [1.0, 2.0]])
    _, s, _ = jq.dynamic_quantize(x, granularity=jq.PerTensor())
    assert np.isnan(np.asarray(s))
    qw = jq.quantize_weight(x)
    assert np.isnan(np.asarray(qw.scale)[0]) and np.isfinite(np.asarray(qw.scale)[1])


def test_implementation_is_part_of_the_jit_cache_key():
    traced = []

    @jax.jit
    def f(x):
        traced.append(jq.describe(lambda x: jq.dynamic_quantize(x), x).ops[0].implementation)
        return jq.dynamic_quantize(x)[0]

    x = jnp.ones((4, 64))
    f(x)
    with jq.implementation("interpret"):
        f(x)
    with jq.implementation("reference"):
        f(x)
    f(x)  # back to "auto": the first trace is reused
    auto = "triton" if HAS_GPU else "reference (XLA)"
    assert traced == [auto, "triton (interpret mode)", "reference (XLA)"]

    seen = {}

    def worker():
        seen["thread"] = jq.core.backend.current_implementation()

    with jq.implementation("interpret"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        seen["main"] = jq.core.backend.current_implementation()
    assert seen == {"thread": "auto", "main": "interpret"}
