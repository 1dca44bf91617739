"""fp8 in jaxquant.flax: the FP8 / FP8_BLOCK configs, serving through quantized_linear, fp8 training
through fp8_linear (mode="qat"), nnx and linen, summary / describe, checkpoints, GPTQ, errors."""

import dataclasses
import json
import warnings

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

import jaxquant as jq
from jaxquant.flax import (FP8, FP8_BLOCK, GPTQ, W8A8, W8A16, QATLayer, QuantConfig, QuantizationWarning,
                           QuantizedLayer, Rule, fake_quantize_activation, fake_quantize_weight, quantize,
                           quantize_variables, restore_checkpoint, save_checkpoint, summary)
from jaxquant.flax.layers import geometry_of
from tests.conftest import assert_same_bits

E4M3 = jnp.float8_e4m3fn
TENSORWISE = dataclasses.replace(FP8, recipe="tensorwise")
CONFIGS = {"fp8": FP8, "fp8_block": FP8_BLOCK}


class Block(nnx.Module):
    """Attention + MLP as users write it, and a 40-wide head that the 128 x 128 blocks do not fit."""

    def __init__(self, *, rngs, param_dtype=jnp.float32):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=128, decode=False, **kw)
        self.up = nnx.Linear(128, 256, **kw)
        self.down = nnx.Linear(256, 128, **kw)
        self.tail = nnx.Linear(128, 40, **kw)

    def __call__(self, x):
        x = x + self.attn(x)
        x = x + self.down(jax.nn.gelu(self.up(x)))
        return self.tail(x)


def _x(rng, shape=(2, 5, 128), dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _quantize_quietly(model, rules, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = quantize(model, rules, **kw)
    return out, [str(w.message) for w in caught if issubclass(w.category, QuantizationWarning)]


def _qweight(w, config):
    return jq.quantize_weight(w, dtype=E4M3, block_size=config.block_size)


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------
def test_presets_names_and_canonical_recipe():
    assert (str(FP8), str(FP8_BLOCK), str(TENSORWISE)) == ("FP8", "FP8-block128", "FP8-tensorwise")
    assert QuantConfig(weight_dtype=jnp.float8_e4m3fn) == FP8 and FP8.weight_dtype == "float8_e4m3fn"
    # the format's own recipe is stored as None: equal configs compute the same thing
    assert dataclasses.replace(FP8, recipe="rowwise") == FP8
    assert dataclasses.replace(FP8_BLOCK, recipe="blockwise") == FP8_BLOCK
    assert str(dataclasses.replace(FP8_BLOCK, recipe="rowwise")) == "FP8-block128-rowwise"
    assert (FP8.fp8_recipe, FP8_BLOCK.fp8_recipe, TENSORWISE.fp8_recipe, W8A8.fp8_recipe) == (
        "rowwise", "blockwise", "tensorwise", None)
    assert FP8.serving_kind == FP8_BLOCK.serving_kind == "fp8" and FP8.is_fp8 and not W8A8.is_fp8
    assert FP8.scale_shape(256, 384) == (256,) and FP8_BLOCK.scale_shape(256, 384) == (2, 3)
    assert len({FP8, FP8_BLOCK, TENSORWISE, W8A8}) == 4
    for cfg in (FP8, FP8_BLOCK, TENSORWISE):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert QuantConfig(**d) == cfg
    assert FP8_BLOCK.problem(128, n=256, serve=True) is None
    for k, n in ((100, 128), (128, 40)):
        assert f"N = {n} and K = {k} must be multiples of block_size = 128" in FP8_BLOCK.problem(k, n=n, serve=False)
    with pytest.raises(ValueError, match="weight_range.*fp8"):
        FP8.weight_range


@pytest.mark.parametrize("kwargs, field, expected, got", [
    (dict(group_size=32), "group_size", "None", "32"),
    (dict(weight_symmetric=False), "weight_symmetric", "True", "False"),
    (dict(learnable_scales=True), "learnable_scales", "False", "True"),
    (dict(activations="static"), "activations", "'dynamic'", "'static'"),
    (dict(activations=None), "activations", "'dynamic'", "None"),
    (dict(calibration="mse"), "calibration", "'absmax'", "'mse'"),
    (dict(weight_bits=4), "weight_bits", "8", "4"),
    (dict(block_size=64), "block_size", "(None, 128)", "64"),
    (dict(recipe="columnwise"), "recipe", "'blockwise'", "'columnwise'"),
    (dict(weight_dtype="float8_e5m2"), "weight_dtype", "float8_e4m3fn", "'float8_e5m2'"),
    (dict(weight_dtype="int8"), "weight_dtype", "float8_e4m3fn", "'int8'"),
])
def test_impossible_fp8_configs_name_the_field(kwargs, field, expected, got):
    kwargs = {"weight_dtype": "float8_e4m3fn", **kwargs}
    with pytest.raises(ValueError, match=f"QuantConfig.{field}") as e:
        QuantConfig(**kwargs)
    assert expected in str(e.value) and f"got {got}" in str(e.value)


@pytest.mark.parametrize("field, value", [("block_size", 128), ("recipe", "rowwise")])
def test_fp8_fields_on_integer_configs(field, value):
    with pytest.raises(ValueError, match=f"QuantConfig.{field}: only for fp8 weights.*got {value!r}"):
        QuantConfig(**{field: value})


# ------------------------------------------------------------------------------------------
# nnx serving
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_serving_nnx_is_quantized_linear(rng, name):
    cfg = CONFIGS[name]
    model = Block(rngs=nnx.Rngs(0))
    served, warned = _quantize_quietly(model, cfg)
    if cfg.block_size:   # the 40-wide head does not fit 128 x 128 blocks: float, with a warning
        assert isinstance(served.tail, nnx.Linear) and len(warned) == 1
        assert "'tail' stays float" in warned[0] and "N = 40 and K = 128 must be multiples" in warned[0]
    else:
        assert isinstance(served.tail, QuantizedLayer) and not warned
    x = _x(rng)
    for path in ("attn/query", "attn/out", "up", "down"):
        node, layer = model, served
        for p in path.split("/"):
            node, layer = getattr(node, p), getattr(layer, p)
        assert isinstance(layer, QuantizedLayer) and layer.config == cfg
        qw = _qweight(geometry_of(node).weight(node.kernel[...]), cfg)
        assert_same_bits(layer.codes[...], qw.codes, f"{path} codes")
        assert_same_bits(layer.w_scale[...], qw.scale, f"{path} scales")
        assert layer.codes[...].dtype == E4M3 and layer.w_zero_point is None
        xin = {"attn/out": jnp.reshape(x, (2, 5, 2, 64)), "down": _x(rng, (2, 5, 256))}.get(path, x)
        want = jq.quantized_linear(jnp.reshape(xin, (2, 5, -1)), qw, jnp.reshape(node.bias[...], (-1,)))
        assert_same_bits(layer(xin), jnp.reshape(want, layer(xin).shape), f"{path} forward")
    graphdef, state = nnx.split(served)
    y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(y, served(x), rtol=1e-5, atol=1e-5)   # XLA fuses the float ops (softmax, gelu)
    y_f = model(x)
    assert float(jnp.max(jnp.abs(y - y_f))) < 0.1 * float(jnp.max(jnp.abs(y_f)))   # a sanity bound, 4 fp8 layers
    s = summary(served)
    rows = {r.path: r for r in s.rows}
    assert rows["up"].quantization == str(cfg)
    assert rows["up"].bytes == sum(v.get_value().nbytes for v in (served.up.codes, served.up.w_scale, served.up.bias))
    assert str(cfg) in str(s)
    d = jq.describe(lambda x: served(x), x)
    assert "jaxquant_fp8_matmul" in str(d) and "float8_e4m3fn" in str(d)


def test_strict_lists_layers_the_blocks_do_not_fit():
    with pytest.raises(ValueError, match=r"strict=True.*1 layer[\s\S]*'tail' \(FP8-block128\): N = 40"):
        quantize(Block(rngs=nnx.Rngs(0)), FP8_BLOCK, strict=True)
    with pytest.raises(ValueError, match=r"'tail'"):
        quantize(Block(rngs=nnx.Rngs(0)), FP8_BLOCK, mode="qat", strict=True)


# ------------------------------------------------------------------------------------------
# nnx fp8 training (mode="qat")
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [FP8, FP8_BLOCK, TENSORWISE], ids=str)
def test_training_nnx_is_fp8_linear(rng, cfg):
    model = Block(rngs=nnx.Rngs(0))
    qat, _ = _quantize_quietly(model, cfg, mode="qat")
    layer = qat.up
    assert isinstance(layer, QATLayer) and layer.kernel is not model.up.kernel
    assert set(nnx.state(layer, nnx.Param).keys()) == {"kernel", "bias"}    # the optimizer sees the float params
    x, ct = _x(rng), _x(rng, (2, 5, 256))

    graphdef, state = nnx.split(layer)

    def ours(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x) * ct)

    def direct(kernel, bias, x):
        return jnp.sum(jq.fp8_linear(x, kernel.T, bias, recipe=cfg.fp8_recipe) * ct)

    kernel, bias = model.up.kernel[...], model.up.bias[...]
    assert_same_bits(layer(x), jq.fp8_linear(x, kernel.T, bias, recipe=cfg.fp8_recipe), "forward")
    d_state, dx = jax.jit(jax.grad(ours, argnums=(0, 1)))(state, x)
    want = jax.jit(jax.grad(direct, argnums=(0, 1, 2)))(kernel, bias, x)
    for got, w, what in zip((d_state["kernel"].get_value(), d_state["bias"].get_value(), dx), want,
                            ("dkernel", "dbias", "dx")):
        assert_same_bits(got, w, what)

    if cfg != FP8:
        return
    # a whole training step under nnx.jit: the float params move, the layers stay fp8 training layers
    opt = nnx.Optimizer(qat, optax.sgd(0.1), wrt=nnx.Param)
    before = qat.down.kernel[...]

    @nnx.jit
    def step(m, opt, x):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)
        opt.update(m, g)
        return loss

    assert np.isfinite(float(step(qat, opt, x)))
    assert isinstance(qat.down, QATLayer) and not np.array_equal(np.asarray(qat.down.kernel[...]), np.asarray(before))


@pytest.mark.parametrize("name", CONFIGS)
def test_served_from_training_computes_the_trained_forward(rng, name):
    """The format's own recipe quantizes exactly as serving does: float32 outputs are bit-identical."""
    cfg = CONFIGS[name]
    qat, _ = _quantize_quietly(Block(rngs=nnx.Rngs(1)), cfg, mode="qat")
    served, warned = _quantize_quietly(qat, None)
    assert not warned and isinstance(served.up, QuantizedLayer) and served.up.config == cfg
    x = _x(rng)
    assert_same_bits(served(x), qat(x), "served vs trained")
    # tensorwise training is served per channel: the same weights, other scales
    qat_t, _ = _quantize_quietly(Block(rngs=nnx.Rngs(1)), TENSORWISE, mode="qat")
    served_t = quantize(qat_t)
    assert served_t.up.config == TENSORWISE and served_t.up.w_scale[...].shape == (256,)


def test_bfloat16_served_within_one_rounding_of_training(rng):
    layer = nnx.Linear(128, 256, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.asarray(rng.standard_normal(256), jnp.bfloat16)
    qat = quantize(nnx.Sequential(layer), FP8, mode="qat")
    served = quantize(qat)
    x = _x(rng, (7, 128), jnp.bfloat16)
    t, s = qat(x), served(x)
    assert t.dtype == s.dtype == jnp.bfloat16
    # training rounds x@W^T to bfloat16 and then adds the bias; serving rounds once, after the bias
    t64, s64 = np.asarray(t, np.float64), np.asarray(s, np.float64)
    b = np.abs(np.asarray(layer.bias[...], np.float64))
    assert np.all(np.abs(t64 - s64) <= 2.0**-8 * (3 * np.abs(s64) + b) * 1.01 + 2.0**-133)
    assert np.mean(t64 == s64) > 0.5


# ------------------------------------------------------------------------------------------
# fake quantization (the float simulation of the fp8 quantizers)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIGS)
def test_fake_quantize_fp8_is_dequantized_codes(rng, name):
    cfg = CONFIGS[name]
    w = _x(rng, (256, 128))
    assert_same_bits(fake_quantize_weight(w, cfg), jq.dequantize_weight(_qweight(w, cfg)), "weight")
    # straight through with the absmax scales as constants: the mask of fake_quantize(code_dtype=e4m3)
    qw = _qweight(w, cfg)
    mask = jax.grad(lambda w: jnp.sum(jq.fake_quantize(w, qw.scale, granularity=qw.granularity, code_dtype=E4M3)))(w)
    dw = jax.grad(lambda w: jnp.sum(fake_quantize_weight(w, cfg) * w))(w)
    assert_same_bits(dw, w * mask + fake_quantize_weight(w, cfg), "weight STE")
    # only a row's (block's) largest |w| can fall out: amax * (1 / scale) may round above 448
    assert np.sum(np.asarray(mask) == 0) <= qw.scale.size
    x = _x(rng, (3, 5, 128))
    g = jq.PerToken() if cfg.block_size is None else jq.PerGroup(128)
    q, s, _ = jq.dynamic_quantize(x, granularity=g, dtype=E4M3)
    assert_same_bits(fake_quantize_activation(x, cfg), jq.dequantize(q, s, granularity=g), "activation")
    with pytest.raises(ValueError, match="learnable=True is for integer configs"):
        fake_quantize_weight(w, cfg, jnp.ones((256,)), learnable=True)
    with pytest.raises(ValueError, match=r"shape \(40, 128\).*N = 40") if cfg.block_size else _nothing():
        fake_quantize_weight(w[:40], cfg)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Automatic names; Dense / DenseGeneral / Einsum; a 10-wide head the blocks do not fit."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x))
        x = nn.DenseGeneral((2, 64))(x)
        x = nn.Einsum((2, 64, 128), "bhd,hdo->bo")(x)
        return nn.Dense(10)(nn.relu(x))


def _linen_manual(v, x, linear, head_fp8):
    """The MLP's forward with ``linear(x, W [N, K], bias)`` for every layer (the head: float unless ``head_fp8``)."""
    p = v["params"]
    h = jax.nn.relu(linear(x, p["Dense_0"]["kernel"].T, p["Dense_0"]["bias"]))
    dg = p["DenseGeneral_0"]
    h = linear(h, jnp.reshape(dg["kernel"], (128, 128)).T, jnp.reshape(dg["bias"], -1))
    h = linear(h, jnp.reshape(p["Einsum_0"]["kernel"], (128, 128)).T, p["Einsum_0"]["bias"])
    h = jax.nn.relu(h)
    w, b = p["Dense_1"]["kernel"].T, p["Dense_1"]["bias"]
    return linear(h, w, b) if head_fp8 else h @ w.T + b


@pytest.mark.parametrize("name", CONFIGS)
def test_linen_serving_and_training(rng, name):
    cfg = CONFIGS[name]
    x = _x(rng, (6, 128))
    model = MLP()
    v = model.init(jax.random.PRNGKey(0), x)
    head_fp8 = cfg.block_size is None

    served = quantize(model, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sv = quantize_variables(served, v, x)
    assert [("Dense_1" in str(w.message)) for w in caught] == ([] if head_fp8 else [True])
    assert set(sv["quantized"]) == {"Dense_0", "DenseGeneral_0", "Einsum_0"} | ({"Dense_1"} if head_fp8 else set())
    qw = _qweight(v["params"]["Dense_0"]["kernel"].T, cfg)
    assert_same_bits(sv["quantized"]["Dense_0"]["codes"], qw.codes, "codes")
    assert_same_bits(sv["quantized"]["Dense_0"]["w_scale"], qw.scale, "scales")
    serve = lambda x, w, b: jq.quantized_linear(x, _qweight(w, cfg), b)
    y = jax.jit(served.apply)(sv, x)
    assert_same_bits(y, _linen_manual(v, x, serve, head_fp8), "served forward")
    assert {r.path: r.quantization for r in summary(served, v, x).rows} == {
        "Dense_0": str(cfg), "DenseGeneral_0": str(cfg), "Einsum_0": str(cfg),
        "Dense_1": str(cfg) if head_fp8 else "float"}

    qat = quantize(model, cfg, mode="qat")
    with pytest.warns(QuantizationWarning, match="'Dense_1' stays float") if not head_fp8 else _nothing():
        qv = quantize_variables(qat, v, x)
    assert jax.tree_util.tree_structure(qv) == jax.tree_util.tree_structure(v)    # fp8 training adds no variables
    train = lambda x, w, b: jq.fp8_linear(x, w, b, recipe=cfg.fp8_recipe)
    assert_same_bits(qat.apply(qv, x), _linen_manual(v, x, train, head_fp8), "training forward")
    loss = lambda apply: lambda p: jnp.sum(apply(p) ** 2)
    g = jax.jit(jax.grad(loss(lambda p: qat.apply({"params": p}, x))))(v["params"])
    g_manual = jax.jit(jax.grad(loss(lambda p: _linen_manual({"params": p}, x, train, head_fp8))))(v["params"])
    jax.tree_util.tree_map(lambda a, b: assert_same_bits(a, b, "grad"), g, g_manual)

    served_t = quantize(qat)                       # serve what fp8 training computed
    sv_t = quantize_variables(served_t, qv, x)
    jax.tree_util.tree_map(lambda a, b: assert_same_bits(a, b, "variables"), sv_t, sv)
    assert_same_bits(served_t.apply(sv_t, x), qat.apply(qv, x), "served vs trained")


# ------------------------------------------------------------------------------------------
# checkpoints, GPTQ, sharding names
# ------------------------------------------------------------------------------------------
RULES = [Rule("attn/.*", FP8_BLOCK), Rule("tail", None), Rule(".*", FP8)]


def test_checkpoint_round_trip(rng, tmp_path):
    x = _x(rng)
    served = quantize(Block(rngs=nnx.Rngs(0)), RULES)
    y = served(x)
    save_checkpoint(tmp_path / "fp8", served)
    abstract = nnx.eval_shape(lambda: quantize(Block(rngs=nnx.Rngs(3)), RULES))
    assert abstract.attn.query.codes.get_value().dtype == E4M3
    model = restore_checkpoint(tmp_path / "fp8", abstract)
    assert_same_bits(model(x), y, "restored forward")
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model)), jax.tree_util.tree_leaves(nnx.state(served))):
        assert_same_bits(a, b, "leaf")
    other = nnx.eval_shape(lambda: quantize(Block(rngs=nnx.Rngs(0)), [Rule("tail", None), Rule(".*", FP8)]))
    with pytest.raises(ValueError, match=r"4 layer\(s\)[\s\S]*'attn/key': checkpoint LinearGeneral served "
                                         r"FP8-block128, model LinearGeneral served FP8"):
        restore_checkpoint(tmp_path / "fp8", other)
    # fp8 training checkpoints record the training layers
    qat = quantize(Block(rngs=nnx.Rngs(0)), RULES, mode="qat")
    save_checkpoint(tmp_path / "qat", qat)
    back = restore_checkpoint(tmp_path / "qat", nnx.eval_shape(lambda: quantize(Block(rngs=nnx.Rngs(5)), RULES,
                                                                                  mode="qat")))
    assert_same_bits(back(x), qat(x), "restored training model")
    with pytest.raises(ValueError, match="'up': checkpoint Linear qat FP8, model Linear served FP8"):
        restore_checkpoint(tmp_path / "qat", abstract)


def test_checkpoint_records_without_the_fp8_fields_still_load(rng, tmp_path):
    """A record written before QuantConfig had weight_dtype / block_size / recipe compares with their defaults."""
    served = quantize(nnx.Sequential(nnx.Linear(64, 32, rngs=nnx.Rngs(0))), W8A8)
    path = save_checkpoint(tmp_path / "old", served)
    meta = json.loads((path / "jaxquant.json").read_text())
    for rec in meta["layers"].values():
        for field in ("weight_dtype", "block_size", "recipe"):
            del rec["config"][field]
    (path / "jaxquant.json").write_text(json.dumps(meta))
    model = restore_checkpoint(path, nnx.eval_shape(lambda: quantize(nnx.Sequential(nnx.Linear(64, 32,
                                                                                     rngs=nnx.Rngs(1))), W8A8)))
    x = _x(rng, (3, 64))
    assert_same_bits(model(x), served(x), "forward")


def test_gptq_rounds_the_integer_layers_only(rng):
    """GPTQ rounds integer codes; an fp8 layer in the same call gets quantize_weight's codes."""
    x = _x(rng, (64, 128))
    seq = lambda: nnx.Sequential(nnx.Linear(128, 128, rngs=nnx.Rngs(0)), nnx.Linear(128, 128, rngs=nnx.Rngs(1)))
    rules = [Rule("layers/0", FP8), Rule(".*", W8A16)]
    model = seq()
    served = quantize(model, rules, calibration=GPTQ(lambda m, b: m(b), [x], jit=False))
    assert served.layers[0].config == FP8 and served.layers[1].config == W8A16
    assert_same_bits(served.layers[0].codes[...], _qweight(model.layers[0].kernel[...].T, FP8).codes, "fp8 codes")
    plain = jq.quantize_weight(model.layers[1].kernel[...].T)
    assert not np.array_equal(np.asarray(served.layers[1].codes[...]), np.asarray(plain.codes))   # GPTQ ran

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(128)(nn.Dense(128)(x))

    lin = quantize(Two(), [Rule("Dense_0", FP8), Rule(".*", W8A16)])
    v = Two().init(jax.random.PRNGKey(0), x)
    sv = quantize_variables(lin, v, x, calibration=GPTQ(lambda apply, b: apply(b), [x], jit=False))
    assert_same_bits(sv["quantized"]["Dense_0"]["codes"], _qweight(v["params"]["Dense_0"]["kernel"].T, FP8).codes,
                     "linen fp8 codes")


def test_sharding_names_of_fp8_scales():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    with nnx.use_eager_sharding(False):
        layer = nnx.Linear(256, 128, kernel_init=init, rngs=nnx.Rngs(0))
        names = lambda l, a: tuple(getattr(l, a).get_metadata()["out_sharding"])
        block = quantize(layer, FP8_BLOCK)
        assert names(block, "codes") == ("model", None) and names(block, "w_scale") == ("model", None)
        assert block.w_scale.get_value().shape == (1, 2)
        per_channel = quantize(layer, FP8)
        assert names(per_channel, "codes") == ("model", None) and names(per_channel, "w_scale") == ("model",)
