"""Every op under ``jax.jit`` with sharded operands (8 CPU devices): equal to one device bit for bit
(K-sharded weight-only: within the float32 summation bound of docs/sharding.md), and the compiled
module's collectives within the bound each layout states (none where the op is local)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from conftest import assert_same_bits, make_params, make_x
from sharding_harness import h, impl  # noqa: F401  (fixtures)

U = 2.0 ** -24  # float32 unit roundoff


def same(run, what):
    for i, (a, b) in enumerate(zip(jax.tree.leaves(run.out), jax.tree.leaves(run.one))):
        assert_same_bits(a, b, f"{what} [{i}]")


def _x(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


# ------------------------------------------------------------------------------------------
# Elementwise: quantize, dequantize, fake_quantize and their backward ops
# ------------------------------------------------------------------------------------------

LAYOUTS = {"rows": P("m", None), "cols": P(None, "m")}


def _affine_all(x, dy, q, s_tensor, s_chan, z_chan):
    outs = []
    for s, z, g in ((s_tensor, None, jq.PerTensor()), (s_chan, z_chan, jq.PerChannel(-1))):
        outs += [jq.quantize(x, s, z, granularity=g, qmin=-128, qmax=127),
                 jq.dequantize(q, s, z, granularity=g),
                 jq.fake_quantize(x, s, z, granularity=g, qmin=-128, qmax=127),
                 jq.fake_quantize_backward(dy, x, s, z, granularity=g, qmin=-128, qmax=127),
                 jq.quantize_backward(dy, x, s, z, granularity=g, qmin=-128, qmax=127)]
    return outs


@pytest.mark.parametrize("layout", ["rows", "cols", "2x4"])
def test_affine_ops_local_on_any_layout(h, impl, rng, layout):
    m, c = 16, 64
    s_chan, z_chan = make_params(rng, (c,), qmin=-128, qmax=127, asymmetric=True, pow2=True)
    x = make_x(rng, (m, c), jnp.float32, s_chan.astype(np.float64), z_chan, qmin=-128, qmax=127)
    dy = _x(rng, (m, c))
    q = jnp.asarray(rng.integers(-128, 128, (m, c)), jnp.int8)
    s_tensor = jnp.float32(0.05)
    if layout == "2x4":
        mesh, spec, pspec = h.mesh2x4, P("data", "model"), P("model")
    else:
        mesh, spec, pspec = h.mesh, LAYOUTS[layout], P(LAYOUTS[layout][1])
    args = [h.put(a, *spec, mesh=mesh) for a in (x, dy, q)]
    args += [h.put(s_tensor, mesh=mesh), h.put(s_chan, *pspec, mesh=mesh), h.put(z_chan, *pspec, mesh=mesh)]
    run = h.run(_affine_all, *args, impl=impl)
    same(run, f"affine ops, {layout}")
    assert run.count == 0, run.collectives
    assert h.laid_out(jax.tree.leaves(run.out)[0], spec, mesh)  # the result keeps x's layout


# ------------------------------------------------------------------------------------------
# LSQ backward: dx local; dscale / dzero_point summed across the split axes (float32 psum)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_lsq_backward(h, impl, rng, layout, gran):
    m, c = 16, 64
    x, dy = _x(rng, (m, c), scale=3.0), _x(rng, (m, c))
    if gran == "tensor":
        g, s, z = jq.PerTensor(), jnp.float32(0.07), jnp.float32(3.0)
        ps = P()
    else:
        g, s, z = jq.PerChannel(-1), jnp.asarray(rng.uniform(0.02, 0.1, (c,)), jnp.float32), jnp.asarray(
            rng.integers(-4, 4, (c,)), jnp.float32)
        ps = P(LAYOUTS[layout][1])

    def f(dy, x, s, z):
        return jq.lsq_backward(dy, x, s, z, granularity=g, qmin=-128, qmax=127, grad_factor=0.5)

    run = h.run(f, h.put(dy, *LAYOUTS[layout]), h.put(x, *LAYOUTS[layout]), h.put(s, *ps), h.put(z, *ps),
                impl=impl)
    assert_same_bits(run.out[0], run.one[0], "dx")
    # dscale / dzero_point: per-element terms bounded by |dy| (|x| / s + 256) * grad_factor and
    # |dy| * (s + 1) * grad_factor; the two sums (any order) each within n u of the exact sum
    n = m * c
    terms_s = np.abs(np.asarray(dy)) * (np.abs(np.asarray(x)) / np.asarray(s).min() + 256) * 0.5
    terms_z = np.abs(np.asarray(dy)) * (np.asarray(s).max() + 1) * 0.5
    for i, terms in ((1, terms_s), (2, terms_z)):
        bound = 2 * n * U * terms.sum() + 1e-30
        err = np.max(np.abs(np.asarray(run.out[i], np.float64) - np.asarray(run.one[i], np.float64)))
        assert err <= bound, (i, err, bound)
    split_sum = (layout == "rows") or gran == "tensor"  # a summed axis is split: a psum per gradient
    assert (1 <= run.count <= 2) if split_sum else run.count == 0, run.collectives
    assert run.bytes <= 2 * 4 * c, run.collectives


# ------------------------------------------------------------------------------------------
# Dynamic quantization
# ------------------------------------------------------------------------------------------


def _dyn_x(rng, shape):
    x = rng.standard_normal(shape) * rng.uniform(0.5, 4, (shape[0], 1))
    x[1, 5] = np.nan  # a NaN row
    x[2, 9] = np.inf
    x[3] = 0.0  # an all-zero row
    x[4] = -np.abs(x[4])  # a row with no positive value
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", ["rows", "cols", "2x4"])
def test_dynamic_per_token(h, impl, rng, layout, symmetric):
    m, d = 16, 64
    x = _dyn_x(rng, (m, d))
    mesh, spec = (h.mesh2x4, P("data", "model")) if layout == "2x4" else (h.mesh, LAYOUTS[layout])
    run = h.run(lambda x: jq.dynamic_quantize(x, symmetric=symmetric), h.put(x, *spec, mesh=mesh), impl=impl)
    same(run, f"dynamic_quantize, {layout}")
    if layout == "rows":
        assert run.count == 0, run.collectives
    else:  # the reduced axis is split: one all-reduce (max) of 2 (3 asymmetric) floats per local row
        rows = m if layout == "cols" else m // 2
        assert run.collectives["all-reduce"][0] == 1 and run.count == 1, run.collectives
        assert run.bytes <= rows * 3 * 4 + (rows * 8 if not symmetric else 0), run.collectives


def test_dynamic_per_group_local(h, impl, rng):
    x = _dyn_x(rng, (16, 64))  # groups of 8: each device holds whole groups
    run = h.run(lambda x: jq.dynamic_quantize(x, granularity=jq.PerGroup(8)), h.put(x, None, "m"), impl=impl)
    same(run, "dynamic_quantize PerGroup(8), cols")
    assert run.count == 0, run.collectives


# ------------------------------------------------------------------------------------------
# W8A8: quantized_linear and int8_matmul
# ------------------------------------------------------------------------------------------

M, K, N = 16, 256, 64


def _linear_operands(rng, n=N, k=K, m=M):
    x = _x(rng, (m, k), scale=2.0)
    w = _x(rng, (n, k), scale=0.05)
    bias = _x(rng, (n,))
    return x, jq.quantize_weight(w, bits=8), bias


GEMM_LAYOUTS = {  # name: (x spec, weight spec over [N, K], the output's spec)
    "tokens": (P("m", None), P(None, None), P("m", None)),
    "N": (P(None, None), P("m", None), P(None, "m")),
    "K": (P(None, "m"), P(None, "m"), P(None, None)),
}


def _gemm_bound(layout, m, n):
    """Collective bytes the layout may add: none; K: the int32 accumulators (4 M N) and, dynamic,
    the per-token statistics (2 floats per row)."""
    return 0 if layout != "K" else 4 * m * n + 8 * m


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("layout", ["tokens", "N", "K"])
def test_quantized_linear(h, impl, rng, layout, static):
    x, qw, bias = _linear_operands(rng)
    xs, ws, ys = GEMM_LAYOUTS[layout]
    act = jnp.float32(2.0 ** -6) if static else None
    run = h.run(lambda x, qw, b: jq.quantized_linear(x, qw, b, act_scale=act), h.put(x, *xs),
                h.put_weight(qw, *ws), h.put(bias, ws[0]), impl=impl)
    same(run, f"quantized_linear, {layout}")
    assert run.bytes <= _gemm_bound(layout, M, N), run.collectives
    assert h.laid_out(run.out, ys)
    assert run.bytes < N * K / 3, run.collectives  # far under the int8 weight


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.int32])
@pytest.mark.parametrize("layout", ["N", "K"])
def test_int8_matmul(h, impl, rng, layout, out_dtype):
    a = jnp.asarray(rng.integers(-128, 128, (M, K)), jnp.int8)
    w = jnp.asarray(rng.integers(-128, 128, (N, K)), jnp.int8)
    a_s = jnp.asarray(rng.uniform(0.01, 0.1, (M,)), jnp.float32)
    w_s = jnp.asarray(rng.uniform(0.01, 0.1, (N,)), jnp.float32)
    b = _x(rng, (N,))
    xs, ws, _ = GEMM_LAYOUTS[layout]
    if out_dtype == jnp.int32:
        f = lambda a, w, a_s, w_s, b: jq.int8_matmul(a, w, out_dtype=jnp.int32)  # noqa: E731
    else:
        f = lambda a, w, a_s, w_s, b: jq.int8_matmul(a, w, a_s, w_s, b)  # noqa: E731
    run = h.run(f, h.put(a, *xs), h.put(w, *ws), h.put(a_s, xs[0]), h.put(w_s, ws[0]), h.put(b, ws[0]),
                impl=impl)
    same(run, f"int8_matmul, {layout}")
    assert run.bytes <= (4 * M * N if layout == "K" else 0), run.collectives


# ------------------------------------------------------------------------------------------
# Weight-only
# ------------------------------------------------------------------------------------------

WO_FORMATS = {"w4g32": dict(bits=4, group_size=32), "w4g32a": dict(bits=4, group_size=32, symmetric=False),
              "w8c": dict(bits=8)}


def _wo_bound(x, qw, one):
    """|sharded - one device| <= 2 (K + 2) u sum_k |x_k w_k| (+ bias rounding) before the cast to
    x's dtype, plus one ulp of x's dtype at the result."""
    w = np.asarray(jq.dequantize_weight(qw, dtype=jnp.float32), np.float64)
    s = np.abs(np.asarray(x, np.float64)) @ np.abs(w).T
    k = w.shape[1]
    ulp = np.spacing(np.abs(np.asarray(one, np.float32))).astype(np.float64) if x.dtype != jnp.float32 else 0
    ulp = ulp * (2 ** 16 if x.dtype == jnp.bfloat16 else 1)
    return 2 * (k + 2) * U * s + 2 * U * np.abs(np.asarray(one, np.float64)) + ulp


@pytest.mark.parametrize("fmt", list(WO_FORMATS))
@pytest.mark.parametrize("layout", ["tokens", "N", "K"])
def test_weight_only(h, impl, rng, layout, fmt):
    x = _x(rng, (M, K))
    qw = jq.quantize_weight(_x(rng, (N, K), scale=0.05), **WO_FORMATS[fmt])
    bias = _x(rng, (N,))
    xs, ws, ys = GEMM_LAYOUTS[layout]
    run = h.run(lambda x, qw, b: jq.weight_only_linear(x, qw, b), h.put(x, *xs), h.put_weight(qw, *ws),
                h.put(bias, ws[0]), impl=impl)
    assert h.laid_out(run.out, ys)
    if layout != "K":
        assert run.count == 0, run.collectives
        if impl == "interpret":  # the shards run the one-device kernel config: same summation order
            same(run, f"weight_only_linear {fmt}, {layout}")
            return
        # the reference is XLA's dot, whose float32 summation order on the CPU depends on the shape
    err = np.abs(np.asarray(run.out, np.float64) - np.asarray(run.one, np.float64))
    assert (err <= _wo_bound(x, qw, run.one)).all(), err.max()
    if layout != "K":
        return
    # one float32 all-reduce of the [M, N] partial sums
    assert run.collectives["all-reduce"] == (1, 4 * M * N) and run.count == 1, run.collectives


def test_weight_only_k_bf16(h, impl, rng):
    x = _x(rng, (M, K), jnp.bfloat16)
    qw = jq.quantize_weight(_x(rng, (N, K), scale=0.05), bits=4, group_size=32)
    run = h.run(lambda x, qw: jq.weight_only_linear(x, qw), h.put(x, None, "m"), h.put_weight(qw, None, "m"),
                impl=impl)
    assert run.out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(run.out, np.float64) - np.asarray(run.one, np.float64))
    assert (err <= _wo_bound(x, qw, run.one)).all(), err.max()


def test_weight_only_one_group_per_row(h, impl, rng):
    """K == group_size: the scales' K axis has size 1 (Shardy takes no size-1 part of a compound factor)."""
    x = _x(rng, (M, 128))
    qw = jq.quantize_weight(_x(rng, (N, 128), scale=0.05), bits=4, group_size=128)
    run = h.run(lambda x, qw: jq.weight_only_linear(x, qw), h.put(x), h.put_weight(qw, "m", None), impl=impl)
    assert run.count == 0, run.collectives
    assert h.laid_out(run.out, P(None, "m"))
    err = np.abs(np.asarray(run.out, np.float64) - np.asarray(run.one, np.float64))
    assert (err <= _wo_bound(x, qw, run.one)).all(), err.max()


def test_weight_only_group_split_is_an_error(h, impl, rng):
    x = _x(rng, (M, K))
    qw = jq.quantize_weight(_x(rng, (N, K), scale=0.05), bits=4, group_size=64)  # K / 8 = 32: half a group
    qw = jq.QuantizedWeight(h.put(qw.codes, None, "m"), h.put(qw.scale), None, bits=4, group_size=64,
                            symmetric=True, shape=qw.shape)  # codes split over K; 4 groups cannot be
    with pytest.raises(Exception, match=r"weight_only_linear: the layout splits K=256 over mesh axes \('m',\)"):
        h.run(lambda x, qw: jq.weight_only_linear(x, qw), h.put(x, None, "m"), qw, impl=impl)


# ------------------------------------------------------------------------------------------
# FSDP: a weight sharded over the axis the tokens use is gathered as codes, never as floats
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [8, 256])
@pytest.mark.parametrize("op", ["w8a8", "w4a16"])
def test_fsdp_moves_the_smaller_operand(h, impl, rng, op, m):
    """Tokens and the weight's rows split over the same axis: the op keeps the larger operand in
    place and moves the smaller one, as XLA does for a float dot. At decode (m = 8) the
    activations move; at prefill (m = 256) the weight does, as int8 / int4 codes and scales."""
    x = _x(rng, (m, K))
    if op == "w8a8":
        qw = jq.quantize_weight(_x(rng, (N, K), scale=0.05), bits=8)
        f = jq.quantized_linear
    else:
        qw = jq.quantize_weight(_x(rng, (N, K), scale=0.05), bits=4, group_size=32)
        f = jq.weight_only_linear
    run = h.run(f, h.put(x, "m", None), h.put_weight(qw, "m", None), impl=impl)
    if op == "w8a8":
        same(run, f"{op}, FSDP, M = {m}")
    else:  # the shards' M tile may differ from one device's (float32 sums: the weight-only bound)
        err = np.abs(np.asarray(run.out, np.float64) - np.asarray(run.one, np.float64))
        assert (err <= _wo_bound(x, qw, run.one)).all(), err.max()
    stored = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(qw))
    moved = min(stored, x.size * 4)  # the smaller operand, once
    out_bytes = m * N * 4  # the result may be re-laid out for the caller (tokens split)
    assert 0 < run.bytes <= moved + out_bytes, (run.collectives, moved, out_bytes)
    assert run.bytes < N * K * 4 / (4 if op == "w8a8" else 8) + 4 * qw.scale.size + out_bytes + 1  # never floats


# ------------------------------------------------------------------------------------------
# Uneven sizes, a 2 x 4 mesh, vmap
# ------------------------------------------------------------------------------------------


def test_uneven_dimensions(h, impl, rng):
    # 12 tokens, N = 36, K = 200 on 8 devices: nothing divides. Arrays cannot be committed with
    # such layouts; inside jit a sharding constraint asks for them (XLA pads). Results equal one
    # device; the op keeps an indivisible dimension whole (XLA moves it).
    x, qw, bias = _linear_operands(rng, n=36, k=200, m=12)
    sh = lambda *s: jax.sharding.NamedSharding(h.mesh, P(*s))  # noqa: E731
    wsc = jax.lax.with_sharding_constraint

    def f(x, qw, b, constrain=True):
        c = wsc if constrain else (lambda a, _: a)
        xr = c(x, sh("m", None))
        qw = jq.QuantizedWeight(c(qw.codes, sh("m", None)), c(qw.scale, sh("m")), None, bits=8,
                                group_size=None, symmetric=True, shape=qw.shape)
        return jq.dynamic_quantize(xr), jq.quantized_linear(xr, qw, c(b, sh("m"))), jq.quantized_linear(
            c(x, sh(None, "m")), qw, b)

    run = h.run(f, h.put(x), h.put_weight(qw), h.put(bias), impl=impl,
                single=lambda *a: f(*a, constrain=False))
    same(run, "dynamic_quantize / quantized_linear on indivisible layouts")


@pytest.mark.parametrize("op", ["w8a8", "w4a16"])
def test_mesh_2x4_tokens_and_k(h, impl, rng, op):
    k = 512  # K / 4 = 128: whole groups of 32
    x = _x(rng, (M, k))
    if op == "w8a8":
        qw, f = jq.quantize_weight(_x(rng, (N, k), scale=0.05), bits=8), jq.quantized_linear
    else:
        qw, f = jq.quantize_weight(_x(rng, (N, k), scale=0.05), bits=4, group_size=32), jq.weight_only_linear
    m2 = h.mesh2x4
    run = h.run(f, h.put(x, "data", "model", mesh=m2), h.put_weight(qw, None, "model", mesh=m2), impl=impl)
    assert h.laid_out(run.out, P("data", None), m2)
    if op == "w8a8":
        same(run, "quantized_linear, 2x4 (tokens over data, K over model)")
        assert run.bytes <= 4 * (M // 2) * N + 8 * (M // 2), run.collectives
    else:
        err = np.abs(np.asarray(run.out, np.float64) - np.asarray(run.one, np.float64))
        assert (err <= _wo_bound(x, qw, run.one)).all(), err.max()
        assert run.bytes == 4 * (M // 2) * N, run.collectives


def test_vmap_of_sharded_call(h, impl, rng):
    x = _x(rng, (3, M, K))
    qw = jq.quantize_weight(_x(rng, (N, K), scale=0.05), bits=8)
    f = jax.vmap(lambda x, qw: jq.quantized_linear(x, qw), in_axes=(0, None))
    run = h.run(f, h.put(x, None, None, "m"), h.put_weight(qw, None, "m"), impl=impl)
    same(run, "vmap(quantized_linear), K over 8 devices")
    assert run.bytes <= 4 * 3 * M * N + 8 * 3 * M, run.collectives
    g = jax.vmap(lambda x: jq.dynamic_quantize(x))
    run = h.run(g, h.put(x, None, "m", None), impl=impl)
    same(run, "vmap(dynamic_quantize)")


# ------------------------------------------------------------------------------------------
# describe
# ------------------------------------------------------------------------------------------


def test_describe_reports_shards_and_collectives(h, rng):
    x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=jax.sharding.NamedSharding(h.mesh, P(None, "m")))
    qw = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(
        h.mesh, P(None, "m") if a.ndim == 2 else P(None))), jq.quantize_weight(_x(rng, (N, K)), bits=8))
    with jq.implementation("interpret"):
        d = jq.describe(jq.quantized_linear, x, qw)
    assert len(d.shards) == 1
    sh = d.shards[0]
    assert sh.op == "jaxquant_quantized_linear" and sh.in_specs[1] == P(None, "m")
    assert sh.local[:2] == ("float32[16, 32]", "int8[64, 32]")
    assert "jaxquant_int8_matmul_int8" in [k for o in sh.ops for k in o.kernels]
    assert any(r.startswith("psum over ('m',)") for r in sh.reduces)
    assert d.collectives["all-reduce"] == (2, 4 * M * N + 8 * M)
    assert d.collectives["all-gather"] == (0, 0)
    assert "collectives in the compiled module: all-reduce: 2" in str(d)
    plain = jq.describe(jq.quantized_linear, jax.ShapeDtypeStruct((M, K), jnp.float32), jq.quantize_weight(
        _x(rng, (N, K)), bits=8))
    assert plain.collectives is None and plain.shards == ()


def test_explicit_mesh_axes(h, impl, rng):
    """A mesh with Explicit axes (``jax.make_mesh``'s default): the same partitioning."""
    mesh = jax.sharding.Mesh(np.array(h.devices), ("m",), axis_types=(jax.sharding.AxisType.Explicit,))
    x, qw, bias = _linear_operands(rng)
    run = h.run(lambda x, qw, b: jq.quantized_linear(x, qw, b), h.put(x, mesh=mesh),
                h.put_weight(qw, "m", None, mesh=mesh), h.put(bias, "m", mesh=mesh), impl=impl)
    same(run, "quantized_linear, N split on an Explicit mesh")
    assert run.count == 0, run.collectives


# ------------------------------------------------------------------------------------------
# Inside shard_map (its default check_vma=True: every kernel output must type its variation)
# ------------------------------------------------------------------------------------------


def test_every_family_inside_shard_map(h, impl, rng):
    """Each op family on the row shards ``shard_map`` hands it equals the op on the whole array
    (row-local ops: quantize family, dynamic per token, LSQ, W8A8, weight-only, fp8)."""
    m, k, n = 16, 128, 64
    x = _x(rng, (m, k))
    s = jnp.asarray(2.0 ** rng.integers(-4, 0, (m,)), jnp.float32)
    w = _x(rng, (n, k), scale=0.05)
    qw8, qw4 = jq.quantize_weight(w, bits=8), jq.quantize_weight(w, bits=4, group_size=32)
    qf8 = jq.quantize_weight(w, dtype=jnp.float8_e4m3fn)
    tok = jq.PerToken()

    def ops(x, s):
        r = dict(granularity=tok, qmin=-128, qmax=127)
        return (jq.quantize(x, s, **r), jq.fake_quantize(x, s, **r), jq.fake_quantize_backward(x, x, s, **r),
                jq.dynamic_quantize(x)[:2],
                jq.dynamic_quantize(x, dtype=jnp.float8_e4m3fn)[:2],
                jq.fake_quantize_learnable(x, s, jnp.zeros_like(s), granularity=jq.PerChannel(0), qmin=-128, qmax=127),
                jq.quantized_linear(x, qw8), jq.weight_only_linear(x, qw4), jq.quantized_linear(x, qf8))

    specs = (P("m", None), P("m"))
    outs = jax.tree.map(lambda a: P("m", *([None] * (len(a.shape) - 1))), jax.eval_shape(ops, x, s))
    mapped = jax.shard_map(ops, mesh=h.mesh, in_specs=specs, out_specs=outs)
    run = h.run(mapped, h.put(x, "m", None), h.put(s, "m"), impl=impl, single=ops)
    assert run.count == 0, run.collectives
    same(run, "inside shard_map")
