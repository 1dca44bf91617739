"""fp8 codes in the quantize family (quantize / dequantize / fake_quantize / backward ops /
dynamic_quantize) and the PerBlock granularity.

Oracles: PyTorch CPU (``torch.clamp(x * inv, -fmax, fmax).to(torch.float8_*)``) bit for bit on random
values and on every midpoint between neighbouring fp8 values; numpy for the STE mask and the dynamic
scale. The kernels (interpret mode on the CPU, the real kernels on a GPU) equal the reference bit for bit; every new kernel
variant lowers for CUDA.
"""

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.core.numerics import fp8_max
from jaxquant.granularity import param_shape, to_broadcast_form
from conftest import TIERS as KERNEL_TIERS, assert_same_bits, cuda_kernels, run_impl

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
FP8 = [E4M3, E5M2]
TORCH = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}
KERNEL = KERNEL_TIERS[0]  # interpret mode on the CPU, the real kernels on a GPU
TIERS = ["reference", KERNEL]


def ids(dt):
    return np.dtype(dt).name


FP8_OPS = ("quantize", "dequantize", "fake_quantize", "fq_backward", "q_backward")


def fp8_ops(g, dt):
    """``(x, dy, s) ->`` the fp8 quantize family's ``FP8_OPS`` with granularity ``g``, format ``dt``."""
    def fns(x, dy, s):
        q = jq.quantize(x, s, granularity=g, dtype=dt)
        return (q, jq.dequantize(q, s, granularity=g, dtype=jnp.bfloat16),
                jq.fake_quantize(x, s, granularity=g, code_dtype=dt),
                jq.fake_quantize_backward(dy, x, s, granularity=g, code_dtype=dt),
                jq.quantize_backward(dy, x, s, granularity=g, dtype=dt))
    return fns


def torch_codes(x, inv, dt):
    """PyTorch's fp8 quantization of float32 x with float32 inverse scales (broadcast to x)."""
    xt = torch.from_numpy(np.array(x, np.float32))
    it = torch.from_numpy(np.broadcast_to(np.asarray(inv, np.float32), np.shape(x)).copy())
    fmax = fp8_max(dt)
    q = torch.clamp(xt * it, -fmax, fmax).to(TORCH[dt])
    return np.asarray(q.view(torch.uint8).numpy()).view(np.dtype(dt))


def all_finite(dt):
    """Every finite value of the format, sorted (float64)."""
    v = np.arange(256, dtype=np.uint8).view(np.dtype(dt)).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def midpoints(dt):
    """Every midpoint between neighbouring finite fp8 values (exact in float32), the values
    themselves, and points past +-fmax."""
    v = all_finite(dt)
    mids = (v[1:] + v[:-1]) / 2
    fmax = fp8_max(dt)
    extra = np.array([fmax * 1.01, fmax * 1.5, 2 * fmax, 1e30, -2 * fmax, np.inf, -np.inf, np.nan, -0.0, 0.0])
    assert np.array_equal(mids.astype(np.float32).astype(np.float64), mids)  # ties stay ties in float32
    return np.concatenate([mids, v, extra]).astype(np.float32)


def rand_x(rng, shape, scale_b, dt, dtype=jnp.float32):
    """Values spanning the format's range at the given scales, past fmax, ties and specials."""
    fmax = fp8_max(dt)
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-12, 10, size=shape)
    x = np.clip(x, -3 * fmax, 3 * fmax) * scale_b
    flat = x.reshape(-1)
    n = flat.size
    mids = midpoints(dt)
    idx = rng.choice(n, size=max(1, n // 4), replace=False)
    flat[idx] = rng.choice(mids[np.isfinite(mids)], idx.size) * np.broadcast_to(scale_b, shape).reshape(-1)[idx]
    for v in (np.nan, np.inf, -np.inf, 0.0, -0.0):
        flat[rng.integers(0, n)] = v
    return jnp.asarray(flat.reshape(shape).astype(np.float32)).astype(dtype)


# (granularity, x shape): scale shape from param_shape; small, ragged sizes, few grid steps
GRANS = [
    (jq.PerTensor(), (5, 33)),
    (jq.PerToken(), (3, 7, 40)),
    (jq.PerGroup(16), (6, 48)),
    (jq.PerChannel(0), (9, 20)),
    (jq.PerChannel(-1), (7, 36)),  # parameters along the columns: the reciprocal kernel
    (jq.PerChannel(1), (3, 5, 4)),
    (jq.PerBlock((4, 16)), (12, 48)),
    (jq.PerBlock((2, 8)), (2, 6, 24)),
]


def make_scale(rng, g, shape, pow2=False):
    pshape = param_shape(g, shape)
    s = 2.0 ** rng.integers(-4, 4, size=pshape) if pow2 else 2.0 ** rng.uniform(-4, 4, size=pshape)
    return jnp.asarray(s, jnp.float32)


def scale_b(g, shape, s):
    xb, sb = to_broadcast_form(jnp.zeros(shape), s, g)
    return np.broadcast_to(np.asarray(sb), xb.shape).reshape(shape)


# ---------------------------------------------------------------------------------------------
# PyTorch oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", FP8, ids=ids)
@pytest.mark.parametrize("impl", TIERS)
def test_every_midpoint_matches_torch(dt, impl):
    x = midpoints(dt)
    x = np.concatenate([x, -x])
    n = x.size
    x = jnp.asarray(np.pad(x, (0, (-n) % 64)).reshape(-1, 64))
    q = run_impl(impl, lambda x: jq.quantize(x, jnp.float32(1), granularity=jq.PerTensor(), dtype=dt), x)
    assert_same_bits(q, torch_codes(x, 1.0, dt), "quantize vs torch at midpoints")


@pytest.mark.parametrize("dt", FP8, ids=ids)
@pytest.mark.parametrize("g,shape", GRANS[:2] + GRANS[4:5] + GRANS[6:7])
def test_random_values_match_torch(rng, dt, g, shape):
    s = make_scale(rng, g, shape)
    sb = scale_b(g, shape, s)
    x = rand_x(rng, shape, sb, dt)
    inv = (np.float32(1) / sb.astype(np.float32)).astype(np.float32)
    want = torch_codes(x, inv, dt)
    for impl in TIERS:
        q = run_impl(impl, lambda x, s: jq.quantize(x, s, granularity=g, dtype=dt), x, s)
        assert_same_bits(q, want, f"{impl} quantize vs torch")


def test_many_random_values_match_torch(rng):
    """The reference on 256K values of each format (a wide span of magnitudes and scales)."""
    for dt in FP8:
        x = rand_x(rng, (512, 512), 1.0, dt)
        s = jnp.asarray(2.0 ** rng.uniform(-8, 8, size=(512,)), jnp.float32)
        inv = (np.float32(1) / np.asarray(s)).astype(np.float32)[:, None]
        q = run_impl("reference", lambda x, s: jq.quantize(x, s, granularity=jq.PerToken(), dtype=dt), x, s)
        assert_same_bits(q, torch_codes(x, inv, dt), "reference vs torch")


def test_specials():
    x = jnp.asarray([np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0, 0.0, 448.0, 464.0, 465.0], jnp.float32)
    for impl in TIERS:
        q = run_impl(impl, lambda x: jq.quantize(x, jnp.float32(1), granularity=jq.PerTensor(), dtype=E4M3), x)
        f = np.asarray(q).astype(np.float32)
        assert np.isnan(f[0])
        np.testing.assert_array_equal(f[1:5], [448, -448, 448, -448])
        assert np.signbit(f[5]) and not np.signbit(f[6])
        np.testing.assert_array_equal(f[7:], [448, 448, 448])  # saturates: never NaN
        q5 = run_impl(impl, lambda x: jq.quantize(x, jnp.float32(1), granularity=jq.PerTensor(), dtype=E5M2), x)
        np.testing.assert_array_equal(np.asarray(q5).astype(np.float32)[1:3], [57344, -57344])


# ---------------------------------------------------------------------------------------------
# kernels == reference, every op and granularity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", FP8, ids=ids)
@pytest.mark.parametrize("g,shape", GRANS)
def test_kernels_equal_reference(rng, dt, g, shape):
    s = make_scale(rng, g, shape)
    x = rand_x(rng, shape, scale_b(g, shape, s), dt, jnp.bfloat16 if len(shape) == 3 else jnp.float32)
    dy = jnp.asarray(rng.standard_normal(shape), x.dtype)

    fns = fp8_ops(g, dt)
    ref = run_impl("reference", fns, x, dy, s)
    got = run_impl(KERNEL, fns, x, dy, s)
    for name, a, b in zip(FP8_OPS, got, ref):
        assert_same_bits(a, b, name)


@pytest.mark.parametrize("dt", FP8, ids=ids)
def test_reference_formulas(rng, dt):
    """dequantize = f32(q) * scale; fake_quantize = dequantize(quantize); STE masks from numpy."""
    g, shape = jq.PerBlock((4, 16)), (8, 32)
    s = make_scale(rng, g, shape)
    sb = scale_b(g, shape, s).astype(np.float32)
    x = rand_x(rng, shape, sb, dt)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q = jq.quantize(x, s, granularity=g, dtype=dt)
    deq = np.asarray(q).astype(np.float32) * sb
    assert_same_bits(jq.dequantize(q, s, granularity=g), deq, "dequantize")
    assert_same_bits(jq.fake_quantize(x, s, granularity=g, code_dtype=dt), deq, "fake_quantize")
    inv = (np.float32(1) / sb).astype(np.float32)
    with np.errstate(invalid="ignore"):
        m = np.abs(np.asarray(x) * inv) <= fp8_max(dt)
    dyn = np.asarray(dy)
    assert_same_bits(jq.fake_quantize_backward(dy, x, s, granularity=g, code_dtype=dt), np.where(m, dyn, dyn * 0))
    g_x = jax.grad(lambda x: jnp.sum(jq.fake_quantize(x, s, granularity=g, code_dtype=dt) * dy))(x)
    assert_same_bits(g_x, np.where(m, dyn, dyn * 0), "grad of fake_quantize")
    qb = np.where(m, dyn * inv, dyn * inv * 0).astype(np.float32)
    assert_same_bits(jq.quantize_backward(dy, x, s, granularity=g, dtype=dt), qb, "quantize_backward")


# ---------------------------------------------------------------------------------------------
# dynamic
# ---------------------------------------------------------------------------------------------


DYN = [(jq.PerToken(), (5, 40)), (jq.PerGroup(16), (3, 64)), (jq.PerTensor(), (4, 24)),
       (jq.PerChannel(0), (6, 20)), (jq.PerBlock((2, 16)), (6, 32))]


def _numpy_dynamic(x, g, dt):
    pshape = param_shape(g, x.shape)
    xb, pb = to_broadcast_form(jnp.asarray(x), jnp.zeros(pshape), g)
    xb = np.asarray(xb, np.float32)
    axes = tuple(i for i, (a, b) in enumerate(zip(xb.shape, pb.shape)) if b == 1 and a != 1)
    finite = np.where(np.isinf(xb), np.float32(0), xb)  # the statistics ignore infinities
    amax = np.max(np.abs(finite), axis=axes, keepdims=True)  # numpy's max propagates NaN
    scale = np.maximum(amax * np.float32(1 / fp8_max(dt)), np.float32(2.0**-126)).astype(np.float32)
    scale = np.where(np.isnan(amax), np.float32(np.nan), scale)
    sbx = np.broadcast_to(scale, xb.shape).reshape(x.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (np.float32(1) / sbx).astype(np.float32)
    return np.reshape(scale, pshape), torch_codes(x, inv, dt)


@pytest.mark.parametrize("dt", FP8, ids=ids)
@pytest.mark.parametrize("g,shape", DYN)
def test_dynamic_quantize(rng, dt, g, shape):
    x = np.asarray(rng.standard_normal(shape) * 2.0 ** rng.integers(-6, 12, size=shape[:1] + (1,) * (len(shape) - 1)),
                   np.float32)
    x[0] = 0  # an all-zero row: scale 2**-126, codes 0
    x[-1, 0] = np.nan  # its row / group / block gets a NaN scale
    x[1, 1], x[1, 2] = np.inf, -np.inf  # ignored by the statistics; saturate to +-fmax
    want_s, want_q = _numpy_dynamic(x, g, dt)
    for impl in TIERS:
        q, s, z = run_impl(impl, lambda x: jq.dynamic_quantize(x, granularity=g, dtype=dt), jnp.asarray(x))
        assert z is None
        assert_same_bits(s, want_s, f"{impl} scale")
        assert_same_bits(q, want_q, f"{impl} codes")
    if isinstance(g, jq.PerToken):
        assert float(np.asarray(s)[0]) == 2.0**-126 and np.isnan(np.asarray(s)[-1]) and np.isfinite(np.asarray(s)[1])
        assert list(np.asarray(q)[1, 1:3].astype(np.float32)) == [fp8_max(dt), -fp8_max(dt)]


def test_per_block_int8(rng):
    """PerBlock serves integer codes: dynamic int8 (symmetric and asymmetric) and fake_quantize."""
    g = jq.PerBlock((4, 8))
    x = jnp.asarray(rng.standard_normal((2, 8, 24)), jnp.float32)
    for sym in (True, False):
        outs = [run_impl(i, lambda x: jq.dynamic_quantize(x, granularity=g, symmetric=sym), x) for i in TIERS]
        for a, b in zip(*outs):
            assert_same_bits(a, b, f"dynamic int8 symmetric={sym}")
    q, s, _ = jq.dynamic_quantize(x, granularity=g)
    assert s.shape == (2, 2, 3) and q.dtype == jnp.int8
    blk = np.asarray(x)[1, 4:8, 16:24]
    assert float(s[1, 1, 2]) == np.float32(np.abs(blk).max() * np.float32(1 / 127))
    f = [run_impl(i, lambda x, s: jq.fake_quantize(x, s, granularity=g, qmin=-128, qmax=127), x, s) for i in TIERS]
    assert_same_bits(f[0], f[1], "fake_quantize int8 per block")


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", FP8, ids=ids)
def test_jitted_reference_keeps_the_fp8_rounding(rng, dt):
    """fake_quantize, and quantize then dequantize in one jitted function, round to fp8 in the
    reference too: XLA:GPU removes a bare ``astype(f8).astype(f32)`` pair (``numerics.to_fp8``).
    With power-of-two scales every output divided by its scale is an fp8 value."""
    x = jnp.asarray(rng.standard_normal((8, 64)) * 50, jnp.float32)
    s = jnp.asarray(2.0 ** rng.integers(-3, 3, size=(8,)), jnp.float32)
    tok = jq.PerToken()
    fq = lambda x: jq.fake_quantize(x, s, granularity=tok, code_dtype=dt)
    qdq = lambda x: jq.dequantize(jq.quantize(x, s, granularity=tok, dtype=dt), s, granularity=tok)
    for f in (fq, qdq):
        with jq.implementation("reference"):  # on the default backend (XLA:GPU on a GPU machine)
            v = np.asarray(jax.jit(f)(x)) / np.asarray(s)[:, None]
        assert np.array_equal(v.astype(dt).astype(np.float32), v)
        assert not np.array_equal(v, np.asarray(x) / np.asarray(s)[:, None])


def test_transforms(rng):
    g = jq.PerBlock((2, 8))
    x = jnp.asarray(rng.standard_normal((3, 4, 16)) * 100, jnp.float32)
    s = jnp.asarray(2.0 ** rng.uniform(-2, 2, size=(3, 2, 2)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    f = lambda x, s: jq.fake_quantize(x, s, granularity=g, code_dtype=E4M3)
    want = run_impl("reference", f, x, s)
    for impl in TIERS:  # (run_impl: the reference tier on the CPU backend, the contract's arithmetic)
        # vmap over the leading axis: each slice is a [4, 16] array with [2, 2] block scales
        assert_same_bits(run_impl(impl, jax.vmap(f), x, s), want, f"{impl} vmap")
        gv = run_impl(impl, jax.vmap(jax.grad(lambda x, s, d: jnp.sum(f(x, s) * d))), x, s, dy)
        gd = run_impl(impl, jax.grad(lambda x: jnp.sum(f(x, s) * dy)), x)
        assert_same_bits(gv, gd, f"{impl} vmap of grad")
        gq = run_impl(impl, jax.grad(lambda x: jnp.sum(jq.quantize(x, s, granularity=g, dtype=E4M3)
                                                       .astype(jnp.float32))), x)
        want_q = run_impl(impl, lambda x: jq.quantize_backward(jnp.ones_like(x), x, s, granularity=g, dtype=E4M3), x)
        assert_same_bits(gq, want_q, f"{impl} grad of quantize (STE)")
        r = run_impl(impl, jax.grad(jax.checkpoint(lambda x: jnp.sum(f(x, s) * dy))), x)
        assert_same_bits(r, gd, f"{impl} remat")
    # dequantize's scale gradient: sum(dy * f32(q)) over each block
    q = jq.quantize(x, s, granularity=g, dtype=E4M3)
    ds = jax.grad(lambda s: jnp.sum(jq.dequantize(q, s, granularity=g) * dy))(s)
    qd = np.asarray(q).astype(np.float32) * np.asarray(dy)
    want_ds = qd.astype(np.float64).reshape(3, 2, 2, 2, 8).sum(axis=(2, 4))
    mag = np.abs(qd).astype(np.float64).reshape(3, 2, 2, 2, 8).sum(axis=(2, 4))
    assert (np.abs(np.asarray(ds) - want_ds) <= 2.0**-19 * mag).all()  # float32 sums, in any order


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_bad_inputs():
    x = jnp.zeros((8, 32))
    s = jnp.ones((8,))
    tok = jq.PerToken()
    with pytest.raises(ValueError, match="qmin.*not used with dtype=float8_e4m3fn"):
        jq.quantize(x, s, granularity=tok, qmin=-100, qmax=100, dtype=E4M3)
    with pytest.raises(ValueError, match="zero_point"):
        jq.quantize(x, s, jnp.zeros((8,), jnp.int32), granularity=tok, dtype=E4M3)
    with pytest.raises(ValueError, match="zero_point"):
        jq.dequantize(x.astype(E4M3), s, jnp.zeros((8,), jnp.int32), granularity=tok)
    with pytest.raises(ValueError, match="qmax.*code_dtype=float8_e5m2"):
        jq.fake_quantize(x, s, granularity=tok, qmax=3, code_dtype=E5M2)
    with pytest.raises(ValueError, match="qmin/qmax: required for integer codes"):
        jq.fake_quantize(x, s, granularity=tok)
    with pytest.raises(TypeError, match="code_dtype: expected an fp8 dtype.*int8"):
        jq.fake_quantize(x, s, granularity=tok, code_dtype=jnp.int8)
    with pytest.raises(ValueError, match="qmin.*not used"):
        jq.quantize_backward(x, x, s, granularity=tok, qmin=-1, qmax=1, dtype=E4M3)
    with pytest.raises(ValueError, match="symmetric: expected True for dtype=float8_e4m3fn"):
        jq.dynamic_quantize(x, dtype=E4M3, symmetric=False)
    with pytest.raises(ValueError, match="qmax.*not used"):
        jq.dynamic_quantize(x, dtype=E5M2, qmax=100)
    with pytest.raises(TypeError, match="dtype: expected .*fp8.*float16"):
        jq.dynamic_quantize(x, dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"PerBlock\(block_shape=\(3, 32\)\).*8 % 3 = 2"):
        jq.quantize(x, jnp.ones((2, 1)), granularity=jq.PerBlock((3, 32)), dtype=E4M3)
    with pytest.raises(ValueError, match="rank >= 2"):
        jq.dynamic_quantize(jnp.zeros((32,)), granularity=jq.PerBlock((1, 32)), dtype=E4M3)
    with pytest.raises(ValueError, match="pair of positive ints"):
        jq.PerBlock((128, 0))
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 1\)"):
        jq.quantize(x, jnp.ones((8,)), granularity=jq.PerBlock((4, 32)), dtype=E4M3)


# ---------------------------------------------------------------------------------------------
# CUDA lowering of every new kernel variant
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dt", FP8, ids=ids)
@pytest.mark.parametrize("g,shape", [(jq.PerToken(), (64, 256)), (jq.PerChannel(-1), (64, 256)),
                                     (jq.PerBlock((32, 128)), (64, 256))])
def test_lowers_for_cuda(dt, g, shape):
    x = jnp.zeros(shape, jnp.bfloat16)
    s = jnp.ones(param_shape(g, shape), jnp.float32)
    pre = ["jaxquant_reciprocal"] if isinstance(g, jq.PerChannel) else []
    assert cuda_kernels(lambda x, s: jq.quantize(x, s, granularity=g, dtype=dt), x, s) == pre + ["jaxquant_quantize"]
    assert cuda_kernels(lambda x, s: jq.dequantize(x.astype(dt), s, granularity=g), x, s) == ["jaxquant_dequantize"]
    assert cuda_kernels(lambda x, s: jq.fake_quantize(x, s, granularity=g, code_dtype=dt), x, s) == \
        pre + ["jaxquant_fake_quantize"]
    assert cuda_kernels(jax.grad(lambda x, s: jnp.sum(jq.fake_quantize(x, s, granularity=g, code_dtype=dt)
                                                      .astype(jnp.float32))), x, s) == \
        pre + ["jaxquant_fake_quantize_backward"]
    assert cuda_kernels(lambda x, s: jq.quantize_backward(x, x, s, granularity=g, dtype=dt), x, s) == \
        pre + ["jaxquant_quantize_backward"]
    dyn = cuda_kernels(lambda x: jq.dynamic_quantize(x, granularity=g, dtype=dt), x)
    want = {jq.PerToken: ["jaxquant_dynamic_quantize"], jq.PerChannel: ["jaxquant_reciprocal", "jaxquant_quantize"],
            jq.PerBlock: ["jaxquant_quantize"]}[type(g)]
    assert dyn == want
    assert cuda_kernels(lambda x: jq.dynamic_quantize(x, granularity=jq.PerGroup(128), dtype=dt), x) == \
        ["jaxquant_dynamic_quantize"]


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.float16])
def test_lowers_for_cuda_other_input_dtypes(x_dtype):
    x, s = jnp.zeros((64, 256), x_dtype), jnp.ones((64,), jnp.float32)
    for dt in FP8:
        assert cuda_kernels(lambda x, s: jq.quantize(x, s, granularity=jq.PerToken(), dtype=dt), x, s) == \
            ["jaxquant_quantize"]
        assert cuda_kernels(lambda x, s: jq.fake_quantize(x, s, granularity=jq.PerToken(), code_dtype=dt), x, s) == \
            ["jaxquant_fake_quantize"]
        assert cuda_kernels(lambda x: jq.dynamic_quantize(x, dtype=dt), x) == ["jaxquant_dynamic_quantize"]
        assert cuda_kernels(lambda x, s: jq.dequantize(x.astype(dt), s, granularity=jq.PerToken(), dtype=x_dtype),
                            x, s) == ["jaxquant_dequantize"]


@pytest.mark.gpu
@pytest.mark.parametrize("dt", FP8, ids=ids)
@pytest.mark.parametrize("g", [jq.PerToken(), jq.PerChannel(-1), jq.PerGroup(128), jq.PerBlock((128, 128))])
def test_gpu_kernels_equal_reference_large(rng, dt, g):
    """2**24 elements per op on the GPU (hardware rounding, rcp.rn, fp8 conversion) vs the CPU reference."""
    shape = (2048, 8192)
    s = make_scale(rng, g, shape)
    x = rand_x(rng, shape, scale_b(g, shape, s), dt, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)

    def fns(x, dy, s):
        return (*fp8_ops(g, dt)(x, dy, s), *jq.dynamic_quantize(x, granularity=g, dtype=dt)[:2])

    for a, b, name in zip(run_impl("pallas", fns, x, dy, s), run_impl("reference", fns, x, dy, s),
                          FP8_OPS + ("dyn_q", "dyn_s")):
        assert_same_bits(a, b, name)
