"""QAT layers (nnx QATLinear, dot_general in nnx.Linear / linen Dense, linen QATDense), calibration."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.test_util import check_grads

import jaxquant as jq
from jaxquant.flax import (W4A8, W4A16, W8A8, W8A16, QATDense, QATLinear, QuantConfig, calibrate_activations,
                           fake_quantize_activation, fake_quantize_weight, qat_dot_general, weight_qparams)
from tests.conftest import assert_same_bits

CONFIGS = {
    "w8a8": W8A8,
    "w8a16": W8A16,
    "w4a16g32": dataclasses.replace(W4A16, group_size=32),
    "w4a8asym": dataclasses.replace(W4A8, weight_symmetric=False),
}


def _x(rng, shape=(3, 5, 64)):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _manual(x, kernel, bias, cfg):
    """The module docstring's formula written with the public ops."""
    w = kernel.T
    qmin, qmax = cfg.weight_range
    gran = jq.PerChannel(0) if cfg.group_size is None else jq.PerGroup(cfg.group_size)
    s, z = jq.choose_qparams(w, granularity=gran, qmin=qmin, qmax=qmax, symmetric=cfg.weight_symmetric)
    w_hat = jq.fake_quantize(w, s, None if cfg.weight_symmetric else z, granularity=gran, qmin=qmin, qmax=qmax)
    if cfg.activations == "dynamic":
        sx, _ = jq.choose_qparams(x, granularity=jq.PerToken(), qmin=-128, qmax=127)
        x = jq.fake_quantize(x, sx, granularity=jq.PerToken(), qmin=-128, qmax=127)
    return jnp.einsum("...k,nk->...n", x, w_hat) + bias


@pytest.mark.parametrize("name", list(CONFIGS))
def test_qat_linear_forward_and_dot_general(rng, name):
    cfg = CONFIGS[name]
    layer = QATLinear(64, 24, config=cfg, rngs=nnx.Rngs(0))
    layer.bias.set_value(jnp.asarray(rng.standard_normal(24), jnp.float32))
    x = _x(rng)
    y = jax.jit(lambda x: layer(x))(x)
    np.testing.assert_allclose(y, _manual(x, layer.kernel.get_value(), layer.bias.get_value(), cfg), rtol=1e-5, atol=1e-5)
    if cfg.activations != "static":
        lin = nnx.Linear(64, 24, dot_general=qat_dot_general(cfg), rngs=nnx.Rngs(0))
        lin.kernel.set_value(layer.kernel.get_value())
        lin.bias.set_value(layer.bias.get_value())
        np.testing.assert_allclose(lin(x), y, rtol=1e-5, atol=1e-5)
        dense = nn.Dense(24, dot_general=qat_dot_general(cfg))
        params = {"params": {"kernel": layer.kernel.get_value(), "bias": layer.bias.get_value()}}
        np.testing.assert_allclose(dense.apply(params, x), y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(QATDense(24, config=cfg).apply(params, x), y, rtol=1e-5, atol=1e-5)


def test_weight_quantizer_is_quantize_weight(rng):
    for cfg in (W8A8, dataclasses.replace(W4A16, group_size=32, weight_symmetric=False)):
        w = jnp.asarray(rng.standard_normal((24, 64)), jnp.float32)
        qw = jq.quantize_weight(w, bits=cfg.weight_bits, group_size=cfg.group_size, symmetric=cfg.weight_symmetric)
        assert_same_bits(fake_quantize_weight(w, cfg), jq.dequantize_weight(qw), "W_hat")


def test_ste_gradients(rng):
    cfg = W8A8
    layer = QATLinear(64, 16, config=cfg, rngs=nnx.Rngs(1))
    x = _x(rng, (7, 64)) * 3
    dy = jnp.asarray(rng.standard_normal((7, 16)), jnp.float32)

    def loss(model, x):
        return jnp.sum(model(x) * dy)

    gm, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
    # STE: dx = (dy @ W_hat) * m_x (the per-token mask is all ones: absmax scales keep x in range)
    w_hat = fake_quantize_weight(layer.kernel.get_value().T, cfg)
    np.testing.assert_allclose(gx, dy @ w_hat, rtol=1e-5, atol=1e-5)
    sx, _ = jq.choose_qparams(x, granularity=jq.PerToken(), qmin=-128, qmax=127)
    x_hat = jq.fake_quantize(x, sx, granularity=jq.PerToken(), qmin=-128, qmax=127)
    np.testing.assert_allclose(gm["kernel"].get_value(), x_hat.T @ dy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gm["bias"].get_value(), dy.sum(0), rtol=1e-5, atol=1e-5)


def test_vmap_and_check_grads_float64(rng):
    layer = QATLinear(32, 8, config=dataclasses.replace(W4A16, group_size=16), rngs=nnx.Rngs(2))
    x = _x(rng, (4, 3, 32))
    yv = jax.vmap(lambda xi: layer(xi))(x)
    np.testing.assert_allclose(yv, layer(x), rtol=1e-6, atol=1e-6)
    with jax.enable_x64(True):
        l64 = QATLinear(32, 8, config=dataclasses.replace(W4A16, group_size=16), param_dtype=jnp.float64,
                        rngs=nnx.Rngs(2))
        x64 = jnp.asarray(rng.standard_normal((3, 32)), jnp.float64)
        check_grads(lambda x: l64(x), (x64,), order=2, modes=["fwd", "rev"])  # linear in x (weight-only)


def test_learnable_scales_get_gradients(rng):
    cfg = dataclasses.replace(W4A16, group_size=16, weight_symmetric=False, learnable_scales=True)
    layer = QATLinear(32, 8, config=cfg, rngs=nnx.Rngs(3))
    x = _x(rng, (5, 32))
    # initialised by absmax calibration: same forward as the absmax layer
    ref = QATLinear(32, 8, config=dataclasses.replace(cfg, learnable_scales=False), rngs=nnx.Rngs(3))
    np.testing.assert_allclose(layer(x), ref(x), rtol=1e-6, atol=1e-6)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert g["w_scale"].get_value().shape == (8, 2) and g["w_zero_point"].get_value().shape == (8, 2)
    assert np.isfinite(g["w_scale"].get_value()).all() and np.abs(g["w_scale"].get_value()).sum() > 0


def test_static_activation_calibration(rng):
    cfg = QuantConfig(weight_bits=8, activations="static")
    model = nnx.Sequential(QATLinear(16, 16, config=cfg, rngs=nnx.Rngs(0)), QATLinear(16, 4, config=cfg,
                                                                                       rngs=nnx.Rngs(1)))
    batches = [_x(rng, (6, 16)) * (i + 1) for i in range(3)]
    n = calibrate_activations(model, lambda m, b: m(b), batches)
    assert n == 2
    amax = max(float(jnp.max(jnp.abs(b))) for b in batches)
    assert float(model.layers[0].act_scale.get_value()) == np.float32(max(np.float32(amax) * np.float32(1 / 127), 2**-126))
    y = model(batches[0])
    assert np.isfinite(np.asarray(y)).all()
    x_hat = fake_quantize_activation(batches[0], cfg, model.layers[0].act_scale.get_value())
    assert len(np.unique(np.round(np.asarray(x_hat) / float(model.layers[0].act_scale.get_value())))) <= 256


def test_calibration_methods(rng):
    w = jnp.asarray(rng.standard_normal((16, 128)), jnp.float32)
    w = w.at[0, 0].set(12.0)  # an outlier
    for sym in (True, False):
        s_a, z_a = weight_qparams(w, bits=4, group_size=32, symmetric=sym, method="absmax")
        s_c, z_c = jq.choose_qparams(w, granularity=jq.PerGroup(32), qmin=-8 if sym else 0, qmax=7 if sym else 15,
                                     symmetric=sym)
        assert_same_bits(s_a, s_c, "absmax scale")
        assert_same_bits(z_a, z_c, "absmax zp")
        s_m, z_m = weight_qparams(w, bits=4, group_size=32, symmetric=sym, method="mse")
        s_p, _ = weight_qparams(w, bits=4, group_size=32, symmetric=sym, method="percentile", percentile=99.0)
        assert (s_p <= s_a * (1 + 1e-6)).all() and (s_m <= s_a * (1 + 1e-6)).all()
        cfg = QuantConfig(weight_bits=4, group_size=32, weight_symmetric=sym, activations=None)

        def err(s, z):
            fq = jq.fake_quantize(w, s, None if sym else z, granularity=jq.PerGroup(32), qmin=cfg.weight_range[0],
                                  qmax=cfg.weight_range[1])
            return jnp.sum((fq - w) ** 2, axis=1)

        # the search includes ratio 1.0 (absmax), so its per-group error is never larger
        assert float(jnp.sum(err(s_m, z_m))) <= float(jnp.sum(err(s_a, z_a))) * (1 + 1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="weight_bits"):
        QuantConfig(weight_bits=3)
    with pytest.raises(ValueError, match="activations"):
        QuantConfig(activations="per-token")
    with pytest.raises(ValueError, match="group_size"):
        QATLinear(60, 8, config=dataclasses.replace(W4A16, group_size=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stateless"):
        qat_dot_general(QuantConfig(activations="static"))
    assert W8A8.serving_kind == "w8a8" and W4A16.serving_kind == "weight_only" and W4A8.serving_kind == "fake"
