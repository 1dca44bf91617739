"""fp8 matmul ops: the ``jaxquant_fp8_matmul`` primitive (reference and kernels within the stated
bound), fp8 serving through ``quantized_linear`` (per-channel and 128 x 128 block weights), and
``fp8_linear`` for training (three fp8 GEMMs, gradients within a stated bound of the float ones).
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
import jaxquant.core.device as device
from jaxquant.core.numerics import fp8_max
from jaxquant.pallas.fp8_matmul import oracle as O
from jaxquant.primitives.fp8_matmul import primitive as P
from jaxquant.primitives.fp8_matmul import reference as R
from conftest import cuda_kernels, run_impl

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
KERNEL_C = O.TENSOR_CORE_C if HAS_GPU else O.FLOAT32_C
KERNEL = "pallas" if HAS_GPU else "interpret"


def codes(rng, shape, dtype=E4M3):
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-8, 7, size=shape)
    return jnp.asarray(np.clip(x, -fp8_max(dtype), fp8_max(dtype)), jnp.float32).astype(dtype)


def scales(rng, layout, lead, n, k):
    u = lambda *s: jnp.asarray(2.0 ** rng.uniform(-8, 2, size=s), jnp.float32)
    if layout == "rowwise":
        return u(*lead), u(n)
    return u(*lead, -(-k // 128)), u(-(-n // 128), -(-k // 128))


def within(y, y_ref, mag, c):
    """``|y - y_ref| <= reference.bound`` where the reference is finite; NaN positions agree."""
    y, y_ref = np.asarray(y).astype(np.float64), np.asarray(y_ref)
    assert (np.isnan(y) == np.isnan(y_ref.astype(np.float64))).all()
    fin = ~np.isnan(y)
    err = np.abs(y[fin] - y_ref.astype(np.float64)[fin])
    b = R.bound(y_ref[fin], mag[fin], y_ref.dtype, c)
    assert (err <= b).all(), f"max |err| / bound = {np.max(err / b):.3g}"
    return float(np.max(err / b)) if err.size else 0.0


# ---------------------------------------------------------------------------------------------
# the primitive: reference vs float64 oracle, kernels vs reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rowwise", "blockwise"])
@pytest.mark.parametrize("lead,n,k", [((37,), 150, 300), ((2, 3), 64, 256), ((1,), 70, 130)])
def test_fp8_matmul_within_bound(rng, layout, lead, n, k):
    a, w = codes(rng, lead + (k,)), codes(rng, (n, k))
    a = a.at[(0,) * len(lead) + (3,)].set(jnp.nan)
    sa, sw = scales(rng, layout, lead, n, k)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    f = lambda a, w, sa, sw, b: jq.fp8_matmul(a, w, sa, sw, b, layout=layout, out_dtype=jnp.float32)
    y_ref = np.asarray(run_impl("reference", f, a, w, sa, sw, bias))
    m = int(np.prod(lead))
    a2 = np.asarray(a).reshape(m, k)
    sa2 = np.asarray(sa).reshape(m, -1)
    # the reference is the float64 GEMM of the codes up to float32 rounding
    ok, ratio, msg = O.check(y_ref.reshape(m, n), a2, w, sa2, sw, bias, layout=layout, c=R.FLOAT32_C)
    assert ok, msg
    mag = O.magnitude(a2, w, sa2, sw, layout=layout).reshape(lead + (n,))
    y = run_impl(KERNEL, f, a, w, sa, sw, bias)
    within(y, y_ref, mag, KERNEL_C)


def test_fp8_matmul_per_tensor_and_e5m2(rng):
    a, w = codes(rng, (20, 96), E5M2), codes(rng, (40, 96), E5M2)
    f = lambda a, w: jq.fp8_matmul(a, w, jnp.float32(0.5), jnp.float32(2.0), out_dtype=jnp.bfloat16)
    y_ref = run_impl("reference", f, a, w)
    ok, _, msg = O.check(y_ref, a, w, np.full((1, 1), 0.5), np.full((1,), 2.0), c=R.FLOAT32_C)
    assert ok, msg
    mag = np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(w, np.float64)).T
    within(run_impl(KERNEL, f, a, w), y_ref, mag, KERNEL_C)


def test_fp8_matmul_bad_inputs(rng):
    a, w = codes(rng, (4, 64)), codes(rng, (8, 64))
    with pytest.raises(ValueError, match="fp8 codes of one format"):
        jq.fp8_matmul(a, w.astype(E5M2), jnp.ones((4,)), jnp.ones((8,)))
    with pytest.raises(ValueError, match=r"a_scale \(rowwise\): expected a scalar or shape \(4,\)"):
        jq.fp8_matmul(a, w, jnp.ones((3,)), jnp.ones((8,)))
    with pytest.raises(ValueError, match=r"a_scale \(blockwise\): expected shape \(4, 1\)"):
        jq.fp8_matmul(a, w, jnp.ones((4,)), jnp.ones((1, 1)), layout="blockwise")
    with pytest.raises(ValueError, match="layout"):
        jq.fp8_matmul(a, w, jnp.ones((4,)), jnp.ones((8,)), layout="colwise")
    with pytest.raises(TypeError, match="config"):
        jq.fp8_matmul(a, w, jnp.ones((4,)), jnp.ones((8,)), config="big")


# ---------------------------------------------------------------------------------------------
# dispatch (lowered for CUDA on the CPU; the Mosaic GPU path with a Hopper device kind)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(device, "device_kind", lambda: "NVIDIA H200")


def _serve_kernels(m, n, k, block):
    S = jax.ShapeDtypeStruct
    qw = jq.quantize_weight(jnp.zeros((n, k)), dtype=E4M3, block_size=block)
    return cuda_kernels(lambda x: jq.quantized_linear(x, qw), S((m, k), jnp.bfloat16))


def test_dispatch_mosaic_on_hopper_for_prefill(hopper):
    assert P.plan(2048, 4096, 4096, layout="rowwise", config=None, device_kind="NVIDIA H200",
                  interpret=False).implementation == "mosaic_gpu"
    assert _serve_kernels(2048, 4096, 4096, None) == ["jaxquant_dynamic_quantize", "jaxquant_fp8_gemm_rowwise_mgpu"]
    assert _serve_kernels(2048, 4096, 4096, 128) == ["jaxquant_dynamic_quantize", "jaxquant_fp8_gemm_blockwise_mgpu"]
    # decode, too few tiles, and shapes off the Mosaic tile run the Triton kernel
    assert _serve_kernels(16, 4096, 4096, None) == ["jaxquant_dynamic_quantize", "jaxquant_fp8_matmul_rowwise"]
    assert _serve_kernels(256, 1024, 1024, 128) == ["jaxquant_dynamic_quantize", "jaxquant_fp8_matmul_blockwise"]
    assert _serve_kernels(2000, 4096, 4096, None) == ["jaxquant_dynamic_quantize", "jaxquant_fp8_matmul_rowwise"]
    # M = 128: the Mosaic kernel from 64 CTA tiles (8192 x 8192: 64 tiles of 128 x 128; 4096: 32)
    plan = lambda m, n, k: P.plan(m, n, k, layout="blockwise", config=None, device_kind="NVIDIA H100 80GB HBM3",
                                  interpret=False)
    assert plan(128, 8192, 8192).implementation == "mosaic_gpu"
    assert plan(128, 4096, 14336).implementation == "triton"


def test_dispatch_triton_off_hopper(monkeypatch):
    monkeypatch.setattr(device, "device_kind", lambda: "NVIDIA A100-SXM4-80GB")
    assert _serve_kernels(2048, 4096, 4096, None) == ["jaxquant_dynamic_quantize", "jaxquant_fp8_matmul_rowwise"]
    c = P.plan(1, 8192, 8192, layout="rowwise", config=None, device_kind="NVIDIA A100", interpret=False)
    assert c.implementation == "triton" and c.config.split_k > 1 and c.workspace_bytes > 0
    with pytest.raises(ValueError, match="no interpret mode"):
        P.plan(256, 512, 512, layout="rowwise", config=jq.pallas.fp8_matmul.mosaic.Config(), device_kind=None,
               interpret=True)


# ---------------------------------------------------------------------------------------------
# serving: quantized_linear with fp8 weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [None, 128])
def test_quantized_linear_fp8(rng, block):
    n, k = 256, 384
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 19, k)), jnp.bfloat16)
    x = x.at[0, 4].set(0)  # an all-zero token
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    qw = jq.quantize_weight(w, dtype=E4M3, block_size=block)
    assert qw.codes.dtype == E4M3 and qw.scale.shape == ((n,) if block is None else (2, 3))
    f = lambda x: jq.quantized_linear(x, qw, bias, out_dtype=jnp.float32)
    y_ref = np.asarray(run_impl("reference", f, x))
    # the reference is dynamic_quantize of x then the reference GEMM
    g = jq.PerToken() if block is None else jq.PerGroup(128)
    q, s, _ = jq.dynamic_quantize(x, granularity=g, dtype=E4M3)
    layout = "rowwise" if block is None else "blockwise"
    y2 = run_impl("reference", lambda q, s: jq.fp8_matmul(q, qw.codes, s, qw.scale, bias, layout=layout,
                                                        out_dtype=jnp.float32), q, s)
    assert np.array_equal(np.asarray(y2), y_ref)
    a2, s2 = np.asarray(q).reshape(-1, k), np.asarray(s).reshape(38, -1)
    mag = O.magnitude(a2, qw.codes, s2, qw.scale, layout=layout).reshape(2, 19, n)
    within(run_impl(KERNEL, f, x), y_ref, mag, KERNEL_C)
    # close to the float layer (fp8 quantization of both operands: ~2**-4 relative a product)
    yf = np.asarray(x, np.float32) @ np.asarray(w).T + np.asarray(bias)
    assert np.abs(y_ref - yf).max() <= 2 * 2.0**-4 * (np.abs(np.asarray(x, np.float32)) @ np.abs(np.asarray(w)).T).max()
    # gradient: straight through the activation quantizer, dx = dy @ W_hat
    dy = jnp.asarray(rng.standard_normal((2, 19, n)), jnp.float32)
    dx, db = jax.grad(lambda x, b: jnp.sum(jq.quantized_linear(x, qw, b, out_dtype=jnp.float32) * dy), (0, 1))(
        x.astype(jnp.float32), bias)
    w_hat = np.asarray(jq.dequantize_weight(qw), np.float64)
    dy64 = np.asarray(dy, np.float64)
    # float32 dot / sum against float64: within n * 2**-24 of the sum of magnitudes
    assert (np.abs(np.asarray(dx) - dy64 @ w_hat) <= 2.0**-15 * (np.abs(dy64) @ np.abs(w_hat))).all()
    assert (np.abs(np.asarray(db) - dy64.sum(axis=(0, 1))) <= 2.0**-15 * np.abs(dy64).sum(axis=(0, 1))).all()


def test_quantized_linear_fp8_static_scale_and_e5m2(rng):
    w = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    qw = jq.quantize_weight(w, dtype=E5M2)
    y = run_impl("reference", lambda x: jq.quantized_linear(x, qw, act_scale=0.01), x)
    q = jq.quantize(x, jnp.float32(0.01), granularity=jq.PerTensor(), dtype=E5M2)
    want = jq.fp8_matmul(q, qw.codes, jnp.float32(0.01), qw.scale, out_dtype=jnp.float32).astype(x.dtype)
    # (jit may fold the constant scale into the epilogue's products: equal within float32 rounding)
    mag = O.magnitude(q, qw.codes, np.full((1, 1), 0.01), qw.scale)
    within(y, np.asarray(want), mag, 0.0)


def test_fp8_weights_and_errors(rng):
    w = jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)
    qb = jq.quantize_weight(w, dtype=E4M3, block_size=128)
    # the weight's codes and scales are dynamic_quantize's, per 128 x 128 block
    q, s, _ = jq.dynamic_quantize(w, granularity=jq.PerBlock((128, 128)), dtype=E4M3)
    assert np.array_equal(np.asarray(qb.codes).view(np.uint8), np.asarray(q).view(np.uint8))
    assert np.array_equal(np.asarray(jq.dequantize_weight(qb)),
                          np.asarray(q).astype(np.float32) * np.repeat(np.repeat(np.asarray(s), 128, 0), 128, 1))
    leaves, tree = jax.tree_util.tree_flatten(qb)
    assert len(leaves) == 2 and jax.tree_util.tree_unflatten(tree, leaves).block_size == 128
    with pytest.raises(ValueError, match="block_size: N = 256 and K = 200"):
        jq.quantize_weight(jnp.zeros((256, 200)), dtype=E4M3, block_size=128)
    with pytest.raises(ValueError, match="fp8 weights take block_size"):
        jq.quantize_weight(w, dtype=E4M3, bits=4)
    with pytest.raises(ValueError, match="block_size: only for fp8"):
        jq.quantize_weight(w, block_size=128)
    with pytest.raises(ValueError, match="block_size: expected None or 128"):
        jq.quantized_linear(jnp.zeros((2, 256)), jq.quantize_weight(w, dtype=E4M3, block_size=64))
    with pytest.raises(ValueError, match="act_scale: a static per-tensor"):
        jq.quantized_linear(jnp.zeros((2, 256)), qb, act_scale=1.0)
    with pytest.raises(ValueError, match="runs in jaxquant.quantized_linear"):
        jq.weight_only_linear(jnp.zeros((2, 256)), qb)
    with pytest.raises(ValueError, match="expected K = 128"):
        jq.quantized_linear(jnp.zeros((2, 128)), qb)


# ---------------------------------------------------------------------------------------------
# training: fp8_linear
# ---------------------------------------------------------------------------------------------


def grad_bound(a, b, dtype, c):
    """Bound of ``|fp8 GEMM(a, b) - a @ b^T|`` with both operands quantized to ``dtype`` (any recipe):
    each code is within ``u |v| + d`` of its value (``u`` = 2**-4 e4m3 / 2**-3 e5m2 relative, ``d``
    half the subnormal step times the largest possible scale ``amax(tensor) / fmax``), plus the
    GEMM's own ``c * S`` and the float32 output rounding."""
    u = 2.0**-4 if dtype == E4M3 else 2.0**-3
    half_sub = 2.0**-10 if dtype == E4M3 else 2.0**-17
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    da = half_sub * a.max() / fp8_max(dtype)
    db = half_sub * b.max() / fp8_max(dtype)
    qa, qb = (1 + u) * a + da, (1 + u) * b + db
    return qa @ qb.T - a @ b.T + (c + 2.0**-16) * (qa @ qb.T) + 2.0**-22 * (a @ b.T) + 1e-30


@pytest.mark.parametrize("recipe", jq.primitives.fp8_matmul.api.RECIPES)
def test_fp8_linear_gradients_within_bound(rng, recipe):
    """With a linear loss ``sum(y * g)`` the float gradients are ``g @ w`` and ``g^T @ x`` exactly."""
    m, n, k = 40, 136, 256
    x = jnp.asarray(rng.standard_normal((m, k)) * 3, jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    loss = lambda x, w, b: jnp.sum(jq.fp8_linear(x, w, b, recipe=recipe) * g)
    for impl, c in (("reference", 0.0), (KERNEL, KERNEL_C)):
        y = run_impl(impl, lambda x, w, b: jq.fp8_linear(x, w, b, recipe=recipe), x, w, bias)
        dx, dw, db = run_impl(impl, jax.grad(loss, (0, 1, 2)), x, w, bias)
        yf = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
        assert (np.abs(np.asarray(y) - np.asarray(bias) - yf) <= grad_bound(x, w, E4M3, c) + 1e-6).all()
        assert (np.abs(np.asarray(dx) - np.asarray(g, np.float64) @ np.asarray(w, np.float64))
                <= grad_bound(g, w.T, E4M3, c)).all()
        assert (np.abs(np.asarray(dw) - np.asarray(g, np.float64).T @ np.asarray(x, np.float64))
                <= grad_bound(g.T, x.T, E4M3, c)).all()
        g64 = np.asarray(g, np.float64)
        assert (np.abs(np.asarray(db) - g64.sum(0)) <= 2.0**-17 * np.abs(g64).sum(0)).all()
        # and not exact: the GEMMs really ran on fp8 codes
        assert np.abs(np.asarray(dx) - np.asarray(g, np.float64) @ np.asarray(w, np.float64)).max() > 1e-4


def test_fp8_linear_e5m2_gradients(rng):
    x = jnp.asarray(rng.standard_normal((32, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 128)) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(jq.fp8_linear(x, w, grad_dtype=E5M2) * g), (0, 1))(x, w)
    assert (np.abs(np.asarray(dx) - np.asarray(g, np.float64) @ np.asarray(w, np.float64))
            <= grad_bound(g, w.T, E5M2, 0.0)).all()
    assert (np.abs(np.asarray(dw) - np.asarray(g, np.float64).T @ np.asarray(x, np.float64))
            <= grad_bound(g.T, x.T, E5M2, 0.0)).all()


@pytest.mark.parametrize("recipe,layout", [("tensorwise", "rowwise"), ("rowwise", "rowwise"),
                                           ("blockwise", "blockwise")])
def test_fp8_linear_three_fp8_gemms_in_hlo(recipe, layout):
    S = jax.ShapeDtypeStruct
    loss = lambda x, w: jnp.sum(jq.fp8_linear(x, w, recipe=recipe).astype(jnp.float32))
    names = cuda_kernels(jax.value_and_grad(loss, (0, 1)), S((256, 512), jnp.bfloat16), S((384, 512), jnp.bfloat16))
    gemms = [k for k in names if k.startswith("jaxquant_fp8_")]
    assert gemms == [f"jaxquant_fp8_matmul_{layout}"] * 3, names
    quant = {"tensorwise": "jaxquant_quantize", "rowwise": "jaxquant_dynamic_quantize",
             "blockwise": "jaxquant_dynamic_quantize"}[recipe]
    assert names.count(quant) >= 3 and set(names) <= {quant, "jaxquant_quantize", gemms[0]}


@pytest.mark.parametrize("recipe,layout,kernel", [("rowwise", "rowwise", "jaxquant_fp8_gemm_rowwise_mgpu"),
                                                  ("blockwise", "blockwise", "jaxquant_fp8_gemm_blockwise_mgpu")])
def test_fp8_linear_mosaic_on_hopper(hopper, recipe, layout, kernel):
    """Prefill-sized training GEMMs (forward, dgrad, wgrad) take the Mosaic GPU kernel on Hopper."""
    S = jax.ShapeDtypeStruct
    loss = lambda x, w: jnp.sum(jq.fp8_linear(x, w, recipe=recipe).astype(jnp.float32))
    names = cuda_kernels(jax.value_and_grad(loss, (0, 1)), S((2048, 4096), jnp.bfloat16),
                         S((4096, 4096), jnp.bfloat16))
    assert [k for k in names if k.startswith("jaxquant_fp8_")] == [kernel] * 3, names


def close(a, b):
    """Equal up to float32 reassociation (the same math in a different program form)."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_fp8_linear_transforms(rng):
    x = jnp.asarray(rng.standard_normal((3, 8, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 128)) * 0.1, jnp.float32)
    f = lambda x, w: jnp.sum(jq.fp8_linear(x, w) ** 2)
    with jq.implementation("reference"):
        want = jax.grad(f, (0, 1))(x, w)
        # leading axes are tokens: the same as one [24, 128] call
        flat = jax.grad(f, (0, 1))(jnp.reshape(x, (24, 128)), w)
        np.testing.assert_array_equal(np.asarray(want[0]).reshape(24, 128), np.asarray(flat[0]))
        remat = jax.jit(jax.grad(jax.checkpoint(f), (0, 1)))(x, w)
        for a, b in zip(remat, want):
            close(a, b)
        # vmap: per-example rowwise scales are per token, so each example equals its own call
        vm = jax.jit(jax.vmap(jax.grad(f, (0, 1)), in_axes=(0, None)))(x, w)
        for i in range(3):
            one = jax.grad(f, (0, 1))(x[i], w)
            close(vm[0][i], one[0])
            close(vm[1][i], one[1])

        total = jax.jit(jax.grad(lambda w: jax.lax.scan(lambda c, xi: (c + f(xi, w), None), 0.0, x)[0]))(w)
        close(total, sum(jax.grad(f, 1)(x[i], w) for i in range(3)))


def test_fp8_linear_bad_inputs():
    x, w = jnp.zeros((4, 128)), jnp.zeros((64, 128))
    with pytest.raises(ValueError, match="recipe: expected one of"):
        jq.fp8_linear(x, w, recipe="per_block")
    with pytest.raises(ValueError, match=r"w: expected a 2-d weight \[N, K\] with K = 128"):
        jq.fp8_linear(x, jnp.zeros((64, 100)))
    with pytest.raises(TypeError, match="grad_dtype: expected an fp8 dtype"):
        jq.fp8_linear(x, w, grad_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"bias: expected shape \(64,\)"):
        jq.fp8_linear(x, w, jnp.zeros((3,)))
    with pytest.raises(TypeError, match="x: expected a float16, bfloat16 or float32"):
        jq.fp8_linear(x.astype(jnp.int8), w)
