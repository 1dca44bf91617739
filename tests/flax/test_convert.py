"""Conversion to serving layers: equivalence with QAT (stated bound), MiniLM factory hook, checkpoints, bytes."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq
from jaxquant.flax import (W4A16, W8A8, W8A16, QATLinear, QuantConfig, QuantizedLinear, calibrate_activations,
                           convert, linear_weight_bytes, restore_checkpoint, save_checkpoint, serving_factory)
from tests.conftest import assert_same_bits

U = 2.0**-24


def _model(cfg, k=64, hidden=32, n=16, seed=0):
    return nnx.Sequential(QATLinear(k, hidden, config=cfg, rngs=nnx.Rngs(seed)),
                          QATLinear(hidden, n, config=cfg, rngs=nnx.Rngs(seed + 1)))


def _check_bound(layer_qat, layer_srv, x):
    """|y_srv - y_qat| <= (K + 2) u sum_k |x_hat_k||W_hat_nk| + u |y_qat| + u |b| (convert's docstring)."""
    c = layer_qat.config
    from jaxquant.flax.qat import fake_quantize_activation
    x_hat = fake_quantize_activation(x, c, layer_qat.act_scale[...] if c.activations == "static" else None)
    w_hat = layer_qat.quantized_weight()
    k = x.shape[-1]
    y_qat = np.asarray(layer_qat(x), np.float64)
    y_srv = np.asarray(layer_srv(x), np.float64)
    mag = np.abs(np.asarray(x_hat, np.float64)) @ np.abs(np.asarray(w_hat, np.float64)).T
    b = np.abs(np.asarray(layer_qat.bias[...], np.float64))
    bound = (k + 2) * U * mag + U * np.abs(y_qat) + U * b
    excess = np.abs(y_srv - y_qat) - bound
    assert (excess <= 0).all(), f"max excess {excess.max()} (max diff {np.abs(y_srv - y_qat).max()})"
    return np.abs(y_srv - y_qat).max()


CONFIGS = {
    "w8a8": W8A8,
    "w8a8-static": QuantConfig(weight_bits=8, activations="static"),
    "w8a16": W8A16,
    "w4a16-g32": dataclasses.replace(W4A16, group_size=32),
    "w4a16-g16-asym": dataclasses.replace(W4A16, group_size=16, weight_symmetric=False),
    "w4a16-g32-lsq": dataclasses.replace(W4A16, group_size=32, weight_symmetric=False, learnable_scales=True),
    "w8a8-lsq": dataclasses.replace(W8A8, learnable_scales=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_serving_equals_qat_within_bound(rng, name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    for layer in model.layers:
        layer.bias.set_value(jnp.asarray(rng.standard_normal(layer.out_features) * 0.1, jnp.float32))
    x = jnp.asarray(rng.standard_normal((5, 7, 64)), jnp.float32)
    if cfg.activations == "static":
        calibrate_activations(model, lambda m, b: m(b), [x])
    if cfg.learnable_scales:  # move the scales off their absmax init, as training would
        for layer in model.layers:
            layer.w_scale.set_value(layer.w_scale[...] * 0.9)
    qat_layers = [nnx.clone(l) for l in model.layers]
    hidden = model.layers[0](x)
    convert(model)
    assert all(isinstance(l, QuantizedLinear) for l in model.layers)
    # the serving weights are exactly the QAT layer's fake-quantized weights
    for q, s in zip(qat_layers, model.layers):
        assert_same_bits(jq.dequantize_weight(s.qweight), q.quantized_weight(), "W_hat")
    _check_bound(qat_layers[0], model.layers[0], x)
    _check_bound(qat_layers[1], model.layers[1], hidden)
    # under jit, grad (straight-through / dequantized weight) and vmap
    y = jax.jit(lambda x: model(x))(x)
    np.testing.assert_allclose(jax.vmap(lambda xi: model(xi))(x), y, rtol=1e-5, atol=1e-5)
    gx = jax.grad(lambda x: jnp.sum(model(x)))(x)
    assert gx.shape == x.shape and np.isfinite(np.asarray(gx)).all()


def test_convert_float_model_and_factory(rng):
    lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    model = nnx.Sequential(lin)
    w = np.asarray(lin.kernel[...]).T
    b = np.asarray(lin.bias[...])
    convert(model, W8A8)
    qw = jq.quantize_weight(jnp.asarray(w), bits=8)
    assert_same_bits(model.layers[0].codes[...], qw.codes, "codes")
    assert_same_bits(model.layers[0].w_scale[...], qw.scale, "scale")
    # the MiniLM linear_factory path: construct, then load_dense_weights quantizes at load
    layer = serving_factory(W4A16)(256, 32, rngs=nnx.Rngs(0))
    w2 = rng.standard_normal((32, 256)).astype(np.float32)
    layer.load_dense_weights(w2, np.zeros(32, np.float32))
    qw2 = jq.quantize_weight(jnp.asarray(w2), bits=4, group_size=128)
    assert_same_bits(layer.codes[...], qw2.codes, "int4 codes")
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    w_hat = np.asarray(jq.dequantize_weight(qw2))
    y, y_ref = np.asarray(layer(x)), np.asarray(x) @ w_hat.T
    # two float32 sums of 256 exact-ish products in different orders: |dy| <= 2 * K * u * sum|x||w_hat|
    bound = 2 * 256 * 2.0**-24 * (np.abs(np.asarray(x)) @ np.abs(w_hat).T) + 2.0**-24 * np.abs(y_ref)
    assert (np.abs(y - y_ref) <= bound).all(), f"max excess {(np.abs(y - y_ref) - bound).max()}"
    with pytest.raises(ValueError, match="no integer kernel"):
        QuantizedLinear(64, 8, config=QuantConfig(weight_bits=4, activations="dynamic"))


def test_weight_bytes():
    model = nnx.Sequential(nnx.Linear(256, 128, rngs=nnx.Rngs(0)))
    assert linear_weight_bytes(model) == 256 * 128 * 4 + 128 * 4
    convert(model, W4A16)
    # int4 codes: 0.5 byte per weight; one float32 scale per group of 128; float32 bias
    assert linear_weight_bytes(model) == 128 * 128 + 128 * 2 * 4 + 128 * 4
    m8 = convert(nnx.Sequential(nnx.Linear(256, 128, rngs=nnx.Rngs(0))), W8A8)
    assert linear_weight_bytes(m8) == 128 * 256 + 128 * 4 + 128 * 4


@pytest.mark.parametrize("backend", ["numpy", "orbax"])
def test_checkpoint_round_trip(rng, tmp_path, backend):
    if backend == "orbax":
        pytest.importorskip("orbax.checkpoint")
    cfg = dataclasses.replace(W4A16, group_size=32, weight_symmetric=False)
    model = _model(cfg)
    convert(model)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    y = model(x)
    used = save_checkpoint(tmp_path / "ckpt", model, backend=backend)
    assert used == backend
    fresh = convert(_model(cfg, seed=7))
    assert not np.array_equal(np.asarray(fresh(x)), np.asarray(y))
    restore_checkpoint(tmp_path / "ckpt", fresh, backend=backend)
    assert_same_bits(fresh(x), y, "restored forward")
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(fresh)), jax.tree_util.tree_leaves(nnx.state(model))):
        assert_same_bits(a, b, "leaf")


# ------------------------------------------------------------------------------------------
# linen: QATDense -> QuantizedDense through linen_serving_variables
# ------------------------------------------------------------------------------------------
from flax import linen as nn  # noqa: E402

from jaxquant.flax import (QATDense, QuantizedDense, calibrate_linen_activations,  # noqa: E402
                           fake_quantize_activation, fake_quantize_weight, linen_serving_variables)


class _MLP(nn.Module):
    config: QuantConfig
    dense: type = QATDense

    @nn.compact
    def __call__(self, x):
        h = self.dense(32, config=self.config, name="fc1")(x)
        return self.dense(16, config=self.config, name="fc2")(h)


LINEN_CONFIGS = {k: CONFIGS[k] for k in ("w8a8", "w8a8-static", "w8a16", "w4a16-g32-lsq")}


@pytest.mark.parametrize("name", list(LINEN_CONFIGS))
def test_linen_serving_equals_qat_within_bound(rng, name):
    cfg = LINEN_CONFIGS[name]
    x = jnp.asarray(rng.standard_normal((5, 7, 64)), jnp.float32)
    qat = _MLP(cfg)
    v = qat.init(jax.random.PRNGKey(0), x)
    params = jax.tree_util.tree_map(lambda a: a, dict(v["params"]))
    for layer in ("fc1", "fc2"):
        params[layer] = dict(params[layer])
        params[layer]["bias"] = jnp.asarray(rng.standard_normal(params[layer]["bias"].shape) * 0.1, jnp.float32)
        if cfg.learnable_scales:   # move the scales off their init, as training would
            params[layer]["w_scale"] = params[layer]["w_scale"] * 0.9
    v = {**v, "params": params}
    if cfg.activations == "static":
        v = calibrate_linen_activations(qat, v, [x])
    served = linen_serving_variables(v, cfg)
    assert "kernel" not in served["params"]["fc1"]
    srv = _MLP(cfg, dense=QuantizedDense)
    y_srv = jax.jit(srv.apply)(served, x)
    assert y_srv.shape == (5, 7, 16)
    # layer by layer: exact W_hat, and the convert() bound on the outputs
    h = x
    for layer in ("fc1", "fc2"):
        p = params[layer]
        w = p["kernel"].T
        if cfg.learnable_scales:
            w_hat = fake_quantize_weight(w, cfg, p["w_scale"], p.get("w_zero_point"), learnable=True)
        else:
            w_hat = fake_quantize_weight(w, cfg)
        q = served["quantized"][layer]
        qw = jq.QuantizedWeight(q["codes"], q["w_scale"], q.get("w_zero_point"), bits=cfg.weight_bits,
                                group_size=cfg.group_size, symmetric=cfg.weight_symmetric, shape=w.shape)
        assert_same_bits(jq.dequantize_weight(qw), w_hat, f"{layer} W_hat")
        act = v["quant_stats"][layer]["act_scale"] if cfg.activations == "static" else None
        k_vars = {"params": {"bias": served["params"][layer]["bias"]}, "quantized": q}
        if act is not None:
            k_vars["quant_stats"] = {"act_scale": act}
        y_l = np.asarray(QuantizedDense(w.shape[0], config=cfg).apply(k_vars, h), np.float64)
        qat_vars = {"params": p, **({"quant_stats": {"act_scale": act}} if act is not None else {})}
        y_q = np.asarray(QATDense(w.shape[0], config=cfg).apply(qat_vars, h), np.float64)
        x_hat = np.asarray(fake_quantize_activation(h, cfg, act), np.float64)
        mag = np.abs(x_hat) @ np.abs(np.asarray(w_hat, np.float64)).T
        bound = (h.shape[-1] + 2) * U * mag + U * np.abs(y_q) + U * np.abs(np.asarray(p["bias"], np.float64))
        excess = np.abs(y_l - y_q) - bound
        assert (excess <= 0).all(), f"{layer}: max excess {excess.max()}"
        h = QATDense(w.shape[0], config=cfg).apply(qat_vars, h)
    np.testing.assert_allclose(y_srv, qat.apply(v, x), rtol=1e-4, atol=1e-4)


def test_linen_serving_from_float_dense(rng):
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    dense = nn.Dense(32)
    v = dense.init(jax.random.PRNGKey(0), x)
    served = linen_serving_variables(v, W4A16, qat=False)
    qw = jq.quantize_weight(v["params"]["kernel"].T, bits=4, group_size=128)
    assert_same_bits(served["quantized"]["codes"], qw.codes, "int4 codes")
    y = QuantizedDense(32, config=W4A16).apply(served, x)
    np.testing.assert_allclose(y, x @ jq.dequantize_weight(qw).T + v["params"]["bias"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="static"):
        linen_serving_variables(v, QuantConfig(activations="static"), qat=False)
