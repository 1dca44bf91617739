"""Dynamic quantization (fused per-token / per-group kernel; per-tensor / per-channel via XLA
reductions) and choose_qparams: kernel == reference bit for bit, including NaN rows, all-zero
rows, Inf, ragged rows, long rows (the two-loop path) and the >2**31-element chunking."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq

from jaxquant.pallas.affine import triton as affine_k
from jaxquant.pallas.dynamic import triton as dynamic_k
from conftest import assert_same_bits, run_impl

RANGES = [(True, jnp.int8, None, None), (False, jnp.uint8, None, None), (False, jnp.int8, None, None),
          (True, jnp.int8, -8, 7), (False, jnp.uint8, 0, 15)]


def _x(rng, shape, dtype):
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10)
    x = x.reshape(-1, shape[-1])
    if x.shape[0] >= 4:
        x[0] = 0.0  # all-zero row: scale 2**-126, codes 0
        x[1, rng.integers(0, shape[-1])] = np.nan  # NaN row: scale NaN, codes qmin
        x[2, rng.integers(0, shape[-1])] = np.inf
        x[3] = np.abs(x[3])  # all positive: lo = 0
    return jnp.asarray(x.reshape(shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("sym,dtype,qmin,qmax", RANGES)
@pytest.mark.parametrize("shape,g,cfg", [
    ((37, 96), jq.PerToken(), None),
    ((2, 9, 130), jq.PerToken(), None),
    ((6, 1000), jq.PerToken(), dynamic_k.Config(2, 256, 4)),   # 4 column chunks, ragged
    ((9, 300), jq.PerToken(), dynamic_k.Config(4, 128, 4)),    # ragged rows and columns
    ((12, 256), jq.PerGroup(64), None),
    ((5, 3, 96), jq.PerGroup(32), None),
    ((37, 96), jq.PerTensor(), None),
    ((37, 96), jq.PerChannel(-1), None),
    ((5, 7, 24), jq.PerChannel(1), None),
])
def test_dynamic_kernel_equals_reference(tier, rng, shape, g, cfg, sym, dtype, qmin, qmax):
    xdt = [jnp.bfloat16, jnp.float32, jnp.float16][rng.integers(0, 3)]
    x = _x(rng, shape, xdt)
    kw = dict(granularity=g, dtype=dtype, symmetric=sym, qmin=qmin, qmax=qmax)
    if isinstance(g, (jq.PerToken, jq.PerGroup)):
        kw["config"] = cfg
    f = lambda x: jq.dynamic_quantize(x, **kw)
    want = run_impl("reference", f, x)
    got = run_impl(tier, f, x)
    for name, a, b in zip(["q", "scale", "zero_point"], got, want):
        assert_same_bits(a, b, f"{name} ({np.dtype(xdt).name})")
    q, s, z = want
    assert s.dtype == jnp.float32 and z.dtype == jnp.int32 and q.dtype == dtype
    assert s.shape == jq.granularity.param_shape(g, shape)


@pytest.mark.parametrize("g", [jq.PerChannel(-1), jq.PerChannel(0), jq.PerTensor()], ids=str)
@pytest.mark.parametrize("qmin,qmax,dtype", [(0, 15, jnp.uint8), (0, 255, jnp.uint8), (-128, 127, jnp.int8)])
def test_dynamic_zero_point_ties(tier, rng, g, qmin, qmax, dtype):
    """hi == -lo makes ``lo * (1 / scale)`` a .5 tie for these ranges (e.g. -3 * 2.5 = -7.5 for
    0..15): the zero point is right only with a correctly rounded reciprocal (XLA:GPU's float32
    ``1 / s`` gave it one off on an H200)."""
    x = rng.uniform(-1, 1, (33, 40)).astype(np.float32)
    a = np.asarray(jnp.asarray(rng.uniform(0.5, 8, 40), jnp.bfloat16).astype(np.float32))
    x = x * a  # |x| < a in each column, then each column's extremes are exactly -a and +a
    x[0], x[5] = -a, a
    if isinstance(g, jq.PerChannel) and g.axis == 0:
        x = x.T.copy()
    if isinstance(g, jq.PerTensor):
        x[0, 0], x[5, 0] = -3.0, 3.0
        x = np.clip(x, -3.0, 3.0)
    x = jnp.asarray(x)
    f = lambda x: jq.dynamic_quantize(x, granularity=g, dtype=dtype, symmetric=False, qmin=qmin, qmax=qmax)
    want = run_impl("reference", f, x)
    got = run_impl(tier, f, x)
    for name, u, v in zip(["q", "scale", "zero_point"], got, want):
        assert_same_bits(u, v, name)


def test_dynamic_reference_formulas(rng):
    """The spec by hand: symmetric int8 scale = amax * f32(1/127); codes round-trip within s/2."""
    x = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    q, s, z = jq.dynamic_quantize(x)
    amax = np.abs(np.asarray(x)).max(-1)
    np.testing.assert_array_equal(np.asarray(s), (amax * np.float32(1 / 127)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(z), 0)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(s)[:, None] - np.asarray(x))
    assert (err <= np.asarray(s)[:, None] * 0.5 * (1 + 1e-6)).all()
    assert np.abs(np.asarray(q)).max() == 127
    # special rows
    xz = jnp.zeros((2, 8)).at[1, 3].set(jnp.nan)
    q, s, z = jq.dynamic_quantize(xz, symmetric=False, dtype=jnp.uint8)
    assert float(s[0]) == 2.0**-126 and np.isnan(float(s[1]))
    np.testing.assert_array_equal(np.asarray(q[1]), 0)  # NaN row: codes qmin, zp qmin
    assert int(z[1]) == 0


def test_choose_qparams_matches_dynamic(rng):
    x = jnp.asarray(rng.standard_normal((6, 64)), jnp.float32)
    for g in [jq.PerToken(), jq.PerGroup(16), jq.PerChannel(0), jq.PerChannel(1), jq.PerTensor()]:
        for sym, qmin, qmax in [(True, -128, 127), (False, 0, 255), (False, -8, 7)]:
            s, z = jq.choose_qparams(x, granularity=g, qmin=qmin, qmax=qmax, symmetric=sym)
            q2, s2, z2 = jq.dynamic_quantize(x, granularity=g, symmetric=sym, qmin=qmin, qmax=qmax,
                                             dtype=jnp.uint8 if qmin == 0 else jnp.int8)
            assert_same_bits(s, s2, f"scale {g}")
            assert_same_bits(z, z2, f"zp {g}")
            q = jq.quantize(x, s, None if sym else z, granularity=g, qmin=qmin, qmax=qmax, dtype=q2.dtype)
            assert_same_bits(q, q2, f"codes {g}")


def test_dynamic_vmap_and_no_grad(rng):
    x = jnp.asarray(rng.standard_normal((3, 5, 40)), jnp.float32)
    for impl in ["reference", "interpret"]:
        got = run_impl(impl, jax.vmap(lambda x: jq.dynamic_quantize(x)), x)
        want = run_impl("reference", lambda x: jq.dynamic_quantize(x), x)
        for a, b in zip(got, want):
            assert_same_bits(a, b, "vmap")
    g = jax.grad(lambda x: jq.dynamic_quantize(x)[1].sum())(x)
    np.testing.assert_array_equal(np.asarray(g), 0)


@pytest.mark.parametrize("impl", ["interpret"])
def test_chunked_1byte_arrays_over_int32_offsets(monkeypatch, rng, impl):
    """1-byte arrays past the int32 offset limit run in row chunks (limit lowered to exercise it)."""
    monkeypatch.setattr(affine_k, "_MAX_I32_OFFSET", 1000)
    monkeypatch.setattr(dynamic_k, "_MAX_I32_OFFSET", 1000)
    x = jnp.asarray(rng.standard_normal((37, 96)) * 3, jnp.bfloat16)
    s = jnp.asarray(rng.uniform(0.01, 0.05, (37,)), jnp.float32)
    z = jnp.asarray(rng.integers(-4, 5, (37,)), jnp.int32)
    cfg = affine_k.Config(4, 32, 4)

    def f(x, s):
        q = jq.quantize(x, s, z, granularity=jq.PerToken(), config=cfg)
        return (q, jq.dequantize(q, s, z, granularity=jq.PerToken(), config=cfg),
                jq.quantize(x, s[0], granularity=jq.PerTensor()),
                *jq.dynamic_quantize(x, symmetric=False, config=dynamic_k.Config(4, 32, 4)))

    want = run_impl("reference", f, x, s)
    got = run_impl(impl, f, x, s)
    for a, b in zip(got, want):
        assert_same_bits(a, b, "chunked")
    hlo = jax.jit(f).trace(x, s).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count('name = "jaxquant_quantize"') > 2  # really chunked


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    """bf16 [65536, 40000] (2.6e9 elements, 5.2 GB) quantizes correctly on the GPU."""
    m, d = 65536, 40000
    x = (jax.random.normal(jax.random.PRNGKey(0), (m, d), jnp.float32) * 3).astype(jnp.bfloat16)
    q, s, _ = jax.jit(jq.dynamic_quantize)(x)
    # check the last rows (beyond 2**31 elements) and a sample against the reference on the GPU
    rows = jnp.array([0, 1, m // 2, m - 2, m - 1])
    with jq.implementation("reference"):
        q_ref, s_ref, _ = jax.jit(jq.dynamic_quantize)(x[rows])
    assert_same_bits(q[rows], q_ref, "dynamic q")
    assert_same_bits(s[rows], s_ref, "dynamic scale")
    q2 = jax.jit(lambda x, s: jq.quantize(x, s, granularity=jq.PerToken()))(x, s)
    assert bool((q2 == q).all())
    xd = jax.jit(lambda q, s: jq.dequantize(q, s, granularity=jq.PerToken(), dtype=jnp.bfloat16))(q, s)
    err = jnp.abs(xd.astype(jnp.float32) - x.astype(jnp.float32))
    # half a step of quantization error plus the bf16 rounding of x_hat (<= 127 steps * 2**-9)
    assert float(jnp.max(err / s[:, None])) <= 0.5 + 127 * 2**-9 * 1.01
