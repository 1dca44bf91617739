"""Sharding annotations through quantize (jaxquant.flax.sharding): the float kernel's axis names
mapped onto the codes / scales / zero points of W [N, K], nnx and linen, concrete and abstract;
and (in a subprocess with 8 host devices, tests/flax/sharded_mlp.py) a Megatron-sharded MLP from
float through a QAT step to W8A8 / W4A16 serving, equal to one device."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxquant.flax import (W4A16, W8A8, QATLayer, QuantConfig, QuantizationWarning, QuantizedLayer, quantize,
                           quantize_variables, restore_checkpoint, save_checkpoint)
from jaxquant.flax.sharding import weight_axes
from jaxquant.flax import geometry as G

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
wp = nnx.with_partitioning
INIT = nnx.initializers.lecun_normal()
W4_ASYM_G32 = QuantConfig(weight_bits=4, group_size=32, weight_symmetric=False, activations=None)
W8A8_LSQ_ASYM = QuantConfig(weight_bits=8, learnable_scales=True, weight_symmetric=False, activations=None)


def names(layer, attr):
    """The ``out_sharding`` names of a layer's variable, None when it has none."""
    var = getattr(layer, attr)
    got = var.get_metadata().get("out_sharding")
    return None if got is None else tuple(got)


def specs(model):
    """``{path: PartitionSpec}`` of ``nnx.get_partition_spec(nnx.state(model))``."""
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.get_partition_spec(
        nnx.state(model)))}


def linear(k, n, kernel_names, bias_names=None, rngs=None):
    bias_init = nnx.initializers.zeros if bias_names is None else wp(nnx.initializers.zeros, bias_names)
    return nnx.Linear(k, n, kernel_init=wp(INIT, kernel_names), bias_init=bias_init, rngs=rngs or nnx.Rngs(0))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = linear(256, 512, (None, "model"), ("model",), rngs)       # column parallel
        self.down = linear(512, 256, ("model", None), None, rngs)           # row parallel

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


@pytest.fixture(autouse=True)
def metadata_only():
    """Annotations without eager placement (no mesh needed): the tests of placement set a mesh."""
    with nnx.use_eager_sharding(False):
        yield


# ------------------------------------------------------------------------------------------
# the mapping
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, scale_names", [(W8A8, "per_channel"), (W4A16, "grouped"), (W4_ASYM_G32, "grouped")])
def test_linear_column_and_row_parallel(config, scale_names):
    model = MLP(nnx.Rngs(0))
    served = quantize(model, config)
    up, down = served.up, served.down
    assert isinstance(up, QuantizedLayer) and isinstance(down, QuantizedLayer)
    # kernel [K, N]: (None, "model") is N-sharded -> codes [N, K] ("model", None)
    assert names(up, "codes") == ("model", None)
    assert names(down, "codes") == (None, "model")
    grouped = scale_names == "grouped"
    assert names(up, "w_scale") == (("model", None) if grouped else ("model",))
    assert names(down, "w_scale") == ((None, "model") if grouped else (None,))
    if not config.weight_symmetric:
        assert names(up, "w_zero_point") == names(up, "w_scale")
        assert names(down, "w_zero_point") == names(down, "w_scale")
    assert names(up, "bias") == ("model",)
    # int4: codes [N, K // 2] (pairs along K), scales [N, K // g]: the names still fit the shapes
    if config.weight_bits == 4:
        assert up.codes.get_value().shape == (512, 128) and down.codes.get_value().shape == (256, 256)
    s = specs(served)
    assert s["up/codes"] == P("model", None) and s["down/codes"] == P(None, "model")
    assert s["up/bias"] == P("model")
    # the float model is unchanged
    assert names(model.up, "kernel") == (None, "model")


def test_qat_keeps_the_kernel_and_annotates_learnable_scales():
    model = MLP(nnx.Rngs(0))
    qat = quantize(model, W8A8_LSQ_ASYM, mode="qat")
    assert isinstance(qat.up, QATLayer)
    assert qat.up.kernel.get_metadata() == model.up.kernel.get_metadata()
    assert names(qat.up, "kernel") == (None, "model") and names(qat.up, "bias") == ("model",)
    assert names(qat.up, "w_scale") == ("model",) and names(qat.up, "w_zero_point") == ("model",)
    assert names(qat.down, "w_scale") == (None,)
    assert isinstance(qat.up.w_scale, nnx.Param)
    served = quantize(qat)
    assert names(served.up, "codes") == ("model", None) and names(served.up, "w_zero_point") == ("model",)
    assert names(served.down, "codes") == (None, "model")
    grouped = quantize(model, dataclasses.replace(W8A8_LSQ_ASYM, group_size=32), mode="qat")
    assert names(grouped.down, "w_scale") == (None, "model")
    assert grouped.down.w_scale.get_value().shape == (256, 16)


def test_linear_general_and_attention():
    e, h, d = 64, 4, 16
    qkv = nnx.LinearGeneral(e, (h, d), kernel_init=wp(INIT, ("data", "model", None)), rngs=nnx.Rngs(0))
    out = nnx.LinearGeneral((h, d), e, axis=(-2, -1), kernel_init=wp(INIT, ("model", None, None)), rngs=nnx.Rngs(1))
    model = nnx.Sequential(qkv, out)
    served = quantize(model, W4_ASYM_G32)
    # N = heads * head_dim: the heads are the major axis, so a block of heads is a block of N
    assert names(served.layers[0], "codes") == ("model", "data")
    assert names(served.layers[0], "w_scale") == ("model", "data")
    assert names(served.layers[1], "codes") == (None, "model")
    # nnx.MultiHeadAttention gives one kernel_init to all four projections: (None, "model", None)
    # shards the heads of query / key / value, but the head_dim (a minor axis of K) of out
    mha = nnx.MultiHeadAttention(h, e, qkv_features=h * d, kernel_init=wp(INIT, (None, "model", None)), decode=False,
                                 rngs=nnx.Rngs(0))
    with pytest.warns(QuantizationWarning, match=r"'out'.*K \(inputs\) is left unsharded"):
        served = quantize(mha, W8A8)
    for p in ("query", "key", "value"):
        assert names(getattr(served, p), "codes") == ("model", None)
    assert names(served.out, "codes") == (None, None)


def test_einsum():
    model = nnx.Einsum("btd,dnh->btnh", (64, 4, 16), kernel_init=wp(INIT, ("data", "model", None)), rngs=nnx.Rngs(0))
    served = quantize(model, W8A8)
    assert names(served, "codes") == ("model", "data") and names(served, "w_scale") == ("model",)
    model = nnx.Einsum("btnh,nhd->btd", (4, 16, 64), kernel_init=wp(INIT, ("model", None, None)), rngs=nnx.Rngs(0))
    assert names(quantize(model, W4_ASYM_G32), "codes") == (None, "model")


def test_weight_axes_flattened_groups():
    g = G.general("LinearGeneral", (64, 1, 4, 16), (0,))   # N = 1 * 4 * 16
    assert weight_axes(g, (None, None, "model", None)) == ("model", None)   # major axes of size 1 are free
    with pytest.warns(QuantizationWarning, match="not a block sharding"):
        assert weight_axes(g, (None, None, "model", "data")) == (None, None)
    with pytest.warns(QuantizationWarning, match="not a block sharding"):
        assert weight_axes(g, ("data", None, None, "model")) == (None, "data")
    # logical names with rules: names the rules leave unsharded do not count
    rules = (("heads", "model"), ("kv", None))
    assert weight_axes(g, (None, None, "heads", "kv"), rules=rules) == ("heads", None)
    with pytest.raises(ValueError, match="do not match its rank"):
        weight_axes(g, ("model", None))


def test_logical_names_with_sharding_rules():
    rules = (("embed", None), ("heads", "model"), ("kv", None))
    layer = nnx.LinearGeneral(64, (4, 16), kernel_init=wp(INIT, ("embed", "heads", "kv"), sharding_rules=rules),
                              rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)
        served = quantize(layer, W8A8)
    assert names(served, "codes") == ("heads", "embed")
    assert served.codes.get_metadata()["sharding_rules"] == rules
    assert specs(served)["codes"] == P("model", None) and specs(served)["w_scale"] == P("model")


# ------------------------------------------------------------------------------------------
# placement and abstract models
# ------------------------------------------------------------------------------------------
def explicit_mesh():
    """A one-device mesh of explicit sharding types: converting the grouped weights of a kernel
    placed on it needs the sharding left to XLA (jaxquant.flax.sharding.call_auto_typed)."""
    return jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def test_placed_like_the_kernel():
    mesh = explicit_mesh()
    with nnx.use_eager_sharding(True), jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0))
    assert model.up.kernel.get_value().sharding == NamedSharding(mesh, P(None, "model"))
    served = quantize(model, W4A16)         # outside the mesh context: placed from the kernel's mesh
    assert served.up.codes.get_value().sharding == NamedSharding(mesh, P("model", None))
    assert served.down.w_scale.get_value().sharding == NamedSharding(mesh, P(None, "model"))
    x = jnp.ones((2, 256))
    np.testing.assert_array_equal(served(x), quantize(MLP(nnx.Rngs(0)), W4A16)(x))


def test_grouped_qat_under_an_explicit_mesh():
    x = jax.random.normal(jax.random.key(2), (4, 256))
    plain = quantize(nnx.Sequential(linear(256, 512, (None, "model"), ("model",))), W4A16, mode="qat")
    mesh = explicit_mesh()
    with nnx.use_eager_sharding(True), jax.set_mesh(mesh):
        qat = quantize(nnx.Sequential(linear(256, 512, (None, "model"), ("model",))), W4A16, mode="qat")
        y = nnx.jit(lambda m, x: m(x))(qat, x)
    assert qat.layers[0].kernel.get_value().sharding == NamedSharding(mesh, P(None, "model"))
    np.testing.assert_array_equal(y, plain(x))


def test_abstract_models_keep_the_annotations():
    mesh = explicit_mesh()
    with nnx.use_eager_sharding(True), jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: quantize(MLP(nnx.Rngs(0)), W4A16))
    codes = abstract.up.codes.get_value()
    assert isinstance(codes, jax.ShapeDtypeStruct) and codes.shape == (512, 128)
    assert names(abstract.up, "codes") == ("model", None) and codes.sharding.spec == P("model", None)
    assert specs(abstract)["down/w_scale"] == P(None, "model")
    # a model of ShapeDtypeStruct variables, quantized outside eval_shape
    float_abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    served = quantize(float_abstract, W8A8)
    assert isinstance(served.down.codes.get_value(), jax.ShapeDtypeStruct)
    assert names(served.down, "codes") == (None, "model") and names(served.down, "w_scale") == (None,)
    shardings = nnx.get_named_sharding(nnx.state(served), mesh)
    assert shardings["up"]["codes"].get_value() == NamedSharding(mesh, P("model", None))


# ------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------
class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(128, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
                     bias_init=nn.with_partitioning(nn.initializers.zeros, ("model",)))(x)
        h = nn.DenseGeneral((4, 32), kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                              ("embed", "heads", "kv")))(h)
        return nn.DenseGeneral(64, axis=(-2, -1), kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                                                   ("model", None, None)))(h)


LINEN_RULES = (("embed", None), ("heads", "model"), ("kv", None))


@pytest.mark.parametrize("config", [W8A8, W4_ASYM_G32], ids=str)
def test_linen_partitioned_boxes(config):
    model, x = LinenMLP(), jnp.ones((2, 64))
    variables = model.init(jax.random.key(0), x)
    served = quantize(model, config)
    with nn.logical_axis_rules(LINEN_RULES):
        sv = quantize_variables(served, variables, x)
    q = sv["quantized"]
    assert type(q["Dense_0"]["codes"]) is nn.Partitioned
    assert type(q["DenseGeneral_0"]["codes"]) is nn.LogicallyPartitioned
    spec = nn.get_partition_spec(sv)
    grouped = config.group_size is not None
    assert spec["quantized"]["Dense_0"]["codes"] == P("model", None)
    assert spec["quantized"]["Dense_0"]["w_scale"] == (P("model", None) if grouped else P("model"))
    assert spec["quantized"]["DenseGeneral_0"]["codes"] == P("heads", "embed")
    assert spec["quantized"]["DenseGeneral_1"]["codes"] == P(None, "model")
    if not config.weight_symmetric:
        assert spec["quantized"]["DenseGeneral_1"]["w_zero_point"] == P(None, "model")
    assert spec["params"]["Dense_0"]["bias"] == P("model")
    with nn.logical_axis_rules(LINEN_RULES):
        mesh_spec = nn.logical_to_mesh(spec)
    assert mesh_spec["quantized"]["DenseGeneral_0"]["codes"] == P("model", None)
    # the boxed variables serve as the unboxed ones do
    np.testing.assert_array_equal(served.apply(sv, x), served.apply(nn.meta.unbox(sv), x))


def test_linen_qat_learnable_scales_and_serving():
    model, x = LinenMLP(), jnp.ones((2, 64))
    variables = model.init(jax.random.key(0), x)
    qat = quantize(model, W8A8_LSQ_ASYM, mode="qat")
    with nn.logical_axis_rules(LINEN_RULES):
        qv = quantize_variables(qat, variables, x)
    spec = nn.get_partition_spec(qv)["params"]
    assert spec["Dense_0"]["w_scale"] == P("model") and spec["Dense_0"]["w_zero_point"] == P("model")
    assert spec["DenseGeneral_0"]["w_scale"] == P("heads")
    assert spec["DenseGeneral_1"]["kernel"] == P("model", None, None)
    np.testing.assert_array_equal(qat.apply(qv, x), qat.apply(nn.meta.unbox(qv), x))
    served = quantize(qat)
    with nn.logical_axis_rules(LINEN_RULES):
        sv = quantize_variables(served, qv, x)
    assert nn.get_partition_spec(sv)["quantized"]["Dense_0"]["codes"] == P("model", None)


# ------------------------------------------------------------------------------------------
# 8 host devices (a subprocess: the device count is fixed when jax starts)
# ------------------------------------------------------------------------------------------
def test_sharded_mlp_equals_one_device():
    """tests/flax/sharded_mlp.py: meshes 2 x 4 and 1 x 8; W8A8 bit-exact, W4A16 within its bound."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "flax", "sharded_mlp.py"), "2x4", "1x8"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mesh"] for r in reports] == ["2x4", "1x8"]
    for r in reports:
        for name in ("W8A8 (from QAT)", "W4A16-g128 (PTQ)"):
            ref = r[name]["reference"]["collective_bytes"]
            # the plain-jnp path partitions: only the row-parallel layer's partial sums (and the
            # per-token amax) move, never a weight
            assert ref["all-gather"] == 0 and sum(ref.values()) < r[name]["weight_bytes"] / 10, r
        assert r["W8A8 (from QAT)"]["reference"]["max_abs_diff"] == 0.0
    print(json.dumps(reports, indent=1))


def test_checkpoint_restores_sharded(tmp_path):
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    served = quantize(MLP(nnx.Rngs(0)), W4A16)
    save_checkpoint(tmp_path / "ckpt", served)
    abstract = nnx.eval_shape(lambda: quantize(MLP(nnx.Rngs(1)), W4A16))
    restored = restore_checkpoint(tmp_path / "ckpt", abstract, mesh=mesh)
    codes = restored.up.codes.get_value()
    assert codes.sharding == NamedSharding(mesh, P("model", None))
    assert restored.down.w_scale.get_value().sharding == NamedSharding(mesh, P(None, "model"))
    np.testing.assert_array_equal(codes, served.up.codes.get_value())
