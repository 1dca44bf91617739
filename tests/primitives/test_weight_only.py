"""weight_only_linear: the fused dequant-matmul kernel vs the reference, transformations, lowering, errors.

Error bound (kernel vs reference). Both compute ``sum_k x[m,k] * w[n,k]`` in float32 with
different orders: the reference rounds ``w = (q - zp) * scale`` to float32 and sums products in
its order; the kernel forms exact products ``x * (q - zp)`` (integers |q - zp| <= 255 are exact
in every x dtype, float32 products of them are exact), sums them per group in float32 and then
multiplies by the group's scale. Each result is within ``gamma = (K + 2) * 2**-24`` (relative,
times ``sum_k |x| |w|``) of the exact sum (the standard float summation bound, plus one rounding
for the scale product), so ``|kernel - reference| <= 2 * (K + 2) * 2**-24 * sum_k |x||w|``
before the cast. The cast to x's dtype adds at most one unit in the last place of the output
dtype at the reference's magnitude. Bias adds one more float32 rounding (``2**-24 * |y|``).
"""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.test_util import check_grads

import jaxquant as jq
from jaxquant import shapes
from jaxquant.pallas.weight_only import triton as K
from jaxquant.pallas.weight_only import mosaic as WM
from jaxquant.core import device
from jaxquant.core.device import is_hopper
from jaxquant.core.weights import QuantizedWeight, pack_int4
from jaxquant.primitives.weight_only import primitive as P
from jaxquant.primitives.weight_only.api import weight_only_linear
from jaxquant.primitives.weight_only.reference import weight_only_linear_reference as reference_weight_only_linear
from jaxquant.primitives.weights import dequantize_weight, quantize_weight
from conftest import cuda_kernels, run_impl

# (M-shape, N, K, bits, group, symmetric, x dtype, bias, config): ragged M/N, split-K, K-masking.
CASES = [
    ((5,), 40, 256, 4, 128, True, jnp.float32, False, None),
    ((3, 7), 33, 512, 4, 32, False, jnp.bfloat16, True, K.Config(16, 32, 128, 2)),
    ((1,), 64, 512, 4, 64, True, jnp.float16, False, K.Config(16, 64, 256, 2)),
    ((17,), 24, 768, 4, 256, False, jnp.float32, True, K.Config(16, 16, 512, 1)),
    ((2,), 48, 200, 4, None, True, jnp.bfloat16, True, K.Config(16, 32, 128, 1)),   # K ragged vs BK
    ((9,), 40, 256, 4, None, False, jnp.float32, False, K.Config(32, 32, 64, 4)),
    ((4,), 72, 320, 8, None, True, jnp.bfloat16, True, None),
    ((33,), 20, 256, 8, 128, False, jnp.float16, False, K.Config(16, 16, 64, 2)),
    ((6,), 40, 512, 8, 32, True, jnp.float32, True, K.Config(16, 32, 64, 2)),
    ((2, 2, 3), 16, 128, 8, None, False, jnp.float32, False, K.Config(16, 16, 32, 4)),
    ((3,), 40, 256, 4, 64, False, jnp.bfloat16, True, K.Config(16, 16, 128, 2, fast_dequant=False)),
    ((1,), 33, 200, 4, None, True, jnp.float16, False, K.Config(16, 32, 128, 1)),
    ((5,), 24, 256, 8, None, False, jnp.float16, True, K.Config(16, 16, 64, 2)),
    ((2,), 16, 512, 8, 128, True, jnp.bfloat16, False, K.Config(16, 16, 256, 2)),
    # M = 1: x's one row broadcast to the dot's rows (Config.row_bcast, default at M = 1) and not
    ((1,), 40, 256, 4, 128, False, jnp.bfloat16, True, K.Config(16, 32, 128, 2)),
    ((1, 1), 48, 200, 4, None, False, jnp.bfloat16, False, None),
    ((1,), 72, 320, 8, None, True, jnp.float32, True, None),
    ((1,), 33, 256, 4, 32, True, jnp.float32, False, K.Config(16, 32, 128, 1)),
    ((1,), 33, 256, 4, 32, True, jnp.bfloat16, False, K.Config(16, 32, 128, 2, row_bcast=False)),
    ((1,), 24, 256, 8, 64, False, jnp.float16, True, K.Config(16, 16, 64, 2, x_pairs=False)),
]


def _ids(c):
    return f"m{c[0]}-n{c[1]}-k{c[2]}-w{c[3]}-g{c[4]}-{'sym' if c[5] else 'asym'}-{jnp.dtype(c[6]).name}" \
           f"{'-bias' if c[7] else ''}-{c[8].tag() if c[8] else 'auto'}"


def _make(rng, lead, n, k, bits, group, sym, dtype, bias):
    w = jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.2, 2, (n, 1)), jnp.float32)
    qw = quantize_weight(w, bits=bits, group_size=group, symmetric=sym)
    x = jnp.asarray(rng.standard_normal(lead + (k,)), jnp.float32).astype(dtype)
    b = jnp.asarray(rng.standard_normal((n,)), jnp.float32).astype(dtype) if bias else None
    return x, qw, b


@pytest.fixture(autouse=True)
def _float32_precision():
    """The bound below is float32's: float32 x runs the kernel's ~float32 dot (three TF32 products on
    a GPU; by default it takes one TF32 product, as XLA's float32 matmul does: see the TF32 test)."""
    with jax.default_matmul_precision("float32"):
        yield


def _ulp(a, dtype):
    """One unit in the last place of ``dtype`` at magnitude |a| (float64 array)."""
    nmant = {np.dtype(jnp.float32): 23, np.dtype(jnp.bfloat16): 7, np.dtype(jnp.float16): 10}[np.dtype(dtype)]
    tiny = float(jnp.finfo(dtype).tiny)
    e = np.floor(np.log2(np.maximum(np.abs(a), tiny)))
    return 2.0 ** (e - nmant)


def assert_within_bound(y, ref, x, qw, b):
    k = qw.shape[1]
    y64, r64 = np.asarray(y.astype(jnp.float32), np.float64), np.asarray(ref.astype(jnp.float32), np.float64)
    w = np.asarray(dequantize_weight(qw), np.float64)
    xa = np.abs(np.asarray(x.astype(jnp.float32), np.float64)).reshape(-1, k)
    mag = (xa @ np.abs(w).T).reshape(r64.shape)
    bound = 2 * (k + 2) * 2.0**-24 * mag + _ulp(r64, x.dtype)
    if b is not None:
        bound = bound + 2.0**-24 * (np.abs(r64) + mag) * 2
    err = np.abs(y64 - r64)
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())}/{err.size} outside the bound; worst {float((err / bound).max()):.3g}x"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_reference(tier, rng, case):
    lead, n, k, bits, group, sym, dtype, bias, cfg = case
    x, qw, b = _make(rng, lead, n, k, bits, group, sym, dtype, bias)
    y = run_impl(tier, lambda x, qw, b: weight_only_linear(x, qw, b, config=cfg), x, qw, b)
    ref = run_impl("reference", lambda x, qw, b: weight_only_linear(x, qw, b), x, qw, b)
    assert y.dtype == x.dtype and y.shape == lead + (n,)
    assert ref.dtype == x.dtype
    assert_within_bound(y, ref, x, qw, b)


def test_reference_is_dequantize_then_dot(rng):
    x, qw, b = _make(rng, (3,), 16, 128, 4, 32, False, jnp.bfloat16, True)
    want = (jnp.dot(x.astype(jnp.float32), dequantize_weight(qw).T, precision="highest")
            + b.astype(jnp.float32)).astype(x.dtype)
    got = run_impl("reference", lambda x, qw, b: weight_only_linear(x, qw, b), x, qw, b)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_exact_small_integers(tier, rng):
    """Integer-valued x and power-of-two scales: every partial sum is exact, so kernel == reference bit for bit."""
    n, k = 24, 256
    q = jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int8)
    qw = QuantizedWeight(pack_int4(q), jnp.asarray(2.0 ** rng.integers(-3, 3, (n, k // 64)), jnp.float32), None,
                         bits=4, group_size=64, symmetric=True, shape=(n, k))
    x = jnp.asarray(rng.integers(-4, 5, (5, k)), jnp.bfloat16)
    y = run_impl(tier, lambda x, qw: weight_only_linear(x, qw, config=K.Config(16, 16, 128, 2)), x, qw)
    ref = run_impl("reference", weight_only_linear, x, qw)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))


def test_zero_sized(rng):
    x, qw, _ = _make(rng, (0,), 16, 128, 4, 32, True, jnp.float32, False)
    y = run_impl("interpret", weight_only_linear, x, qw)
    assert y.shape == (0, 16)


# ----------------------------------------------------------------------------------------
# transformations
# ----------------------------------------------------------------------------------------


def test_vmap_over_x(tier, rng):
    x, qw, b = _make(rng, (3, 5), 40, 256, 4, 64, False, jnp.float32, True)
    f = lambda x, qw, b: jax.vmap(lambda xi: weight_only_linear(xi, qw, b), in_axes=1, out_axes=1)(x)
    y = run_impl(tier, f, x, qw, b)
    ref = run_impl("reference", weight_only_linear, x, qw, b)
    assert y.shape == (3, 5, 40)
    assert_within_bound(y, ref, x, qw, b)


def test_vmap_over_weights(rng):
    ws = jnp.asarray(rng.standard_normal((3, 16, 128)), jnp.float32)
    qws = jax.vmap(lambda w: quantize_weight(w, bits=4, group_size=32))(ws)
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32)
    y = run_impl("interpret", jax.vmap(weight_only_linear, in_axes=(None, 0)), x, qws)
    for i in range(3):
        qi = jax.tree_util.tree_map(lambda a: a[i], qws)
        ref = run_impl("reference", weight_only_linear, x, qi)
        assert_within_bound(y[i], ref, x, qi, None)


def test_grad_and_vmap_of_grad(rng):
    x, qw, b = _make(rng, (4, 3), 24, 128, 4, 32, True, jnp.float32, True)
    dy = jnp.asarray(rng.standard_normal((4, 3, 24)), jnp.float32)
    loss = lambda x, b: jnp.sum(weight_only_linear(x, qw, b) * dy)
    dx, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, b)
    w = dequantize_weight(qw)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(jnp.dot(dy, w, precision="highest")), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db), np.asarray(dy.sum((0, 1))), rtol=1e-6, atol=1e-5)
    per = jax.jit(jax.vmap(jax.grad(lambda xi, dyi: jnp.sum(weight_only_linear(xi, qw) * dyi))))(x, dy)
    np.testing.assert_allclose(np.asarray(per), np.asarray(jnp.einsum("abn,nk->abk", dy, w)), rtol=1e-5, atol=1e-5)
    # the quantized weight is frozen: its cotangent is zero
    gq = jax.grad(lambda qw: jnp.sum(weight_only_linear(x, qw)), allow_int=True)(qw)
    assert float(jnp.abs(gq.scale).max()) == 0.0


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (8, None, False)])
def test_check_grads(rng, bits, group, sym):
    x, qw, b = _make(rng, (3,), 16, 128, bits, group, sym, jnp.float32, True)
    # y is linear in (x, b): a large finite-difference step is exact up to float32 rounding of y,
    # while jax's default eps=1e-4 would amplify that rounding (|y| * 2**-24 / eps) past rtol.
    check_grads(lambda x, b: weight_only_linear(x, qw, b), (x, b), order=1, modes=("rev",), eps=1.0)


def test_grad_bf16_dtype(rng):
    x, qw, b = _make(rng, (2,), 16, 64, 4, 32, False, jnp.bfloat16, True)
    dx, db = jax.grad(lambda x, b: jnp.sum(weight_only_linear(x, qw, b).astype(jnp.float32)), argnums=(0, 1))(x, b)
    assert dx.dtype == jnp.bfloat16 and db.dtype == jnp.bfloat16


def test_remat_and_scan(rng):
    x, qw, _ = _make(rng, (2,), 32, 64, 8, None, True, jnp.float32, False)
    qws = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), qw)

    def net(x):
        def body(h, q):
            return jnp.tanh(jax.checkpoint(weight_only_linear)(h[:, :64], q)).repeat(2, axis=1), None
        return jnp.sum(jax.lax.scan(body, x, qws)[0])

    g = jax.jit(jax.grad(net))(x)
    assert g.shape == x.shape and bool(jnp.isfinite(g).all())


# ----------------------------------------------------------------------------------------
# CUDA lowering (on the CPU machine: catches Triton lowering errors interpret mode hides)
# ----------------------------------------------------------------------------------------

LOWER = [
    (1, 4096, 4096, 4, 128, True, jnp.bfloat16, False),
    (16, 4096, 14336, 4, 128, False, jnp.bfloat16, True),
    (1, 8192, 8192, 4, None, True, jnp.float16, False),
    (1, 8192, 8192, 8, None, True, jnp.bfloat16, True),
    (2048, 14336, 4096, 4, 128, True, jnp.bfloat16, False),
    (512, 4096, 4096, 8, 64, False, jnp.bfloat16, False),
    (1000, 11008, 4000, 4, None, False, jnp.bfloat16, True),  # ragged M, N and K
    (7, 100, 256, 4, 32, True, jnp.float32, True),
    (1, 100, 256, 4, 32, False, jnp.float32, True),
    (1, 1000, 4000, 4, None, False, jnp.bfloat16, True),  # M = 1, ragged N and K
]


@pytest.mark.parametrize("m,n,k,bits,group,sym,dtype,bias", LOWER)
def test_lowers_for_cuda(m, n, k, bits, group, sym, dtype, bias):
    w = jax.ShapeDtypeStruct((n, k), jnp.float32)
    qw = jax.eval_shape(lambda w: quantize_weight(w, bits=bits, group_size=group, symmetric=sym), w)
    x = jax.ShapeDtypeStruct((m, k), dtype)
    b = jax.ShapeDtypeStruct((n,), dtype) if bias else None
    with jq.implementation("auto"):
        txt = jax.jit(weight_only_linear).trace(x, qw, b).lower(lowering_platforms=("cuda",)).as_text()
    assert f'jaxquant_weight_only_w{bits}' in txt


@pytest.mark.parametrize("cfg,bits,group,sym", [
    (K.Config(16, 32, 512, 4), 4, 128, True),
    (K.Config(16, 64, 256, 2), 4, None, False),
    (K.Config(32, 32, 256, 1), 8, None, True),
    (K.Config(16, 32, 256, 8), 4, 64, False),
    (K.Config(128, 128, 128, 1, 8, 3), 4, 128, False),
    (K.Config(64, 64, 256, 1, fast_dequant=False), 4, 128, True),
])
def test_lowers_for_cuda_configs(cfg, bits, group, sym):
    n, k = 1000, 4096
    qw = jax.eval_shape(lambda w: quantize_weight(w, bits=bits, group_size=group, symmetric=sym),
                        jax.ShapeDtypeStruct((n, k), jnp.float32))
    x = jax.ShapeDtypeStruct((3, k), jnp.bfloat16)
    f = lambda x, qw: weight_only_linear(x, qw, jnp.ones((n,), jnp.bfloat16), config=cfg)
    txt = jax.jit(f).trace(x, qw).lower(lowering_platforms=("cuda",)).as_text()
    assert f'jaxquant_weight_only_w{bits}' in txt


def test_heuristics_valid_for_model_shapes():
    for (n, k) in shapes.LINEAR_NK + shapes.RAGGED_NK:
        for m in shapes.TOKENS_M + shapes.RAGGED_M + [64]:
            for bits, group in ((4, 128), (4, None), (8, None), (4, 32)):
                if group and k % group:
                    continue
                c = K.heuristics(m, n, k, bits, group)
                assert c == K.heuristics(m, n, k, bits, group)  # pure
                if group:
                    assert c.block_k % group == 0 or group % c.block_k == 0
                steps = math.ceil(k / c.block_k)
                assert steps % c.split_k == 0
                if group and c.split_k > 1:
                    assert (steps // c.split_k * c.block_k) % group == 0
    with pytest.raises(ValueError, match="block_n"):
        K.Config(16, 24, 64)


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def test_errors(rng):
    x, qw, b = _make(rng, (2,), 16, 128, 4, 32, True, jnp.float32, False)
    with pytest.raises(ValueError, match=r"x: expected the last axis to be K = 128.*got x of shape \(2, 64\)"):
        weight_only_linear(x[:, :64], qw)
    with pytest.raises(TypeError, match="x: expected a float16, bfloat16 or float32 array, got a int32"):
        weight_only_linear(x.astype(jnp.int32), qw)
    with pytest.raises(TypeError, match="qweight: expected a jaxquant.QuantizedWeight.*got ArrayImpl"):
        weight_only_linear(x, jnp.ones((16, 128)))
    bad = QuantizedWeight(qw.codes.astype(jnp.int32), qw.scale, None, bits=4, group_size=32, symmetric=True,
                          shape=(16, 128))
    with pytest.raises(ValueError, match=r"qweight.codes: expected int8 of shape \(16, 64\).*got int32"):
        weight_only_linear(x, bad)
    bad = QuantizedWeight(qw.codes, qw.scale, None, bits=4, group_size=48, symmetric=True, shape=(16, 128))
    with pytest.raises(ValueError, match="group_size"):
        weight_only_linear(x, bad)
    bad = QuantizedWeight(qw.codes, qw.scale, None, bits=4, group_size=64, symmetric=True, shape=(16, 96))
    with pytest.raises(ValueError, match=r"group_size: K = 96.*multiple of group_size = 64"):
        weight_only_linear(x, bad)
    with pytest.raises(ValueError, match=r"bias: expected shape \(16,\)"):
        weight_only_linear(x, qw, jnp.ones((8,)))
    with pytest.raises(TypeError, match="config: expected"):
        weight_only_linear(x, qw, config=(16, 16, 64))


def test_float32_x_default_precision_is_tf32(tier, rng):
    """Under jax's default matmul precision float32 x takes one TF32 product on a GPU (x rounded to 11
    significant bits: |error| <= 2**-11 sum |x||w| on top of the float32 bound); exact float32
    products in interpret mode. The algorithm follows the context."""
    x, qw, _ = _make(rng, (7,), 48, 256, 4, 64, False, jnp.float32, False)
    with jax.default_matmul_precision("default"):
        assert K.float32_dot_algorithm() == jax.lax.DotAlgorithmPreset.TF32_TF32_F32
        y = run_impl(tier, weight_only_linear, x, qw)
    assert K.float32_dot_algorithm() == jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3  # the fixture's "float32"
    assert K.float32_dot_algorithm(interpret=True) == jax.lax.Precision.HIGHEST
    ref = run_impl("reference", weight_only_linear, x, qw)
    w = np.asarray(dequantize_weight(qw), np.float64)
    mag = np.abs(np.asarray(x, np.float64)) @ np.abs(w).T
    err = np.abs(np.asarray(y, np.float64) - np.asarray(ref, np.float64))
    assert (err <= 2.0**-11 * mag + 2 * (256 + 2) * 2.0**-24 * mag + _ulp(np.asarray(ref, np.float64), jnp.float32)).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_small_groups_take_xla(tier, rng, dtype):
    """Groups below MIN_GROUP (int4 g16: 8-wide dots per nibble half) are not the kernel's: the
    primitive computes them with the reference (no kernel in the program); the kernel refuses them."""
    x, qw, b = _make(rng, (5,), 24, 64, 4, 16, False, dtype, True)
    y = run_impl(tier, weight_only_linear, x, qw, b)
    ref = run_impl("reference", weight_only_linear, x, qw, b)
    assert_within_bound(y, ref, x, qw, b)
    assert not K.supports(4, 16) and K.supports(4, 32) and K.supports(8, 16) and K.supports(4, None)
    with pytest.raises(ValueError, match=r"group_size=16 with bits=4: expected per-channel or >= 32"):
        K.weight_only_matmul(x, qw.codes, qw.scale, qw.zero_point, bits=4, group_size=16, symmetric=False, k=64,
                             interpret=True)


# ----------------------------------------------------------------------------------------
# The Mosaic GPU prefill kernel (Hopper; jaxquant.pallas.weight_only.mosaic). It has no interpret
# mode: its dispatch and CUDA lowering are tested here, its results on the GPU.
# ----------------------------------------------------------------------------------------

H200 = "NVIDIA H200"


def test_mgpu_dispatch():
    def use(m, n=4096, k=4096, bits=4, group=128, dt=jnp.bfloat16, dk=H200, config=None, interpret=False):
        return P.use_mgpu(m, n, k, bits=bits, group_size=group, x_dtype=np.dtype(dt), config=config,
                          device_kind=dk, interpret=interpret)

    assert use(2048) and use(256) and use(8192, 14336, 4096, 8, None) and use(300, group=64) and use(2048, group=256)
    assert use(2048, dk="NVIDIA H100 80GB HBM3") and use(2047)  # ragged M: padded to the tile
    assert not use(127, 8192, 8192)  # decode: the Triton kernel's split-K tiles
    # enough CTA tiles (>= MIN_TILES): 2 x 64 of 128 x 64 at M = 128 on N = 8192; 2 x 32 on N = 4096 is too few
    assert use(128, 8192, 8192) and not use(128, 4096, 14336) and use(256, 4096, 14336)
    assert WM.heuristics(128, 8192, 8192, 4, 128).tile_m == 64 and WM.heuristics(512, 4096, 14336, 4, 128).tile_m == 128
    assert WM.heuristics(256, 4096, 14336, 4, 128).tile_m == 64
    # group-wise 64 x 256 tiles sum each group over 128 of their 256 x rows at a time
    wide = WM.Config(tile_m=256, part_m=128, stages=2, grid_tile_width=16)
    assert WM.heuristics(2048, 4096, 14336, 4, 128) == wide and WM.heuristics(512, 8192, 8192, 4, 128) == wide
    # never taller than M (112 tiles of 128 x 256 at M = 128 would be half padding)
    assert WM.heuristics(128, 14336, 4096, 4, 128) == WM.Config(tile_m=128)
    assert WM.heuristics(200, 14336, 4096, 4, None) == WM.Config(tile_m=128)
    assert WM.heuristics(512, 8192, 8192, 4, None) == WM.Config(tile_m=256, stages=2)  # per channel: one accumulator
    assert WM.heuristics(512, 4096, 14336, 8, None).tile_m == 128  # 64 tiles of 64 x 256: too few
    assert not use(64, 8192, 8192, config=None) and WM.heuristics(64, 8192, 8192, 4, 128).tile_m == 64
    assert not use(2048, dk="NVIDIA A100-SXM4-80GB") and not use(2048, dk=None)
    assert not use(2048, dt=jnp.float16) and not use(2048, dt=jnp.float32)  # bfloat16 x only
    assert not use(2048, group=32)  # 32-wide groups: Triton
    assert not use(2048, n=4000) and not use(2048, k=4000, group=None)  # N / 128, K / 128
    assert not use(2048, config=K.Config(64, 128, 128)) and not use(2048, interpret=True)
    assert use(16, 256, 128, dk=None, config=WM.Config())  # an explicit Mosaic GPU tile: any M, device kind
    assert use(16, 256, 128, group=None, config=WM.Config(tile_n=128, tile_m=128))
    assert not use(0, 256, 128, config=WM.Config()) and not use(16, 256, 0, config=WM.Config())  # empty: no kernel
    with pytest.raises(ValueError, match=r"config: .*N a multiple of 128.*got x bfloat16, bits=4, group_size=128, "
                                         r"M=16, N=200, K=128"):
        use(16, 200, 128, config=WM.Config())
    with pytest.raises(ValueError, match=r"config: .*got x float16"):
        use(16, 256, 128, dt=jnp.float16, config=WM.Config())
    with pytest.raises(ValueError, match=r"config: .*group_size=32"):
        use(16, 256, 128, group=32, config=WM.Config())
    with pytest.raises(ValueError, match="accumulator registers"):  # group-wise: partial + carry would not fit
        use(16, 256, 128, config=WM.Config(tile_n=128, tile_m=256, stages=2))
    # a partial of part_m rows: 64 x 256 tiles hold 128 + 64 accumulator registers (2 x 128 without it)
    assert WM.Config(tile_m=256, part_m=128).acc_regs(True) == 192 and WM.Config(tile_m=256).acc_regs(True) == 256
    assert WM.Config(tile_m=256, part_m=128).acc_regs(False) == 128 and WM.Config(tile_m=256, part_m=128).tag() == \
        "mgpu:64x256/p128/st4"
    assert use(16, 256, 128, config=WM.Config(tile_m=256, part_m=128, stages=2))
    with pytest.raises(ValueError, match="accumulator registers"):
        use(16, 256, 128, config=WM.Config(tile_m=256, stages=2))
    with pytest.raises(ValueError, match="no interpret mode"):
        use(16, 256, 128, config=WM.Config(), interpret=True)
    x = jnp.ones((2, 128), jnp.bfloat16)
    with pytest.raises(TypeError, match="weight_only.mosaic.Config"):
        weight_only_linear(x, quantize_weight(jnp.ones((256, 128)), bits=4), config=(64, 128))
    # empty problems with an explicit Mosaic GPU tile: the shape of the result, no kernel
    qw = quantize_weight(jnp.ones((256, 128)), bits=4, group_size=128)
    y = weight_only_linear(jnp.ones((0, 128), jnp.bfloat16), qw, jnp.ones((256,)), config=WM.Config())
    assert y.shape == (0, 256) and y.dtype == jnp.bfloat16
    for (n, k) in shapes.LINEAR_NK:
        for m in shapes.TOKENS_M:
            for bits, group in ((4, 128), (4, None), (8, None)):
                c = WM.heuristics(m, n, k, bits, group)
                assert c == WM.heuristics(m, n, k, bits, group)  # pure
                assert WM.supports(m, n, k, bits, group, jnp.bfloat16, config=c), (m, n, k, bits, group, c)


@pytest.mark.parametrize("bad,match", [(dict(tile_n=32), "tile_n: expected a power of two >= 64, got 32"),
                                       (dict(tile_m=4), "tile_m: expected a power of two >= 8"),
                                       (dict(tile_m=512), r"tile_m: expected <= 256"),
                                       (dict(stages=1), "stages: expected an int >= 2, got 1"),
                                       (dict(grid_tile_width=0), "grid_tile_width: expected an int >= 1"),
                                       (dict(part_m=12), "part_m: expected a power of two >= 8, got 12"),
                                       (dict(tile_m=64, part_m=128), "part_m: expected a divisor of tile_m=64, got 128")])
def test_mgpu_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        WM.Config(**bad)


def test_mgpu_stages_fit_shared_memory():
    for cfg in [WM.Config(), WM.Config(stages=8), WM.Config(tile_m=256, stages=4), WM.Config(tile_n=128)]:
        for bits, group in ((4, 128), (4, 64), (4, None), (8, None), (8, 256)):
            st = WM.fit_stages(cfg, bits, group)
            cn, tm = cfg.cta_shape()
            ring = cn * WM.TILE_K * bits // 8 + tm * WM.TILE_K * 2
            used = st * ring + 4 * cfg.tile_n * min(cfg.epi_m, tm) * 2
            assert 2 <= st <= cfg.stages and used <= WM.SMEM_BUDGET, (cfg, bits, group, st)


def _abstract_qw(n, k, bits, group, sym):
    return jax.eval_shape(lambda w: quantize_weight(w, bits=bits, group_size=group, symmetric=sym),
                          jax.ShapeDtypeStruct((n, k), jnp.float32))


@pytest.mark.lowering
@pytest.mark.parametrize("bits,group,sym,cfg", [
    (4, 128, True, WM.Config()), (4, 128, False, WM.Config(stages=3)), (4, 64, False, WM.Config(tile_m=64)),
    (4, 256, True, WM.Config()), (4, None, True, WM.Config(tile_m=256, stages=2)),
    (4, None, False, WM.Config(tile_n=128)), (8, None, True, WM.Config()), (8, 128, False, WM.Config()),
    (4, 128, True, WM.Config(tile_m=256, part_m=128, stages=2)), (4, 64, False, WM.Config(tile_m=256, part_m=64)),
])
def test_mgpu_lowers_for_cuda(bits, group, sym, cfg):
    n, k = 512, 1024
    qw = _abstract_qw(n, k, bits, group, sym)
    x = jax.ShapeDtypeStruct((3, 100, k), jnp.bfloat16)  # M = 300: padded to the tile
    b = jax.ShapeDtypeStruct((n,), jnp.bfloat16)
    name = f"jaxquant_weight_only_w{bits}_mgpu"
    assert cuda_kernels(lambda x, qw, b: weight_only_linear(x, qw, b, config=cfg), x, qw, b) == [name]
    assert cuda_kernels(lambda x, qw: weight_only_linear(x, qw, config=cfg), x, qw) == [name]
    assert cuda_kernels(jax.vmap(lambda x, qw: weight_only_linear(x, qw, config=cfg), (0, None)), x, qw) == [name]


@pytest.mark.lowering
def test_mgpu_heuristic_choice_lowers(monkeypatch):
    """As on an H200: prefill bfloat16 -> Mosaic GPU; decode, too few tiles, float16 x, 32-wide groups,
    ragged N -> Triton."""
    monkeypatch.setattr(device, "device_kind", lambda: H200)
    for (m, n, k, bits, group, dt, want) in [
        (8192, 1024, 512, 4, 128, jnp.bfloat16, "jaxquant_weight_only_w4_mgpu"),
        (8000, 768, 640, 8, None, jnp.bfloat16, "jaxquant_weight_only_w8_mgpu"),
        (256, 1024, 512, 4, 128, jnp.bfloat16, "jaxquant_weight_only_w4"),  # 32 tiles: Triton's split K
        (16, 1024, 512, 4, 128, jnp.bfloat16, "jaxquant_weight_only_w4"),
        (8192, 1024, 512, 4, 128, jnp.float16, "jaxquant_weight_only_w4"),
        (8192, 1024, 512, 4, 32, jnp.bfloat16, "jaxquant_weight_only_w4"),
        (8192, 1000, 512, 4, 128, jnp.bfloat16, "jaxquant_weight_only_w4"),
    ]:
        qw = _abstract_qw(n, k, bits, group, True)
        got = cuda_kernels(lambda x, qw: weight_only_linear(x, qw), jax.ShapeDtypeStruct((m, k), dt), qw)
        assert got == [want], (m, n, k, bits, group, dt, got)


MGPU_CASES = [  # (leading dims, N, K, bits, group, symmetric, bias, config): explicit tiles, then the heuristic
    ((256,), 256, 512, 4, 128, True, False, WM.Config()),
    ((300,), 256, 512, 4, 128, False, True, WM.Config()),  # ragged M (padded), asymmetric, bias
    ((2, 160), 384, 768, 4, 64, True, True, WM.Config(stages=3)),
    ((256,), 256, 1024, 4, 256, False, False, WM.Config(tile_m=64)),
    ((1024,), 512, 512, 4, None, True, True, WM.Config(tile_m=256, stages=2)),  # per channel, widest tile
    ((384,), 256, 640, 4, None, False, False, WM.Config(tile_n=128)),
    ((512,), 256, 512, 8, None, True, True, WM.Config(tile_m=256, stages=2)),
    ((300,), 256, 512, 8, None, False, False, WM.Config(tile_m=64)),
    ((256,), 256, 512, 8, 128, False, True, WM.Config(epi_m=64)),
    ((512,), 256, 1024, 4, 128, True, True, WM.Config(tile_m=256, part_m=128, stages=2)),  # partials of 128 rows
    ((300,), 384, 512, 4, 64, False, False, WM.Config(tile_m=256, part_m=64, stages=2)),
    ((256,), 256, 1024, 8, 256, True, True, WM.Config(tile_m=128, part_m=64, stages=3)),
    ((2048,), 2304, 1024, 4, 128, True, False, None),  # 144 tiles of 128 x 256 (128-row partials)
    ((1000,), 2304, 512, 8, None, False, True, None),  # 144 tiles of 128 x 128 (M padded)
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", MGPU_CASES, ids=lambda c: f"{c[0]}-n{c[1]}-k{c[2]}-w{c[3]}-g{c[4]}-"
                                                          f"{'sym' if c[5] else 'asym'}{'-bias' if c[6] else ''}")
def test_mgpu_matches_reference(rng, case):
    """The Mosaic GPU kernel is within the float32 bound of the reference (zero rows included), and a
    vmapped call equals the per-slice calls bit for bit (rows are independent)."""
    dk = jax.devices()[0].device_kind
    if not is_hopper(dk):
        pytest.skip(f"Mosaic GPU weight-only kernel: Hopper only, got {dk}")
    lead, n, k, bits, group, sym, bias, cfg = case
    x, qw, b = _make(rng, lead, n, k, bits, group, sym, jnp.bfloat16, bias)
    x = x.reshape(-1, k).at[1].set(0).reshape(x.shape)
    f = lambda x, qw, b: weight_only_linear(x, qw, b, config=cfg)
    assert "mosaic_gpu" in jax.jit(f).lower(x, qw, b).as_text(), "the Mosaic GPU kernel was not used"
    y = run_impl("pallas", f, x, qw, b)
    ref = run_impl("reference", f, x, qw, b)
    assert_within_bound(y, ref, x, qw, b)
    xs = jnp.stack([x, x[::-1]])
    yv = jax.jit(jax.vmap(f, (0, None, None)))(xs, qw, b)
    np.testing.assert_array_equal(np.asarray(yv[0], np.float32), np.asarray(y, np.float32))
