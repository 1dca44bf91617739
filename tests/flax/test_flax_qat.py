"""QAT through quantize(mode="qat"): the nnx QATLayer and the linen interception compute the module
docstring's formula, STE / LSQ gradients, calibration (static activation scales, weight clip search)."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from jax.test_util import check_grads

import jaxquant as jq
from jaxquant.flax import (W4A8, W4A16, W8A8, W8A16, Calibration, QATLayer, QuantConfig, fake_quantize_activation,
                           fake_quantize_weight, quantize, quantize_variables, weight_qparams)
from tests.conftest import assert_same_bits


def qat_linear(k, n, *, config, rngs, param_dtype=jnp.float32, batches=None):
    """An nnx.Linear made a QAT layer by quantize (static activations calibrated on ``batches``)."""
    cal = None if batches is None else Calibration(lambda m, b: m(b), batches)
    layer = quantize(nnx.Sequential(nnx.Linear(k, n, param_dtype=param_dtype, rngs=rngs)), config, mode="qat",
                     calibration=cal).layers[0]
    assert isinstance(layer, QATLayer)
    return layer


def qat_dense(n, *, config, param_dtype=jnp.float32):
    """A linen nn.Dense made a QAT model by quantize."""
    return quantize(nn.Dense(n, param_dtype=param_dtype), config, mode="qat")

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
def test_qat_forward_nnx_and_linen(rng, name):
    cfg = CONFIGS[name]
    layer = qat_linear(64, 24, config=cfg, rngs=nnx.Rngs(0))
    layer.bias.set_value(jnp.asarray(rng.standard_normal(24), jnp.float32))
    x = _x(rng)
    y = jax.jit(lambda x: layer(x))(x)
    np.testing.assert_allclose(y, _manual(x, layer.kernel.get_value(), layer.bias.get_value(), cfg), rtol=1e-5, atol=1e-5)
    dense = qat_dense(24, config=cfg)
    params = {"params": {"kernel": layer.kernel.get_value(), "bias": layer.bias.get_value()}}
    assert_same_bits(dense.apply(params, x), layer(x), "linen QAT == nnx QAT")


def test_weight_quantizer_is_quantize_weight(rng):
    for cfg in (W8A8, dataclasses.replace(W4A16, group_size=32, weight_symmetric=False)):
        w = jnp.asarray(rng.standard_normal((24, 64)), jnp.float32)
        qw = jq.quantize_weight(w, bits=cfg.weight_bits, group_size=cfg.group_size, symmetric=cfg.weight_symmetric)
        assert_same_bits(fake_quantize_weight(w, cfg), jq.dequantize_weight(qw), "W_hat")


def test_ste_gradients(rng):
    cfg = W8A8
    layer = qat_linear(64, 16, config=cfg, rngs=nnx.Rngs(1))
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
    layer = qat_linear(32, 8, config=dataclasses.replace(W4A16, group_size=32), rngs=nnx.Rngs(2))
    x = _x(rng, (4, 3, 32))
    yv = jax.vmap(lambda xi: layer(xi))(x)
    np.testing.assert_allclose(yv, layer(x), rtol=1e-6, atol=1e-6)
    with jax.enable_x64(True):
        l64 = qat_linear(32, 8, config=dataclasses.replace(W4A16, group_size=32), param_dtype=jnp.float64,
                        rngs=nnx.Rngs(2))
        x64 = jnp.asarray(rng.standard_normal((3, 32)), jnp.float64)
        check_grads(lambda x: l64(x), (x64,), order=2, modes=["fwd", "rev"])  # linear in x (weight-only)


def test_learnable_scales_get_gradients(rng):
    cfg = dataclasses.replace(W4A16, group_size=32, weight_symmetric=False, learnable_scales=True)
    layer = qat_linear(64, 8, config=cfg, rngs=nnx.Rngs(3))
    x = _x(rng, (5, 64))
    # initialised by absmax calibration: same forward as the absmax layer
    ref = qat_linear(64, 8, config=dataclasses.replace(cfg, learnable_scales=False), rngs=nnx.Rngs(3))
    np.testing.assert_allclose(layer(x), ref(x), rtol=1e-6, atol=1e-6)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert g["w_scale"].get_value().shape == (8, 2) and g["w_zero_point"].get_value().shape == (8, 2)
    assert np.isfinite(g["w_scale"].get_value()).all() and np.abs(g["w_scale"].get_value()).sum() > 0


def test_static_activation_calibration(rng):
    cfg = QuantConfig(weight_bits=8, activations="static")
    batches = [_x(rng, (6, 16)) * (i + 1) for i in range(3)]
    float_model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    model = quantize(float_model, cfg, mode="qat", calibration=Calibration(lambda m, b: m(b), batches))
    amax = max(float(jnp.max(jnp.abs(b))) for b in batches)
    assert float(model.layers[0].act_scale.get_value()) == np.float32(max(np.float32(amax) * np.float32(1 / 127), 2**-126))
    # the second layer's scale comes from the float model's activations
    h = jnp.concatenate([float_model.layers[0](b) for b in batches])
    assert float(model.layers[1].act_scale.get_value()) == np.float32(jnp.max(jnp.abs(h)) * np.float32(1 / 127))
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
    with pytest.raises(ValueError, match="K = 60"):
        quantize(nnx.Linear(60, 8, rngs=nnx.Rngs(0)), dataclasses.replace(W4A16, group_size=32), mode="qat",
                 strict=True)
    assert W8A8.serving_kind == "w8a8" and W4A16.serving_kind == "weight_only" and W4A8.serving_kind == "fake"


# ------------------------------------------------------------------------------------------
# linen QAT (interception): every option of the nnx QAT layer
# ------------------------------------------------------------------------------------------
LINEN_CONFIGS = {
    "w8a8": W8A8,
    "w8a8-static": QuantConfig(weight_bits=8, activations="static"),
    "w4a16g32-asym-mse": dataclasses.replace(W4A16, group_size=32, weight_symmetric=False, calibration="mse"),
    "w8a8-lsq": dataclasses.replace(W8A8, learnable_scales=True),
    "w4a16g32-asym-lsq": dataclasses.replace(W4A16, group_size=32, weight_symmetric=False, learnable_scales=True,
                                             calibration="mse"),
    "w4a8-static-lsq": dataclasses.replace(W4A8, activations="static", learnable_scales=True, weight_symmetric=False),
}


def _linen_and_nnx(rng, cfg, x_batches):
    """A linen and an nnx QAT layer with the same kernel / bias / scales, static activations calibrated on
    ``x_batches`` by each framework's path through quantize."""
    kernel = jnp.asarray(rng.standard_normal((64, 24)) / 8, jnp.float32)
    bias = jnp.asarray(rng.standard_normal(24), jnp.float32)
    float_vars = {"params": {"kernel": kernel, "bias": bias}}
    dense = qat_dense(24, config=cfg)
    cal = Calibration(lambda apply, b: apply(b), x_batches)
    variables = quantize_variables(dense, float_vars, x_batches[0], calibration=cal)
    lin = nnx.Linear(64, 24, rngs=nnx.Rngs(0))
    lin.kernel.set_value(kernel)
    lin.bias.set_value(bias)
    layer = quantize(nnx.Sequential(lin), cfg, mode="qat", calibration=Calibration(lambda m, b: m(b), x_batches))
    layer = layer.layers[0]
    for name in ("w_scale", "w_zero_point"):
        if name in variables["params"]:
            assert_same_bits(variables["params"][name], getattr(layer, name).get_value(), f"init {name}")
    if cfg.activations == "static":
        assert_same_bits(variables["quant_stats"]["act_scale"], layer.act_scale.get_value(), "act_scale")
    return dense, variables, layer


@pytest.mark.parametrize("name", list(LINEN_CONFIGS))
def test_linen_qat_dense_matches_nnx(rng, name):
    """Forward and gradients (x, kernel, bias, learnable scales) of the linen QAT layer equal the nnx one's,
    under jit and vmap."""
    cfg = LINEN_CONFIGS[name]
    batches = [_x(rng, (6, 64)) * (i + 1) for i in range(2)]
    dense, variables, layer = _linen_and_nnx(rng, cfg, batches)
    x = _x(rng, (3, 5, 64))
    y = jax.jit(dense.apply)(variables, x)
    assert_same_bits(y, layer(x), "forward")
    np.testing.assert_allclose(jax.vmap(lambda xi: dense.apply(variables, xi))(x), y, rtol=1e-6, atol=1e-6)
    dy = _x(rng, (3, 5, 24))
    gp, gx = jax.jit(jax.grad(lambda p, x: jnp.sum(dense.apply({**variables, "params": p}, x) * dy),
                              argnums=(0, 1)))(variables["params"], x)
    gm, gx_nnx = nnx.grad(lambda m, x: jnp.sum(m(x) * dy), argnums=(0, 1))(layer, x)
    np.testing.assert_allclose(gx, gx_nnx, rtol=1e-5, atol=1e-5)
    for k in gp:
        np.testing.assert_allclose(gp[k], gm[k].get_value(), rtol=1e-5, atol=1e-5, err_msg=k)
    if cfg.learnable_scales:
        assert np.abs(np.asarray(gp["w_scale"])).sum() > 0
    # the fake-quantized forward differs from the float one (the quantizers are active)
    float_y = x @ variables["params"]["kernel"] + variables["params"]["bias"]
    assert not np.allclose(np.asarray(y), np.asarray(float_y), rtol=1e-6, atol=1e-6)


def test_linen_static_calibration(rng):
    cfg = QuantConfig(weight_bits=8, activations="static")

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(16, name="first")(x))
            return nn.Dense(4, name="second")(h)

    model = quantize(Two(), cfg, mode="qat")
    batches = [_x(rng, (6, 16)) * (i + 1) for i in range(3)]
    float_vars = Two().init(jax.random.PRNGKey(0), batches[0])
    with pytest.raises(ValueError, match="calibration"):
        quantize_variables(model, float_vars, batches[0])
    cal = quantize_variables(model, float_vars, batches[0], calibration=Calibration(lambda f, b: f(b), batches))
    amax = max(float(jnp.max(jnp.abs(b))) for b in batches)
    s0 = cal["quant_stats"]["first"]["act_scale"]
    assert float(s0) == np.float32(max(np.float32(amax) * np.float32(1 / 127), 2**-126))
    # the second layer saw the float outputs of the first
    p0 = float_vars["params"]["first"]
    h = jax.nn.relu(jnp.stack(batches) @ p0["kernel"] + p0["bias"])
    np.testing.assert_allclose(cal["quant_stats"]["second"]["act_scale"], jnp.max(jnp.abs(h)) / 127, rtol=1e-6)
    y1 = model.apply(cal, batches[0])
    assert not np.allclose(np.asarray(Two().apply(float_vars, batches[0])), np.asarray(y1))
    x_hat = fake_quantize_activation(batches[0], cfg, s0)
    assert len(np.unique(np.round(np.asarray(x_hat) / float(s0)))) <= 256


def test_linen_check_grads_float64(rng):
    """Weight-only configs are linear in x: check_grads (fwd and rev, order 2) in float64, absmax and LSQ."""
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float64)
        for cfg in (dataclasses.replace(W4A16, group_size=32),
                    dataclasses.replace(W4A16, group_size=32, weight_symmetric=False, learnable_scales=True)):
            dense = qat_dense(8, config=cfg, param_dtype=jnp.float64)
            v = dense.init(jax.random.PRNGKey(1), x)
            assert v["params"]["kernel"].dtype == jnp.float64
            check_grads(lambda x: dense.apply(v, x), (x,), order=2, modes=["fwd", "rev"])


def test_linen_learnable_scales_from_float_variables(rng):
    """quantize_variables initialises learnable scales from the given (e.g. pretrained) kernel."""
    cfg = dataclasses.replace(W4A16, group_size=32, weight_symmetric=False, learnable_scales=True)
    dense = qat_dense(8, config=cfg)
    x = _x(rng, (4, 64))
    new_kernel = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    float_vars = {"params": {"kernel": new_kernel, "bias": jnp.zeros((8,), jnp.float32)}}
    v = quantize_variables(dense, float_vars, x)
    s, z = weight_qparams(new_kernel.T, bits=4, group_size=32, symmetric=False)
    assert_same_bits(v["params"]["w_scale"], s, "scale")
    assert_same_bits(v["params"]["w_zero_point"], z.astype(jnp.float32), "zero point")
    # absmax-initialised learnable scales give the absmax layer's forward
    plain = qat_dense(8, config=dataclasses.replace(cfg, learnable_scales=False))
    np.testing.assert_allclose(dense.apply(v, x), plain.apply(float_vars, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="w_scale"):
        dense.apply(float_vars, x)
