"""The affine family (quantize, dequantize, fake_quantize and both STE backwards): kernels == reference.

One parametrized suite: every granularity on ragged shapes, int8 / uint8 / int4-in-int8 /
uint4-in-uint8 ranges, symmetric and asymmetric, float32 / bfloat16 / float16 inputs, with .5 ties,
clamp edges, zeros, NaN and +-Inf. The kernel tier (interpret mode on CPU, real kernels on a GPU)
must equal the reference bit for bit (docs/numerics.md).
"""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import granularity as G
from conftest import HAS_GPU, assert_same_bits, make_params, make_x, run_impl

# (shape, granularity): ragged sizes that are not multiples of any block.
CASES = [
    ((37, 96), jq.PerToken()),
    ((3, 5, 64), jq.PerToken()),
    ((1, 1000), jq.PerToken()),
    ((37, 96), jq.PerTensor()),
    ((7, 130), jq.PerTensor()),
    ((37, 96), jq.PerChannel(0)),
    ((37, 96), jq.PerChannel(-1)),
    ((3, 5, 64), jq.PerChannel(1)),
    ((7, 130), jq.PerChannel(1)),
    ((37, 96), jq.PerGroup(32)),
    ((7, 130), jq.PerGroup(65)),
    ((129, 256), jq.PerGroup(64)),
    ((3, 5, 64), jq.PerGroup(16)),
    ((2, 3, 4, 40), jq.PerChannel(2)),
]
RANGES = [("int8", jnp.int8, -128, 127), ("uint8", jnp.uint8, 0, 255),
          ("int4", jnp.int8, -8, 7), ("uint4", jnp.uint8, 0, 15)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


def _all_ops(x, dy, scale, zp, q, *, g, dtype, qmin, qmax):
    kw = dict(granularity=g)
    return (
        jq.quantize(x, scale, zp, qmin=qmin, qmax=qmax, dtype=dtype, **kw),
        jq.quantize(x, scale, zp, qmin=qmin, qmax=qmax, dtype=jnp.float32, **kw),
        jq.dequantize(q, scale, zp, dtype=x.dtype, **kw),
        jq.fake_quantize(x, scale, zp, qmin=qmin, qmax=qmax, **kw),
        jq.fake_quantize_backward(dy, x, scale, zp, qmin=qmin, qmax=qmax, **kw),
        jq.quantize_backward(dy, x, scale, zp, qmin=qmin, qmax=qmax, **kw),
    )


NAMES = ["quantize", "quantize(float codes)", "dequantize", "fake_quantize", "fake_quantize_backward",
         "quantize_backward"]


def _inputs(rng, shape, g, dtype, xdt, qmin, qmax, asym, pow2):
    pshape = G.param_shape(g, shape)
    scale, zp = make_params(rng, pshape, qmin=qmin, qmax=qmax, asymmetric=asym, pow2=pow2)
    xb_shape = G.to_broadcast_form(jnp.zeros(shape), jnp.zeros(pshape), g)[0].shape
    sb = np.reshape(scale, G.to_broadcast_form(jnp.zeros(shape), jnp.asarray(scale), g)[1].shape)
    zb = None if zp is None else np.reshape(zp, sb.shape)
    x = make_x(rng, xb_shape, xdt, sb.astype(np.float64), zb, qmin=qmin, qmax=qmax).reshape(shape)
    dy = jnp.asarray(rng.standard_normal(shape), xdt)
    q = jnp.asarray(rng.integers(qmin, qmax + 1, size=shape), dtype)
    return x, dy, jnp.asarray(scale), None if zp is None else jnp.asarray(zp), q


def _grid():
    """(case, range, symmetric or not): the whole grid on a GPU; on the CPU (interpret mode, ~0.8 s
    a case) each case and range meets one of sym / asym, in turn, so that every case and every
    range still sees both."""
    out = []
    for i, (shape, g) in enumerate(CASES):
        for j, r in enumerate(RANGES):
            for asym in (False, True):
                if HAS_GPU or asym == bool((i + j) % 2):
                    out.append(pytest.param(shape, g, *r, asym, id=f"{shape}-{g}-{r[0]}-{'asym' if asym else 'sym'}"))
    return out


@pytest.mark.parametrize("shape,g,rname,dtype,qmin,qmax,asym", _grid())
def test_kernel_equals_reference(tier, rng, shape, g, rname, dtype, qmin, qmax, asym):
    xdt = DTYPES[(len(shape) + qmax + asym) % 3]  # cycle input dtypes across the grid
    pow2 = bool(rng.integers(0, 2))
    x, dy, scale, zp, q = _inputs(rng, shape, g, dtype, xdt, qmin, qmax, asym, pow2)
    fn = lambda *a: _all_ops(*a, g=g, dtype=dtype, qmin=qmin, qmax=qmax)
    want = run_impl("reference", fn, x, dy, scale, zp, q)
    got = run_impl(tier, fn, x, dy, scale, zp, q)
    for name, a, b in zip(NAMES, got, want):
        assert_same_bits(a, b, f"{name} [{tier} vs reference, x {np.dtype(xdt).name}, pow2 scales={pow2}]")


def test_special_values_contract():
    """NaN -> qmin, +Inf -> qmax, -Inf -> qmin; the STE mask is 0 for all three; ties go to even."""
    x = jnp.array([np.nan, np.inf, -np.inf, 0.5, 1.5, 2.5, -0.5, -2.5, 7.49, 7.5, -8.5, -8.51], jnp.float32)
    s = jnp.float32(1.0)
    for impl in ["reference", "interpret"]:
        with jq.implementation(impl):
            q = jq.quantize(x, s, granularity=jq.PerTensor(), qmin=-8, qmax=7)
            np.testing.assert_array_equal(np.asarray(q), [-8, 7, -8, 0, 2, 2, 0, -2, 7, 7, -8, -8])
            g = jax.grad(lambda x: jq.fake_quantize(x, s, granularity=jq.PerTensor(), qmin=-8, qmax=7).sum())(x)
            # rne(-8.5) = -8 (half to even) is inside [-8, 7]: mask 1; rne(7.5) = 8 is outside: mask 0.
            np.testing.assert_array_equal(np.asarray(g), [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0])


def test_float64_when_enabled(rng):
    """float64 inputs compute in float64 (interpret-mode kernel == reference, on the CPU; on a GPU
    float64 runs through XLA, see jaxquant.core.backend)."""
    if jax.devices()[0].platform != "cpu":
        pytest.skip("the float64 kernel tier is checked on the CPU")
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((9, 40)) * 5, jnp.float64)
        s = jnp.asarray(rng.uniform(0.01, 0.1, (9,)), jnp.float64)
        fn = lambda x, s: (jq.fake_quantize(x, s, granularity=jq.PerChannel(0), qmin=-128, qmax=127),
                           jq.dequantize(jq.quantize(x, s, granularity=jq.PerChannel(0)), s,
                                         granularity=jq.PerChannel(0), dtype=jnp.float64))
        want = run_impl("reference", fn, x, s)
        got = run_impl("interpret", fn, x, s)
        assert want[0].dtype == jnp.float64
        for a, b in zip(got, want):
            assert_same_bits(a, b, "float64")
        # dequantize really uses the float64 scale (not a float32 copy of it)
        q = jnp.asarray(rng.integers(-128, 128, (9, 40)), jnp.int8)
        xd = jq.dequantize(q, s, granularity=jq.PerChannel(0), dtype=jnp.float64)
        np.testing.assert_array_equal(np.asarray(xd), np.asarray(q, np.float64) * np.asarray(s)[:, None])


def test_zero_size_and_scalar():
    for impl in ["reference", "interpret"]:
        with jq.implementation(impl):
            assert jq.quantize(jnp.zeros((0, 8)), jnp.zeros((0,)) + 1, granularity=jq.PerToken()).shape == (0, 8)
            q = jq.quantize(jnp.float32(3.3), jnp.float32(0.5), granularity=jq.PerTensor())
            assert q.shape == () and int(q) == 7


@pytest.mark.parametrize("impl", ["reference", "interpret"])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("scale_const", [False, True])
def test_zero_codes_are_plus_zero(impl, with_zp, scale_const):
    """Small negatives round to a zero code: fake_quantize gives +0.0 (PyTorch does), float codes
    are +0.0, whatever XLA folds (a constant scale, no zero point)."""
    x = jnp.array([[-0.001, -0.3, -0.5, 0.2, -5.0, -0.0]], jnp.float32)
    zp = jnp.zeros((1,), jnp.int32) if with_zp else None
    s0 = jnp.ones((1,), jnp.float32)

    def f(x, s):
        s = s0 if scale_const else s
        return (jq.fake_quantize(x, s, zp, granularity=jq.PerToken(), qmin=-8, qmax=7),
                jq.quantize(x, s, zp, granularity=jq.PerToken(), qmin=-8, qmax=7, dtype=jnp.float32),
                jq.dequantize(jnp.zeros((1, 6), jnp.int8), s, zp, granularity=jq.PerToken()))

    for out in run_impl(impl, f, x, s0):
        np.testing.assert_array_equal(np.signbit(np.asarray(out))[0, :4], False)
