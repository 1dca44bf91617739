"""The fp8 GEMM under ``jax.jit`` with sharded operands (8 CPU devices): ``fp8_matmul``, ``quantized_linear``
on fp8 weights and ``fp8_linear`` (forward and gradients) partition like a float matmul, never gathering a
weight. Tokens / N splits equal one device bit for bit in the kernels (each shard runs the one-device
config); K splits, and every split of the reference (XLA's dot sums in an order that depends on its
shape), are within the float32 reassociation bound of docs/sharding.md.

Interpret mode: a tile that runs past the end of an array is masked at shapes known when compiling,
which lets XLA:CPU shrink the tile's dot and sum it in another order (the GPU's masked tiles do not):
the bit-exact cases therefore give each shard whole tiles."""

import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from conftest import assert_same_bits
from jaxquant.pallas.fp8_matmul import triton as tr_k
from sharding_harness import h, impl  # noqa: F401  (fixtures)

U = 2.0 ** -24  # float32 unit roundoff
E4M3 = jnp.float8_e4m3fn
BLOCK = 128
TILE = tr_k.Config(16, 32, 128, group_m=1, num_warps=2, num_stages=3)  # an explicit config: 16-row tiles


def _codes(rng, shape, zero_row=None, nan_at=None):
    x = rng.standard_normal(shape) * rng.uniform(1, 64, shape[:-1] + (1,))  # rows of varied magnitude
    if zero_row is not None:
        x[zero_row] = 0.0
    if nan_at is not None:
        x[nan_at] = np.nan  # an fp8 NaN code: NaN in every output it reaches
    return jnp.asarray(np.clip(x, -448, 448), jnp.float32).astype(E4M3)


def _scales(rng, shape):
    return jnp.asarray(rng.uniform(2.0 ** -8, 2.0 ** -4, shape), jnp.float32)


def _deq(a, a_scale, w, w_scale, layout):
    """float64 ``(A, W)``: the codes times their scales, per element (``S = |A| @ |W|^T``)."""
    a, w = np.asarray(a.astype(jnp.float32), np.float64), np.asarray(w.astype(jnp.float32), np.float64)
    sa, sw = np.asarray(a_scale, np.float64), np.asarray(w_scale, np.float64)
    m, k = a.shape
    n = w.shape[0]
    if layout == "blockwise":
        sa = np.repeat(sa, BLOCK, axis=1)[:, :k]
        sw = np.repeat(np.repeat(sw, BLOCK, axis=0), BLOCK, axis=1)[:n, :k]
    else:
        sa, sw = np.broadcast_to(np.reshape(sa, (-1, 1)), (m, 1)), np.broadcast_to(np.reshape(sw, (-1, 1)), (n, 1))
    return a * sa, w * sw


def reassociation_bound(s, k, one):
    """|sharded - one device| <= 2 (K + 2) u S + 2 u |y| (+ one rounding of y's dtype): both are float32
    sums of the same K products in different orders (docs/sharding.md)."""
    one64 = np.asarray(one.astype(jnp.float32), np.float64)
    ulp = 0 if one.dtype == jnp.float32 else np.spacing(np.abs(one64).astype(np.float32)) * 2.0 ** 16
    return 2 * (k + 2) * U * s + 2 * U * np.abs(one64) + ulp


def within(out, one, bound, what):
    out64, one64 = (np.asarray(t.astype(jnp.float32), np.float64) for t in (out, one))
    assert (np.isnan(out64) == np.isnan(one64)).all(), f"{what}: NaN positions differ"
    err = np.abs(np.where(np.isnan(out64), 0, out64 - one64))
    assert (err <= np.where(np.isnan(one64), 0, bound)).all(), f"{what}: max error {err.max()}"


# ------------------------------------------------------------------------------------------
# fp8_matmul: rowwise (per token / per tensor) and blockwise scales, each split
# ------------------------------------------------------------------------------------------

# (layout, split): (M, N, K, mesh, axis, explicit config). Shards hold whole tiles (module docstring).
CASES = {
    ("rowwise", "tokens"): (128, 32, 256, "m", "m", TILE),
    ("rowwise", "N"): (16, 256, 256, "m", "m", None),  # the one-device tile is 16 x 32: 32 columns a shard
    ("rowwise", "K"): (16, 64, 256, "m", "m", None),  # K / 8 = 32: any split of K serves rowwise scales
    ("tensor", "K"): (16, 64, 256, "m", "m", None),
    ("blockwise", "tokens"): (64, 32, 256, "2x4", "model", TILE),
    ("blockwise", "N"): (16, 256, 256, "2x4", "data", None),  # 128 rows (one scale block) a shard
    ("blockwise", "K"): (16, 64, 512, "2x4", "model", None),  # 128 columns (one scale block) a shard
}


def _specs(split, ax, layout):
    """Specs of (a, w, a_scale, w_scale, bias, y): the scales follow the rows of a / w (rowwise
    ``[M]``, ``[N]``), and their K blocks K (blockwise ``[M, K blocks]``, ``[N blocks, K blocks]``)."""
    a, w, bias, y = {"tokens": (P(ax, None), P(), P(), P(ax, None)), "N": (P(), P(ax, None), P(ax), P(None, ax)),
                     "K": (P(None, ax), P(None, ax), P(), P())}[split]
    if layout == "tensor":
        return a, w, P(), P(), bias, y
    if layout == "rowwise":
        return a, w, P(*tuple(a)[:1]), P(*tuple(w)[:1]), bias, y
    return a, w, a, w, bias, y


@pytest.mark.parametrize("layout, split", list(CASES))
def test_fp8_matmul(h, impl, rng, layout, split):
    m, n, k, mesh_name, ax, config = CASES[(layout, split)]
    mesh = h.mesh if mesh_name == "m" else h.mesh2x4
    a, w = _codes(rng, (m, k), zero_row=3, nan_at=(5, 7)), _codes(rng, (n, k))
    kb, nb = -(-k // BLOCK), -(-n // BLOCK)
    if layout == "blockwise":
        sa, sw = _scales(rng, (m, kb)), _scales(rng, (nb, kb))
    elif layout == "rowwise":
        sa, sw = _scales(rng, (m,)), _scales(rng, (n,))
    else:
        sa, sw = _scales(rng, ()), _scales(rng, ())
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    xs, ws, sas, sws, bs, ys = _specs(split, ax, layout)
    kind = "blockwise" if layout == "blockwise" else "rowwise"

    def f(a, w, sa, sw, b):
        return jq.fp8_matmul(a, w, sa, sw, b, layout=kind, out_dtype=jnp.float32, config=config)

    put = lambda t, spec: h.put(t, *spec, mesh=mesh)  # noqa: E731
    run = h.run(f, put(a, xs), put(w, ws), put(sa, sas), put(sw, sws), put(bias, bs), impl=impl)
    assert h.laid_out(run.out, ys, mesh)
    what = f"fp8_matmul {layout}, {split} split"
    if split == "K":  # one float32 all-reduce of the [M, N] partial sums, nothing else
        assert run.collectives["all-reduce"] == (1, 4 * m * n) and run.count == 1, run.collectives
    else:
        assert run.count == 0, run.collectives
        if impl == "interpret":
            assert_same_bits(run.out, run.one, what)
            return
    sa2 = sa if layout == "blockwise" else jnp.reshape(sa, (-1, 1))
    da, dw = _deq(a, sa2, w, sw, kind)
    within(run.out, run.one, reassociation_bound(np.abs(da) @ np.abs(dw).T, k, run.one), what)


def test_fp8_matmul_leading_dims_and_bf16(h, impl, rng):
    """a [2, 16, K] with its first axis split, w over N on the other mesh axis; bfloat16 output."""
    m2 = h.mesh2x4
    a, w = _codes(rng, (2, 16, 256)), _codes(rng, (64, 256))
    sa, sw = _scales(rng, (2, 16)), _scales(rng, (64,))
    config = tr_k.Config(16, 16, 128, group_m=1, num_warps=2, num_stages=3)  # 16 x 16 tiles: whole per shard

    def f(a, w, sa, sw):
        return jq.fp8_matmul(a, w, sa, sw, layout="rowwise", out_dtype=jnp.bfloat16, config=config)

    run = h.run(f, h.put(a, "data", None, None, mesh=m2), h.put(w, "model", None, mesh=m2),
                h.put(sa, "data", None, mesh=m2), h.put(sw, "model", mesh=m2), impl=impl)
    assert run.count == 0, run.collectives
    assert h.laid_out(run.out, P("data", None, "model"), m2)
    if impl == "interpret":
        assert_same_bits(run.out, run.one, "fp8_matmul [2, 16, K], tokens x N")
    else:
        one = jnp.reshape(run.one, (32, 64))
        da, dw = _deq(jnp.reshape(a, (32, 256)), jnp.reshape(sa, (32, 1)), w, sw, "rowwise")
        within(jnp.reshape(run.out, (32, 64)), one, reassociation_bound(np.abs(da) @ np.abs(dw).T, 256, one), "3-d")


@pytest.mark.parametrize("k", [512, 320])
def test_blockwise_split_cutting_blocks_keeps_k_whole(h, impl, rng, k):
    """K over 8 devices (64 / 40 columns each) would cut the 128-wide scale blocks: the op keeps K
    whole (XLA gathers the fp8 codes along K) and equals one device bit for bit. K = 512 (whole
    blocks, but 4 of them for 8 devices) warns; K = 320 ends in a partial block and is always whole."""
    m, n = 16, 64
    a, w = _codes(rng, (m, k)), _codes(rng, (n, k))
    kb = -(-k // BLOCK)
    sa, sw = _scales(rng, (m, kb)), _scales(rng, (1, kb))  # too few blocks to split 8 ways: replicated

    def f(a, w, sa, sw):
        return jq.fp8_matmul(a, w, sa, sw, layout="blockwise", out_dtype=jnp.float32)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = h.run(f, h.put(a, None, "m"), h.put(w, None, "m"), h.put(sa), h.put(sw), impl=impl)
    messages = [str(c.message) for c in caught if "fp8_matmul" in str(c.message)]
    if k == 512:
        assert any(f"fp8_matmul (blockwise): the layout splits K={k} over mesh axes ('m',) (8 devices), which would "
                   "cut the 128-wide scale blocks (K / 8 = 64)" in t for t in messages), messages
    else:
        assert not messages, messages
    assert_same_bits(run.out, run.one, f"blockwise, K = {k} cut")
    assert run.collectives["all-reduce"] == (0, 0), run.collectives
    assert 0 < run.bytes <= 2 * (m + n) * k, run.collectives  # fp8 codes (XLA:CPU moves them as float16)


def test_inside_shard_map(h, impl, rng):
    """Inside ``shard_map`` the op runs on the shards it is given (column parallel here)."""
    a, w = _codes(rng, (16, 256)), _codes(rng, (256, 256))
    sa, sw = _scales(rng, (16, 1)), _scales(rng, (256,))

    def gemm(a, w, sa, sw):
        return jq.fp8_matmul(a, w, sa[:, 0], sw, layout="rowwise", out_dtype=jnp.float32)

    specs = (P(), P("m", None), P(), P("m"))
    mapped = jax.shard_map(gemm, mesh=h.mesh, in_specs=specs, out_specs=P(None, "m"))  # check_vma=True
    args = [h.put(t, *s) for t, s in zip((a, w, sa, sw), specs)]
    run = h.run(mapped, *args, impl=impl, single=gemm)
    assert run.count == 0, run.collectives
    if impl == "interpret":
        assert_same_bits(run.out, run.one, "fp8_matmul in shard_map")
    else:
        da, dw = _deq(a, sa, w, sw, "rowwise")
        within(run.out, run.one, reassociation_bound(np.abs(da) @ np.abs(dw).T, 256, run.one), "shard_map")


@pytest.mark.parametrize("code", [E4M3, jnp.float8_e5m2])
def test_dynamic_quantize_fp8_rows_split_over_columns(h, impl, rng, code):
    """Per-token fp8 codes with the reduced axis split (the activations of a row-parallel fp8 layer):
    the row amax all-reduced, then the fp8 quantizer on the local columns: as one device."""
    x = rng.standard_normal((16, 256)) * rng.uniform(0.01, 100, (16, 1))
    x[2, 9], x[3] = np.inf, 0.0  # an infinity (saturates, left out of the amax) and an all-zero row
    run = h.run(lambda x: jq.dynamic_quantize(x, dtype=code), h.put(jnp.asarray(x, jnp.float32), None, "m"), impl=impl)
    for i, what in enumerate(("codes", "scale")):
        assert_same_bits(run.out[i], run.one[i], f"dynamic_quantize {jnp.dtype(code).name}: {what}")
    assert run.collectives["all-reduce"][0] == 1 and run.count == 1, run.collectives


# ------------------------------------------------------------------------------------------
# quantized_linear on fp8 weights (serving)
# ------------------------------------------------------------------------------------------

# (format, split): (M, N, K, mesh, axis, config)
LINEAR = {
    ("channel", "tokens"): (128, 32, 256, "m", "m", TILE),
    ("channel", "N"): (16, 256, 256, "m", "m", None),
    ("channel", "K"): (16, 64, 256, "m", "m", None),
    ("block", "tokens"): (32, 128, 256, "2x4", "data", TILE),
    ("block", "N"): (16, 256, 256, "2x4", "data", None),
    ("block", "K"): (16, 128, 512, "2x4", "model", None),
}


def _x_bound(x, qw, k, one):
    """The reassociation bound on the float operands: a dequantized e4m3 code is within 2**-4 of its
    value, or 2**-10 scale below e4m3's normal range (scale <= amax / 448)."""
    x64 = np.abs(np.asarray(x, np.float64))
    w64 = np.abs(np.asarray(jq.dequantize_weight(qw, dtype=jnp.float32), np.float64))
    xa = 1.0625 * x64 + x64.max() / 448 * 2.0 ** -10
    return reassociation_bound(xa @ w64.T, k, one)


@pytest.mark.parametrize("fmt, split", list(LINEAR))
def test_quantized_linear_fp8(h, impl, rng, fmt, split):
    m, n, k, mesh_name, ax, config = LINEAR[(fmt, split)]
    mesh = h.mesh if mesh_name == "m" else h.mesh2x4
    x = jnp.asarray(rng.standard_normal((m, k)) * 2, jnp.float32)
    qw = jq.quantize_weight(jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32), dtype=E4M3,
                            block_size=BLOCK if fmt == "block" else None)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    xs, ws, _, _, bs, ys = _specs(split, ax, "rowwise")
    run = h.run(lambda x, qw, b: jq.quantized_linear(x, qw, b, config=config), h.put(x, *xs, mesh=mesh),
                h.put_weight(qw, *ws, mesh=mesh), h.put(bias, *bs, mesh=mesh), impl=impl)
    assert h.laid_out(run.out, ys, mesh)
    assert run.collectives["all-gather"] == (0, 0), run.collectives  # no weight (nor x) is gathered
    what = f"quantized_linear fp8 {fmt}, {split} split"
    if split == "K":
        # per channel: the per-token amax (max of 2 floats a row); per block: nothing (whole groups
        # of 128 a device); then the float32 partial sums [M, N]
        stats = 8 * m if fmt == "channel" else 0
        assert run.bytes == 4 * m * n + stats and run.collectives["all-reduce"][0] == (2 if stats else 1), \
            run.collectives
        within(run.out, run.one, _x_bound(x, qw, k, run.one), what)
        return
    assert run.count == 0, run.collectives
    if impl == "interpret":
        assert_same_bits(run.out, run.one, what)
    else:
        within(run.out, run.one, _x_bound(x, qw, k, run.one), what)


# ------------------------------------------------------------------------------------------
# fp8_linear (training): forward and gradients under data and tensor parallelism
# ------------------------------------------------------------------------------------------


def _train_step(recipe):
    def f(x, w, b, g):
        y, vjp = jax.vjp(lambda x, w, b: jq.fp8_linear(x, w, b, recipe=recipe), x, w, b)
        return (y,) + vjp(g)

    return f


# name: (recipe, M, N, K, mesh, x spec, w spec, the split of the forward / dgrad / wgrad GEMMs)
TRAIN = {
    # data parallel: forward and dgrad split tokens; wgrad contracts the tokens (a K split: psum of dw)
    "rowwise, data parallel": ("rowwise", 128, 64, 128, "2x4", P("data", None), P(), ("tokens", "tokens", "K")),
    "blockwise, data parallel": ("blockwise", 256, 128, 128, "2x4", P("data", None), P(), ("tokens", "tokens", "K")),
    # column parallel: forward splits N, dgrad contracts N (a K split: psum of dx), wgrad splits rows
    "tensorwise, column parallel": ("tensorwise", 16, 128, 128, "2x4", P(), P("data", None), ("N", "K", "tokens")),
}


@pytest.mark.parametrize("name", list(TRAIN))
def test_fp8_linear_forward_and_grad(h, impl, rng, name):
    recipe, m, n, k, mesh_name, xs, ws, splits = TRAIN[name]
    mesh = h.mesh if mesh_name == "m" else h.mesh2x4
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.1, jnp.float32)
    b = jnp.asarray(rng.standard_normal(n), jnp.float32)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)  # the output's cotangent
    bs = P(ws[0]) if len(ws) else P()
    gs = P(xs[0] if len(xs) else None, ws[0] if len(ws) else None)
    run = h.run(_train_step(recipe), h.put(x, *xs, mesh=mesh), h.put(w, *ws, mesh=mesh), h.put(b, *bs, mesh=mesh),
                h.put(g, *gs, mesh=mesh), impl=impl)
    y, dx, dw, db = run.out
    y1, dx1, dw1, db1 = run.one
    assert h.laid_out(dw, ws, mesh) and h.laid_out(dx, xs, mesh)  # gradients keep their parameters' layouts
    assert run.collectives["all-gather"] == (0, 0), run.collectives  # nothing is gathered, the weight least
    # the K-split GEMM's float32 partial sums (dx or dw, with db's), and a few floats of statistics a row
    summed = m * k if splits[1] == "K" else n * k
    assert run.bytes <= 4 * (summed + n) + 8 * (m + n + k) + 64, run.collectives
    # Bounds on the float operands (a dequantized e4m3 code within 2**-4 of its value, plus
    # 2**-10 scale near zero); the GEMM each result comes from contracts over `c` terms.
    pad = lambda t: 1.0625 * np.abs(np.asarray(t, np.float64)) + np.abs(np.asarray(t)).max() / 448 * 2.0 ** -10  # noqa
    gemms = {"y": (y, y1, pad(x) @ pad(w).T, k), "dx": (dx, dx1, pad(g) @ pad(w), n),
             "dw": (dw, dw1, pad(g).T @ pad(x), m)}
    for (what, (out, one, s, c)), split in zip(gemms.items(), splits):
        if split != "K" and impl == "interpret":
            assert_same_bits(out, one, f"fp8_linear {name}: {what}")
        else:
            within(out, one, reassociation_bound(s, -(-c // BLOCK) * BLOCK, one), f"fp8_linear {name}: {what}")
    np.testing.assert_allclose(db, db1, rtol=1e-5, atol=1e-5)  # XLA's sum of dy over the tokens
