"""The fp8 GEMM kernels (``jaxquant.pallas.fp8_matmul``) against the float64 oracle, within its bound.

On the CPU the Triton kernel runs in interpret mode (float32 dots: the tight ``FLOAT32_C`` bound);
on a GPU the real kernels run against the tensor-core bound ``TENSOR_CORE_C``. Both kernels are
lowered for CUDA on the CPU for several configs.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxquant.pallas.fp8_matmul import mosaic as FM
from jaxquant.pallas.fp8_matmul import oracle as O
from jaxquant.pallas.fp8_matmul import triton as FT
from jaxquant.core.device import device_kind, is_hopper
from jaxquant.pallas.mosaic_common import SMEM_BUDGET
from conftest import cuda_kernels

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
INTERPRET = not HAS_GPU
C = O.FLOAT32_C if INTERPRET else O.TENSOR_CORE_C
E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
FMAX = {E4M3: 448.0, E5M2: 57344.0}


def codes(rng, shape, dtype=E4M3, zero_rows=(), limit=None):
    """fp8 codes spread over the format's range (normals and subnormals; |x| <= limit), some rows zero."""
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-10, 8, size=shape)
    lim = FMAX[dtype] if limit is None else limit
    x = np.clip(x, -lim, lim)
    x[list(zero_rows)] = 0
    return jnp.asarray(x, jnp.float32).astype(dtype)


def scales(rng, layout, m, n, k, per_tensor_a=False, per_tensor_w=False):
    u = lambda *s: jnp.asarray(2.0 ** rng.uniform(-12, 2, size=s), jnp.float32)
    if layout == "rowwise":
        return u(1, 1) if per_tensor_a else u(m, 1), u(1) if per_tensor_w else u(n)
    return u(m, -(-k // 128)), u(-(-n // 128), -(-k // 128))


def run(a, w, sa, sw, b=None, **kw):
    return FT.fp8_matmul(a, w, sa, sw, b, interpret=INTERPRET, **kw)


def assert_within(y, a, w, sa, sw, b, layout):
    ok, ratio, msg = O.check(y, a, w, sa, sw, b, layout=layout, c=C)
    assert ok, msg
    return ratio


def test_oracle_blockwise_is_the_dequantized_product(rng):
    """The oracle's blockwise sum equals the float64 product of the dequantized operands (ragged K, N)."""
    m, n, k = 7, 300, 333
    a, w = codes(rng, (m, k)), codes(rng, (n, k))
    sa, sw = scales(rng, "blockwise", m, n, k)
    kk, nn = np.arange(k), np.arange(n)
    a_deq = np.asarray(a, np.float64) * np.asarray(sa, np.float64)[:, kk // 128]
    w_deq = np.asarray(w, np.float64) * np.asarray(sw, np.float64)[nn[:, None] // 128, kk[None, :] // 128]
    mag = np.abs(a_deq) @ np.abs(w_deq).T
    np.testing.assert_allclose(O.magnitude(a, w, sa, sw, layout="blockwise"), mag, rtol=1e-12)
    assert np.all(np.abs(O.reference(a, w, sa, sw, layout="blockwise") - a_deq @ w_deq.T) <= 1e-12 * mag)


# (M, N, K, config): ragged edges on every side, few grid steps; None: the heuristic (decode: split K)
CASES = [
    (37, 150, 300, FT.Config(32, 64, 128)),           # ragged M, N, K (masked tail chunk)
    (64, 128, 384, FT.Config(64, 128, 128, group_m=1)),  # no masks, 3 K chunks
    (1, 70, 512, None),                               # M = 1: row broadcast, split K
    (16, 96, 1024, None),                             # decode: split K
    (5, 33, 64, FT.Config(16, 32, 32)),               # tiny, block_k 32
    (1, 64, 256, FT.Config(16, 64, 64, split_k=2, row_bcast=False)),  # M = 1 as a masked 16-row tile
]


@pytest.mark.parametrize("layout", FT.LAYOUTS)
@pytest.mark.parametrize("m,n,k,cfg", CASES)
def test_matches_float64_reference(rng, layout, m, n, k, cfg):
    a, w = codes(rng, (m, k), zero_rows=[0] if m > 2 else []), codes(rng, (n, k))
    sa, sw = scales(rng, layout, m, n, k)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    y = run(a, w, sa, sw, b, layout=layout, out_dtype=jnp.float32, config=cfg)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert_within(y, a, w, sa, sw, b, layout)
    if m > 2:  # an all-zero row of a: exactly the bias
        np.testing.assert_array_equal(np.asarray(y)[0], np.asarray(b))


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("per_tensor", [(True, False), (False, True), (True, True)])
def test_rowwise_per_tensor_scales_and_out_dtypes(rng, out_dtype, per_tensor):
    m, n, k = 40, 96, 256
    a, w = codes(rng, (m, k), limit=8), codes(rng, (n, k), limit=8)  # |y| < 2**14: float16 holds it
    sa, sw = (s * 0.25 for s in scales(rng, "rowwise", m, n, k, *per_tensor))
    y = run(a, w, sa, sw, out_dtype=out_dtype, config=FT.Config(64, 128, 128))
    assert y.dtype == out_dtype
    assert_within(y, a, w, sa, sw, None, "rowwise")


def test_e5m2_and_bias_dtype(rng):
    m, n, k = 24, 64, 192
    a, w = codes(rng, (m, k), E5M2), codes(rng, (n, k), E5M2)
    sa, sw = scales(rng, "rowwise", m, n, k)
    b = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
    y = run(a, w, sa, sw, b, out_dtype=jnp.float32, config=FT.Config(32, 64, 64))
    assert_within(y, a, w, sa, sw, b, "rowwise")


def test_rowwise_epilogue_order(rng):
    """Rowwise: ``(acc * a_scale) * w_scale + bias``, two float32 products then the add, as the W8A8
    epilogue (exact integer-valued sums here: small codes, K = 64, so only the epilogue rounds)."""
    m, n, k = 16, 32, 64
    a = jnp.asarray(rng.integers(-8, 9, (m, k)), jnp.float32).astype(E4M3)
    w = jnp.asarray(rng.integers(-8, 9, (n, k)), jnp.float32).astype(E4M3)
    sa, sw = scales(rng, "rowwise", m, n, k)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    cfg = FT.Config(16, 32, 64)
    acc = np.asarray(a, np.float32) @ np.asarray(w, np.float32).T  # exact: |acc| < 2**24
    prod = (acc * np.asarray(sa)) * np.asarray(sw)[None, :]
    np.testing.assert_array_equal(np.asarray(run(a, w, sa, sw, out_dtype=jnp.float32, config=cfg)), prod)
    y = np.asarray(run(a, w, sa, sw, b, out_dtype=jnp.float32, config=cfg))
    want = prod + np.asarray(b)[None, :]
    if INTERPRET:
        # XLA:CPU's LLVM contracts the last product and the bias add into an FMA whatever the HLO
        # says (an optimization barrier does not stop it); on the GPU, mul.rn keeps them apart.
        fused = ((acc * np.asarray(sa)).astype(np.float64) * np.asarray(sw, np.float64)[None, :]
                 + np.asarray(b, np.float64)[None, :]).astype(np.float32)
        assert np.all((y == want) | (y == fused))
    else:
        np.testing.assert_array_equal(y, want)


def test_blockwise_scales_reach_their_blocks(rng):
    """Each (row, K block) and (N block, K block) scale multiplies its own block only: doubling one
    weight block's scale doubles that block's share of exactly the columns of its N block."""
    m, n, k = 16, 256, 256
    a, w = codes(rng, (m, k)), codes(rng, (n, k))
    sa, sw = scales(rng, "blockwise", m, n, k)
    cfg = FT.Config(16, 128, 128)
    y0 = np.asarray(run(a, w, sa, sw, layout="blockwise", out_dtype=jnp.float32, config=cfg), np.float64)
    y1 = np.asarray(run(a, w, sa, sw.at[1, 0].multiply(2), layout="blockwise", out_dtype=jnp.float32, config=cfg),
                    np.float64)
    np.testing.assert_array_equal(y0[:, :128], y1[:, :128])
    share = (np.asarray(a, np.float64)[:, :128] @ np.asarray(w, np.float64)[128:, :128].T
             * np.asarray(sa, np.float64)[:, :1] * float(sw[1, 0]))
    mag = O.magnitude(a, w, sa, sw, layout="blockwise")[:, 128:]
    assert np.all(np.abs((y1 - y0)[:, 128:] - share) <= 4 * C * mag + 1e-30)


def test_bound_detects_a_wrong_scale(rng):
    """The oracle's bound is tight enough to fail a kernel that misplaces one K block's scale."""
    m, n, k = 8, 128, 256
    a, w = codes(rng, (m, k)), codes(rng, (n, k))
    sa, sw = scales(rng, "blockwise", m, n, k)
    y = run(a, w, sa, sw, layout="blockwise", out_dtype=jnp.float32, config=FT.Config(16, 128, 128))
    assert O.check(y, a, w, sa, sw, layout="blockwise", c=C)[0]
    ok, ratio, _ = O.check(y, a, w, sa, sw[:, ::-1], layout="blockwise", c=C)
    assert not ok and ratio > 1


@pytest.mark.parametrize("layout", FT.LAYOUTS)
def test_nan_propagates(rng, layout):
    m, n, k = 20, 160, 256
    a, w = codes(rng, (m, k)), codes(rng, (n, k))
    a = a.at[3, 17].set(jnp.nan)
    w = w.at[100, 200].set(jnp.nan)
    sa, sw = scales(rng, layout, m, n, k)
    sa = sa.at[7, 0].set(jnp.nan)
    for cfg in (FT.Config(32, 64, 128), None):
        y = np.asarray(run(a, w, sa, sw, layout=layout, out_dtype=jnp.float32, config=cfg))
        nan = np.isnan(y)
        assert nan[3].all() and nan[:, 100].all()
        # rowwise: a_scale[7] scales all of row 7; blockwise: a_scale[7, 0] the row's first K block
        assert nan[7].all()
        assert nan.sum() == 2 * n + m - 2, nan.sum()
        assert_within(y, a, w, sa, sw, None, layout)


def test_empty_and_k_zero(rng):
    a, w = codes(rng, (3, 0)), codes(rng, (5, 0))
    sa, sw = scales(rng, "rowwise", 3, 5, 0)
    b = jnp.arange(5, dtype=jnp.float32)
    np.testing.assert_array_equal(run(a, w, sa, sw, b, out_dtype=jnp.float32), np.broadcast_to(np.arange(5.0), (3, 5)))
    assert run(codes(rng, (0, 64)), codes(rng, (5, 64)), jnp.ones((1, 1)), jnp.ones((5,))).shape == (0, 5)


# ---------------------------------------------------------------- configs, heuristics, validation

@pytest.mark.parametrize("bad,match", [
    (dict(block_m=8), "block_m: expected a power of two >= 16, got 8"),
    (dict(block_n=48), "block_n: expected a power of two >= 16, got 48"),
    (dict(block_k=16), "block_k: expected a power of two >= 32, got 16"),
    (dict(block_k=512), "block_k: expected <= 256"),
    (dict(num_warps=3), "num_warps: expected a power of two"),
    (dict(num_stages=0), "num_stages: expected an int >= 1, got 0"),
    (dict(split_k=3), "split_k: expected a power of two"),
])
def test_triton_config_validation(bad, match):
    base = dict(block_m=64, block_n=64, block_k=128)
    with pytest.raises(ValueError, match=match):
        FT.Config(**{**base, **bad})


def test_triton_blockwise_config_limits(rng):
    a, w = codes(rng, (16, 256)), codes(rng, (256, 256))
    sa, sw = scales(rng, "blockwise", 16, 256, 256)
    for cfg in (FT.Config(16, 256, 128), FT.Config(16, 128, 256)):
        with pytest.raises(ValueError, match="blockwise scales need block_n <= 128 and block_k <= 128"):
            run(a, w, sa, sw, layout="blockwise", config=cfg)


@pytest.mark.parametrize("args,match", [
    (dict(a=jnp.zeros((4, 64), jnp.bfloat16)), "a, w: expected fp8 codes of one format"),
    (dict(w=jnp.zeros((8, 64), E5M2)), "a, w: expected fp8 codes of one format"),
    (dict(w=jnp.zeros((8, 32), E4M3)), r"w: expected \[N, K\] with K = 64"),
    (dict(a_scale=jnp.ones((4,))), r"a_scale \(rowwise\): expected shape \(4, 1\) or \(1, 1\), got \(4,\)"),
    (dict(w_scale=jnp.ones((1, 8))), r"w_scale \(rowwise\): expected shape \(8,\) or \(1,\)"),
    (dict(w_scale=jnp.ones((8,), jnp.bfloat16)), "w_scale: expected float32 scales, got bfloat16"),
    (dict(bias=jnp.ones((4,))), r"bias: expected shape \(8,\), got \(4,\)"),
    (dict(layout="blockwise", a_scale=jnp.ones((4, 2))),
     r"a_scale \(blockwise\): expected shape \(4, 1\) = \[M, ceil\(K/128\)\], got \(4, 2\)"),
    (dict(layout="blockwise", a_scale=jnp.ones((4, 1))),
     r"w_scale \(blockwise\): expected shape \(1, 1\) = \[ceil\(N/128\), ceil\(K/128\)\], got \(8,\)"),
    (dict(layout="colwise"), "layout: expected one of"),
    (dict(out_dtype=jnp.int32), "out_dtype: expected one of float32, bfloat16, float16"),
])
def test_bad_inputs(args, match):
    kw = dict(a=jnp.zeros((4, 64), E4M3), w=jnp.zeros((8, 64), E4M3), a_scale=jnp.ones((4, 1)),
              w_scale=jnp.ones((8,)), bias=None, layout="rowwise", out_dtype=jnp.bfloat16)
    kw.update(args)
    ops = [kw.pop(name) for name in ("a", "w", "a_scale", "w_scale", "bias")]
    with pytest.raises(ValueError, match=match):
        FT.fp8_matmul(*ops, interpret=True, **kw)
    with pytest.raises(ValueError, match=match):  # the Mosaic GPU kernel validates the same way
        FM.fp8_matmul_mgpu(*ops, **kw)


@pytest.mark.parametrize("layout", FT.LAYOUTS)
def test_heuristics_pure_and_valid(layout):
    for m in (1, 7, 16, 100, 256, 1000, 2048, 8192):
        for n, k in ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (11008, 4000), (70, 300)):
            cfg = FT.heuristics(m, n, k, layout=layout)
            assert cfg == FT.heuristics(m, n, k, layout=layout)
            cfg.check_layout(layout)
            assert cfg.split_k == FT.effective_split(cfg.split_k, k, cfg.block_k)
            if m <= 16:
                assert cfg.block_m == 16


@pytest.mark.parametrize("bad,match", [
    (dict(tile_m=32), "tile_m: expected a power of two >= 64, got 32"),
    (dict(tile_n=96), "tile_n: expected a power of two"),
    (dict(tile_n=512), "tile_n: expected <= 256"),
    (dict(part_m=32), "part_m: expected a power of two >= 64, got 32"),
    (dict(tile_m=64, part_m=128), "part_m: expected a divisor of tile_m=64, got 128"),
    (dict(stages=1), "stages: expected an int >= 2, got 1"),
    (dict(epi_n=4), "epi_n: expected a power of two >= 8"),
    (dict(grid_tile_width=0), "grid_tile_width: expected an int >= 1"),
])
def test_mgpu_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        FM.Config(**bad)


def test_mgpu_supports_and_scope():
    cfg = FM.Config()
    assert FM.supports(8192, 8192, 8192, config=cfg) and FM.supports(8192, 8192, 8192, layout="blockwise", config=cfg)
    assert not FM.supports(8000, 8192, 8192, config=cfg)  # M not a multiple of 128
    assert not FM.supports(8192, 8064, 8192, config=cfg)  # N not a multiple of 256
    assert not FM.supports(8192, 8192, 4000, config=cfg)  # K not a multiple of 128
    assert not FM.supports(256, 512, 512, config=FM.Config(part_m=None))  # 256 accumulator registers
    assert FM.supports(256, 512, 512, layout="blockwise", config=FM.Config(tile_m=64, part_m=None))
    assert FM.supports(256, 512, 512, config=FM.Config(tile_m=64, tile_n=32, part_m=None))
    assert not FM.supports(256, 512, 512, layout="blockwise", config=FM.Config(tile_m=64, tile_n=32, part_m=None))
    words = FM.scope(FM.Config(part_m=None))
    assert "at most 192 accumulator registers (tile_n x (tile_m + part_m) / 128 = 256)" in words
    with pytest.raises(ValueError, match="fp8_matmul_mgpu: expected M a multiple of 128, N a multiple of 256"):
        S = jax.ShapeDtypeStruct
        FM.fp8_matmul_mgpu(S((100, 256), E4M3), S((256, 256), E4M3), S((100, 1), jnp.float32), S((256,), jnp.float32),
                           config=cfg)
    for m, n, k in ((8192, 8192, 8192), (4096, 14336, 4096), (2048, 4096, 14336), (256, 4096, 4096)):
        for layout in FT.LAYOUTS:
            h = FM.heuristics(m, n, k, layout=layout)
            assert FM.supports(m, n, k, layout=layout, config=h), (m, n, k, layout, h)


def test_mgpu_stages_fit_shared_memory():
    for cfg in (FM.Config(), FM.Config(stages=8), FM.Config(tile_n=64, part_m=None, stages=6),
                FM.Config(tile_m=256, tile_n=64, part_m=128)):
        for layout in FT.LAYOUTS:
            for dt in (jnp.bfloat16, jnp.float32):
                st = FM.fit_stages(cfg, layout, dt)
                cm, cn = cfg.cta_shape()
                ring = (cm + cn) * FM.TILE_K + ((cm + FM.WS_WINDOW) * 4 if layout == "blockwise" else 0)
                used = st * ring + 4 * cfg.part_rows() * min(cfg.epi_n, cfg.tile_n) * np.dtype(dt).itemsize
                assert 2 <= st <= cfg.stages and used <= SMEM_BUDGET, (cfg, layout, dt, st)


# ---------------------------------------------------------------- CUDA lowering (no GPU needed)

def _abstract(m, n, k, layout, dtype=E4M3):
    S = jax.ShapeDtypeStruct
    if layout == "rowwise":
        sa, sw = S((m, 1), jnp.float32), S((n,), jnp.float32)
    else:
        sa, sw = S((m, -(-k // 128)), jnp.float32), S((-(-n // 128), -(-k // 128)), jnp.float32)
    return S((m, k), dtype), S((n, k), dtype), sa, sw, S((n,), jnp.float32)


@pytest.mark.lowering
@pytest.mark.parametrize("layout", FT.LAYOUTS)
@pytest.mark.parametrize("m,n,k,cfg", [
    (8192, 8192, 8192, None), (2048, 4096, 14336, None), (128, 4096, 4096, None), (16, 4096, 14336, None),
    (1, 8192, 8192, None), (1000, 11008, 4000, None), (300, 300, 300, FT.Config(64, 64, 64, num_stages=2)),
    (1, 512, 1024, FT.Config(16, 32, 128, split_k=4, row_bcast=False)),
])
def test_triton_lowers_for_cuda(layout, m, n, k, cfg):
    a, w, sa, sw, b = _abstract(m, n, k, layout)
    name = f"jaxquant_fp8_matmul_{layout}"
    for out in (jnp.bfloat16, jnp.float32):
        f = lambda a, w, sa, sw, b: FT.fp8_matmul(a, w, sa, sw, b, layout=layout, out_dtype=out, config=cfg)
        assert cuda_kernels(f, a, w, sa, sw, b) == [name]
    f = lambda a, w, sa, sw: FT.fp8_matmul(a, w, sa, sw, layout=layout, config=cfg)
    assert cuda_kernels(f, a, w, sa, sw) == [name]


@pytest.mark.lowering
def test_triton_lowers_e5m2():
    a, w, sa, sw, b = _abstract(256, 256, 512, "rowwise", E5M2)
    f = lambda a, w, sa, sw, b: FT.fp8_matmul(a, w, sa, sw, b, out_dtype=jnp.float16)
    assert cuda_kernels(f, a, w, sa, sw, b) == ["jaxquant_fp8_matmul_rowwise"]


@pytest.mark.lowering
@pytest.mark.parametrize("layout", FT.LAYOUTS)
@pytest.mark.parametrize("m,n,k,cfg", [
    (256, 512, 512, FM.Config()),
    (256, 512, 640, FM.Config(stages=3, epi_n=64)),
    (256, 1024, 1024, FM.Config(tile_m=64, part_m=None, stages=6, epi_n=64)),
    (512, 256, 384, FM.Config(tile_m=256, tile_n=64, part_m=128, grid_tile_width=2, minor_n=False)),
    (2048, 2048, 512, None),
])
def test_mgpu_lowers_for_cuda(layout, m, n, k, cfg):
    a, w, sa, sw, b = _abstract(m, n, k, layout)
    name = f"jaxquant_fp8_gemm_{layout}_mgpu"
    f = lambda a, w, sa, sw, b: FM.fp8_matmul_mgpu(a, w, sa, sw, b, layout=layout, out_dtype=jnp.bfloat16, config=cfg)
    assert cuda_kernels(f, a, w, sa, sw, b) == [name]
    g = lambda a, w, sa, sw: FM.fp8_matmul_mgpu(a, w, sa, sw, layout=layout, out_dtype=jnp.float32, config=cfg)
    assert cuda_kernels(g, a, w, sa, sw) == [name]


@pytest.mark.lowering
def test_mgpu_lowers_e5m2_and_per_tensor_scales():
    S = jax.ShapeDtypeStruct
    a, w = S((256, 512), E5M2), S((512, 512), E5M2)
    f = lambda a, w: FM.fp8_matmul_mgpu(a, w, jnp.ones((1, 1), jnp.float32), jnp.ones((1,), jnp.float32),
                                        out_dtype=jnp.float16, config=FM.Config())
    assert cuda_kernels(f, a, w) == ["jaxquant_fp8_gemm_rowwise_mgpu"]


# ---------------------------------------------------------------- on a Hopper GPU

@pytest.mark.gpu
@pytest.mark.parametrize("layout", FT.LAYOUTS)
@pytest.mark.parametrize("cfg", [FM.Config(), FM.Config(tile_n=64, part_m=None), FM.Config(tile_m=64, part_m=None)])
def test_mgpu_matches_float64_reference(rng, layout, cfg):
    if not is_hopper(device_kind()):
        pytest.skip("Mosaic GPU wgmma needs a Hopper GPU")
    m, n, k = 512, 768 if cfg.tile_n == 128 and layout == "rowwise" else 512, 1152
    a, w = codes(rng, (m, k), zero_rows=[5]), codes(rng, (n, k))
    a = a.at[9, 3].set(jnp.nan)
    sa, sw = scales(rng, layout, m, n, k)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    for bias, out in ((b, jnp.float32), (None, jnp.bfloat16)):
        y = FM.fp8_matmul_mgpu(a, w, sa, sw, bias, layout=layout, out_dtype=out, config=cfg)
        assert_within(y, a, w, sa, sw, bias, layout)
