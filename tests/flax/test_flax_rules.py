"""quantize(model, rules) on nnx models: rules, skip warnings, attention / einsum layers, dtype kept,
QAT -> serve within the stated bound, calibration, config validation, summary."""

import dataclasses
import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq
from jaxquant.flax import (MIN_GROUP_SIZE, W4A16, W8A8, W8A16, Calibration, QATLayer, QuantConfig,
                           QuantizationWarning, QuantizedLayer, Rule, fake_quantize_activation, quantize, summary,
                           weight_qparams)
from jaxquant.flax.layers import geometry_of
from jaxquant.pallas.weight_only.triton import MIN_GROUP
from tests.conftest import assert_same_bits

U = 2.0**-24
G32 = dataclasses.replace(W4A16, group_size=32)


class Block(nnx.Module):
    """A transformer block as users write it: attention + MLP, plus an einsum projection."""

    def __init__(self, d=64, *, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=d, decode=False, **kw)
        self.up = nnx.Linear(d, 128, **kw)
        self.down = nnx.Linear(128, d, **kw)
        self.head = nnx.Einsum("btd,dh->bth", (d, 32), (32,), **kw)

    def __call__(self, x):
        x = x + self.attn(x)
        x = x + self.down(jax.nn.gelu(self.up(x)))
        return self.head(x)


def _x(rng, shape=(2, 5, 64)):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _kinds(model):
    return {"/".join(map(str, p)): type(n).__name__ for p, n in nnx.iter_graph(model)
            if isinstance(n, (QATLayer, QuantizedLayer, nnx.Linear, nnx.LinearGeneral, nnx.Einsum))}


def test_rules_first_match_regex_callable_and_float():
    model = Block(rngs=nnx.Rngs(0))
    rules = [Rule(r"attn/(query|key)", W8A16), Rule(r"attn/.*", W8A8), Rule(r"head", None),
             lambda path, m: G32 if isinstance(m, nnx.Linear) and path == "down" else None]
    served = quantize(model, rules)
    got = {"/".join(p): (n.config if isinstance(n, QuantizedLayer) else None) for p, n in nnx.iter_graph(served)
           if isinstance(n, (QuantizedLayer, nnx.Linear, nnx.LinearGeneral, nnx.Einsum))}
    assert got == {"attn/query": W8A16, "attn/key": W8A16, "attn/value": W8A8, "attn/out": W8A8, "down": G32,
                   "up": None, "head": None}
    # the input model is unchanged; a single QuantConfig means every layer
    assert all(t in ("Linear", "LinearGeneral", "Einsum") for t in _kinds(model).values())
    assert set(_kinds(quantize(model, W8A8)).values()) == {"QuantizedLayer"}
    # fullmatch: "up" does not match "u"
    assert _kinds(quantize(model, [Rule("u", W8A8)]))["up"] == "Linear"
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize(model, [lambda p, m: "int8"])
    with pytest.raises(ValueError, match="without rules"):
        quantize(model)
    with pytest.raises(ValueError, match="mode"):
        quantize(model, W8A8, mode="ptq")
    with pytest.raises(ValueError, match="needs rules"):
        quantize(model, mode="qat")
    with pytest.raises(TypeError, match="model"):
        quantize({"kernel": 1}, W8A8)


def test_layers_with_custom_math_stay_float():
    custom = nnx.Linear(64, 32, dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k), rngs=nnx.Rngs(0))
    with pytest.warns(QuantizationWarning, match="dot_general"):
        assert isinstance(quantize(nnx.Sequential(custom), W8A8).layers[0], nnx.Linear)


def test_skipped_layers_warn_once_each_and_strict_raises():
    model = Block(rngs=nnx.Rngs(0))      # every K is 64 except down (128)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        served = quantize(model, W4A16)  # groups of 128
    msgs = [str(w.message) for w in rec if issubclass(w.category, QuantizationWarning)]
    assert len(msgs) == 6 and all("K = 64 inputs is not a multiple of group_size = 128" in m for m in msgs)
    assert sorted(m.split("'")[1] for m in msgs) == ["attn/key", "attn/out", "attn/query", "attn/value", "head", "up"]
    assert _kinds(served)["down"] == "QuantizedLayer" and _kinds(served)["up"] == "Linear"
    with pytest.raises(ValueError, match=r"6 layer\(s\)[\s\S]*'attn/query'"):
        quantize(model, W4A16, strict=True)
    # a config no kernel serves: float in serving mode (warned), fine for QAT
    with pytest.warns(QuantizationWarning, match="no integer kernel"):
        quantize(model, [Rule("up", QuantConfig(weight_bits=4, group_size=32))])
    qat = quantize(model, [Rule("up", QuantConfig(weight_bits=4, group_size=32))], mode="qat")
    assert _kinds(qat)["up"] == "QATLayer"
    # ... and a QAT model trained with it cannot be served: the layer stays a (simulated) QAT layer
    with pytest.warns(QuantizationWarning, match="'up' stays a QAT layer.*no integer kernel"):
        assert _kinds(quantize(qat))["up"] == "QATLayer"


def test_einsum_that_is_not_a_matmul_stays_float():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.ok = nnx.Einsum("nta,hab->nthb", (4, 16, 8), (4, 8), rngs=rngs)
            self.batch = nnx.Einsum("bhd,hdo->bho", (4, 16, 8), rngs=rngs)

    with pytest.warns(QuantizationWarning, match="'batch'.*batch index"):
        q = quantize(M(nnx.Rngs(0)), W8A16)
    assert isinstance(q.ok, QuantizedLayer) and isinstance(q.batch, nnx.Einsum)
    g = q.ok.geometry
    assert (g.k, g.n) == (16, 32)


@pytest.mark.parametrize("cfg", [W8A16, G32], ids=["w8a16", "w4a16-g32"])
def test_attention_and_einsum_served_exactly(rng, cfg):
    """Each served layer computes x_rows @ W_hat^T (+ b) reshaped back, W_hat the QuantizedWeight of the
    kernel reshaped to [N, K] (weight-only: exact up to the summation order)."""
    model = Block(rngs=nnx.Rngs(1))
    served = quantize(model, cfg)
    x = _x(rng)
    for name in ("attn/query", "attn/out", "head", "up"):
        float_layer = dict(nnx.iter_graph(model))[tuple(name.split("/"))]
        layer = dict(nnx.iter_graph(served))[tuple(name.split("/"))]
        g = geometry_of(float_layer)
        w = g.weight(float_layer.kernel.get_value())
        qw = jq.quantize_weight(w, bits=cfg.weight_bits, group_size=cfg.group_size)
        assert_same_bits(layer.qweight.codes, qw.codes, f"{name} codes")
        xin = x if name != "attn/out" else jnp.reshape(x, (2, 5, 4, 16))
        w_hat = np.asarray(jq.dequantize_weight(qw), np.float64)
        rows = np.asarray(g.rows(xin)[0], np.float64)
        ref = rows @ w_hat.T + np.reshape(np.asarray(float_layer.bias.get_value(), np.float64), (-1,))
        y = np.reshape(np.asarray(layer(xin), np.float64), ref.shape) if name != "head" else \
            np.asarray(layer(xin), np.float64).reshape(ref.shape)
        bound = 2 * g.k * U * (np.abs(rows) @ np.abs(w_hat).T) + 2 * U * np.abs(ref)
        assert (np.abs(y - ref) <= bound).all(), name
    y, y_f = np.asarray(jax.jit(lambda m, x: m(x))(served, x)), np.asarray(model(x))
    assert y.shape == y_f.shape and np.abs(y - y_f).max() < 0.25 * np.abs(y_f).max()


class Layers(nnx.Module):
    """One layer of each kind, with a given dtype / param_dtype."""

    def __init__(self, *, rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear = nnx.Linear(64, 32, **kw)
        self.general = nnx.LinearGeneral(64, (2, 16), **kw)
        self.einsum = nnx.Einsum("btd,dh->bth", (64, 32), (32,), **kw)


@pytest.mark.parametrize("mode", ["float", "qat", "serve"])
def test_dtype_behaviour_is_kept(rng, mode):
    x = _x(rng, (1, 3, 64))
    for dtype, param_dtype, expect in ((jnp.bfloat16, jnp.bfloat16, jnp.bfloat16), (None, jnp.bfloat16, jnp.float32),
                                       (None, jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32, jnp.bfloat16)):
        model = Layers(rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
        if mode != "float":
            model = quantize(model, W8A8, mode=mode)
        for layer in (model.linear, model.general, model.einsum):
            y = layer(x)
            assert y.dtype == expect, (mode, dtype, param_dtype, type(layer).__name__, y.dtype)
        if mode == "serve":
            assert model.linear.bias.get_value().dtype == param_dtype    # the bias keeps its dtype


def _bound_check(qat_layer, served_layer, x):
    """|y_srv - y_qat| <= (K + 2) u sum_k |x_hat_k||W_hat_nk| + u |y_qat| + u |b| (jaxquant.flax.layers)."""
    c, g = qat_layer.config, qat_layer.geometry
    rows = g.rows(x)[0]
    act = None if qat_layer.act_scale is None else qat_layer.act_scale.get_value()
    x_hat = np.asarray(fake_quantize_activation(rows, c, act), np.float64)
    w_hat = np.asarray(qat_layer.quantized_weight(), np.float64)
    y_qat = np.asarray(qat_layer(x), np.float64).reshape(rows.shape[0], -1)
    y_srv = np.asarray(served_layer(x), np.float64).reshape(rows.shape[0], -1)
    b = np.abs(np.asarray(qat_layer.bias.get_value(), np.float64)).reshape(-1)
    bound = (g.k + 2) * U * (np.abs(x_hat) @ np.abs(w_hat).T) + U * np.abs(y_qat) + U * b
    excess = np.abs(y_srv - y_qat) - bound
    assert (excess <= 0).all(), f"max excess {excess.max()}"


QAT_CONFIGS = {
    "w8a8": W8A8,
    "w8a8-static": QuantConfig(activations="static"),
    "w8a8-lsq": dataclasses.replace(W8A8, learnable_scales=True),
    "w4a16-g32-asym-lsq": dataclasses.replace(G32, weight_symmetric=False, learnable_scales=True),
}


@pytest.mark.parametrize("name", list(QAT_CONFIGS))
def test_qat_then_serve_within_the_bound(rng, name):
    cfg = QAT_CONFIGS[name]
    model = Block(rngs=nnx.Rngs(2))
    x = _x(rng)
    cal = Calibration(lambda m, b: m(b), [x]) if cfg.activations == "static" else None
    qat = quantize(model, [Rule("head", None), Rule(".*", cfg)], mode="qat", calibration=cal)
    if cfg.learnable_scales:      # move the scales off their init, as training would
        qat.up.w_scale.set_value(qat.up.w_scale.get_value() * 0.9)
    served = quantize(qat)
    assert isinstance(served.head, nnx.Einsum) and served.up.config == cfg
    _bound_check(qat.up, served.up, x)
    _bound_check(qat.attn.out, served.attn.out, jnp.reshape(x, (2, 5, 4, 16)))
    assert_same_bits(jq.dequantize_weight(served.up.qweight), qat.up.quantized_weight(), "served W == QAT W_hat")
    # other rules on a QAT model: one warning per QAT layer, served as trained
    with pytest.warns(QuantizationWarning) as rec:
        again = quantize(qat, W8A16)
    assert len([w for w in rec if "trained with QAT" in str(w.message)]) == 6
    assert again.up.config == cfg and again.head.config == W8A16


def test_calibration_static_scales_and_clip_search(rng):
    model = Block(rngs=nnx.Rngs(3))
    batches = [_x(rng) * (i + 1) for i in range(2)]
    cfg = QuantConfig(activations="static", calibration="mse")
    served = quantize(model, [Rule("up", cfg)], calibration=Calibration(lambda m, b: m(b), batches))
    h = [b + model.attn(b) for b in batches]
    amax = max(float(jnp.max(jnp.abs(v))) for v in h)
    np.testing.assert_allclose(float(served.up.act_scale.get_value()), amax / 127, rtol=1e-6)
    s, _ = weight_qparams(model.up.kernel.get_value().T, method="mse")
    assert_same_bits(served.up.w_scale.get_value(), s, "MSE clip-search scales")
    with pytest.raises(ValueError, match="'up'"):
        quantize(model, [Rule("up", cfg)])


def test_config_validation():
    assert MIN_GROUP_SIZE == MIN_GROUP
    for bad in (dict(weight_bits=4, group_size=100), dict(weight_bits=4, group_size=16),
                dict(weight_bits=8, group_size=8), dict(group_size=True), dict(weight_bits=4, group_size=48)):
        with pytest.raises(ValueError, match="group_size"):
            QuantConfig(**bad)
    QuantConfig(weight_bits=8, group_size=16), QuantConfig(weight_bits=4, group_size=32)
    with pytest.raises(ValueError, match="percentile"):
        QuantConfig(percentile=0)
    with pytest.raises(ValueError, match="calibration"):
        QuantConfig(calibration="kl")
    with pytest.raises(TypeError, match="weight_symmetric"):
        QuantConfig(weight_symmetric=1)
    assert str(dataclasses.replace(W4A16, weight_symmetric=False, calibration="mse")) == "W4A16-g128-asym-mse"


def test_summary_rows_and_bytes():
    model = Block(rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationWarning)
        served = quantize(model, [Rule("attn/.*", W8A8), Rule(".*", W4A16)])
    s = summary(served)
    rows = {r.path: r for r in s.rows}
    assert set(rows) == {"attn/query", "attn/key", "attn/value", "attn/out", "up", "down", "head"}
    assert rows["attn/query"].bytes == 64 * 64 + 64 * 4 + 64 * 4 and rows["attn/query"].float_bytes == 64 * 64 * 4 + 256
    assert rows["down"].bytes == 128 * 64 // 2 + 64 * 4 + 64 * 4 and rows["down"].config == W4A16
    assert rows["up"].state == "float" and "K = 64" in rows["up"].note and rows["up"].bytes == rows["up"].float_bytes
    assert s.bytes == sum(r.bytes for r in s.rows) and s.float_bytes == summary(model).float_bytes
    text = str(s)
    assert "attn/out" in text and f"{s.bytes:,}" in text and "W4A16-g128" in text
    assert summary(model).bytes == summary(model).float_bytes


def test_served_model_under_jit_vmap_and_grad(rng):
    served = quantize(Block(rngs=nnx.Rngs(4)), [Rule("attn/.*", W8A8), Rule(".*", G32)])
    x = _x(rng)
    y = nnx.jit(lambda m, x: m(x))(served, x)
    np.testing.assert_allclose(jax.vmap(lambda xi: served(xi[None])[0])(x), y, rtol=1e-5, atol=1e-5)
    # gradients flow to the input (straight-through the activation quantizer) and the float biases
    gx = jax.grad(lambda x: jnp.sum(served(x)))(x)
    gm = nnx.grad(lambda m: jnp.sum(m(x)))(served)
    assert gx.shape == x.shape and np.isfinite(np.asarray(gx)).all() and np.abs(np.asarray(gx)).sum() > 0
    assert np.abs(np.asarray(gm["up"]["bias"].get_value())).sum() > 0
