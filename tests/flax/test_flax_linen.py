"""quantize on unmodified linen models (automatic names): PTQ, QAT, serving, variables, errors naming the layer."""

import dataclasses
import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import linen as nn

import jaxquant as jq
from jaxquant.flax import (W4A16, W8A8, W8A16, Calibration, QuantConfig, QuantizationWarning, Rule,
                           fake_quantize_activation, quantize, quantize_variables, summary)
from tests.conftest import assert_same_bits

U = 2.0**-24
G32 = dataclasses.replace(W4A16, group_size=32)


class MLP(nn.Module):
    """Written without any quantization in mind: automatic names, Dense / DenseGeneral / Einsum."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64)(x))
        x = nn.DenseGeneral((4, 16))(x)
        x = nn.Einsum((4, 16, 32), "bhd,hdo->bo")(x)
        return nn.Dense(10)(nn.relu(x))


def _setup(rng):
    x = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
    return MLP(), MLP().init(jax.random.PRNGKey(0), x), x


@pytest.mark.parametrize("cfg", [W8A8, W8A16, G32], ids=["w8a8", "w8a16", "w4a16-g32"])
def test_ptq_auto_named_layers(rng, cfg):
    model, v, x = _setup(rng)
    served = quantize(model, cfg)
    sv = quantize_variables(served, v, x)
    assert set(sv["quantized"]) == {"Dense_0", "DenseGeneral_0", "Einsum_0", "Dense_1"}
    assert "kernel" not in sv["params"]["Dense_0"]
    # the Dense_0 codes are quantize_weight of the float kernel; DenseGeneral's kernel is reshaped to [N, K]
    qw = jq.quantize_weight(v["params"]["Dense_0"]["kernel"].T, bits=cfg.weight_bits, group_size=cfg.group_size)
    assert_same_bits(sv["quantized"]["Dense_0"]["codes"], qw.codes, "codes")
    kg = v["params"]["DenseGeneral_0"]["kernel"]
    qg = jq.quantize_weight(jnp.reshape(kg, (64, 64)).T, bits=cfg.weight_bits, group_size=cfg.group_size)
    assert_same_bits(sv["quantized"]["DenseGeneral_0"]["codes"], qg.codes, "DenseGeneral codes")
    y = jax.jit(served.apply)(sv, x)
    y_f = model.apply(v, x)
    tol = 0.05 if cfg.weight_bits == 8 else 0.4     # 4 random layers, int4 weights: a loose sanity bound
    assert y.shape == y_f.shape and np.abs(np.asarray(y - y_f)).max() < tol * np.abs(np.asarray(y_f)).max()
    s = summary(served, v, x)
    assert [r.path for r in s.rows] == ["Dense_0", "DenseGeneral_0", "Einsum_0", "Dense_1"]
    leaves = jax.tree_util.tree_leaves({"q": sv["quantized"], "p": sv["params"]})
    assert s.bytes == sum(a.size * a.dtype.itemsize for a in leaves)
    assert s.float_bytes == sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(v))
    assert summary(served, sv, x) == s      # from the serving variables too
    with pytest.raises(ValueError, match="serving variables already"):
        quantize_variables(served, sv, x)


@pytest.mark.parametrize("cfg", [W8A8, QuantConfig(activations="static", learnable_scales=True),
                                 dataclasses.replace(G32, weight_symmetric=False, learnable_scales=True)],
                         ids=["w8a8", "w8a8-static-lsq", "w4a16-g32-asym-lsq"])
def test_qat_then_serve(rng, cfg):
    model, v, x = _setup(rng)
    qat = quantize(model, [Rule("Dense_1", None), Rule(".*", cfg)], mode="qat")
    cal = Calibration(lambda apply, b: apply(b), [x]) if cfg.activations == "static" else None
    qv = quantize_variables(qat, v, x, calibration=cal)
    if cfg.learnable_scales:   # move the scales off their init, as training would
        qv["params"]["Dense_0"]["w_scale"] = qv["params"]["Dense_0"]["w_scale"] * 0.9
    # a few SGD steps through the QAT forward change the kernels (gradients flow)
    loss = lambda p: jnp.sum(qat.apply({**qv, "params": p}, x) ** 2)
    g = jax.grad(loss)(qv["params"])
    assert np.abs(np.asarray(g["Dense_0"]["kernel"])).sum() > 0
    served = quantize(qat)
    sv = quantize_variables(served, qv, x)
    assert "Dense_1" not in sv["quantized"] and "kernel" in sv["params"]["Dense_1"]
    y_qat, y_srv = np.asarray(qat.apply(qv, x), np.float64), np.asarray(served.apply(sv, x), np.float64)
    # Whole model: float32 rounding differences after the first layer can flip an activation code of
    # a later layer's dynamic quantization (one step = its scale), so the model-level check allows
    # a few code steps; the exact contract is the layer-by-layer bound below.
    assert np.abs(y_srv - y_qat).max() <= 0.05 * np.abs(y_qat).max()
    assert np.median(np.abs(y_srv - y_qat)) <= 1e-4 * np.abs(y_qat).max()
    # layer by layer, the Dense_0 bound of jaxquant.flax.layers
    p = qv["params"]["Dense_0"]
    q = sv["quantized"]["Dense_0"]
    qw = jq.QuantizedWeight(q["codes"], q["w_scale"], q.get("w_zero_point"), bits=cfg.weight_bits,
                            group_size=cfg.group_size, symmetric=cfg.weight_symmetric, shape=(64, 32))
    act = qv.get("quant_stats", {}).get("Dense_0", {}).get("act_scale")
    x_hat = np.asarray(fake_quantize_activation(x, cfg, act), np.float64)
    w_hat = np.asarray(jq.dequantize_weight(qw), np.float64)
    y_q = x_hat @ w_hat.T + np.asarray(p["bias"], np.float64)
    dense = quantize(nn.Dense(64), cfg, mode="qat")
    v1 = {"params": {k: p[k] for k in p}}
    if act is not None:
        v1["quant_stats"] = {"act_scale": act}
    y_q32 = np.asarray(dense.apply(v1, x), np.float64)
    bound = (34 * U * (np.abs(x_hat) @ np.abs(w_hat).T) + U * np.abs(y_q32) + U * np.abs(np.asarray(p["bias"])))
    s1 = {"params": {"bias": sv["params"]["Dense_0"]["bias"]}, "quantized": q}
    if act is not None:
        s1["quant_stats"] = {"act_scale": act}
    y_s = np.asarray(quantize(nn.Dense(64), cfg).apply(s1, x), np.float64)
    assert (np.abs(y_s - y_q32) <= bound + 1e-7 * np.abs(y_q)).all()


def test_errors_name_the_layer(rng):
    model, v, x = _setup(rng)
    served = quantize(model, W8A8)
    with pytest.raises(ValueError, match="'Dense_0'.*quantize_variables"):
        served.apply(v, x)
    lsq = quantize(model, dataclasses.replace(W8A8, learnable_scales=True), mode="qat")
    with pytest.raises(ValueError, match="'Dense_0'.*w_scale"):
        lsq.apply(v, x)
    qv = quantize_variables(lsq, v, x)
    broken = {"params": {**qv["params"], "Dense_0": {k: a for k, a in qv["params"]["Dense_0"].items()
                                                     if k != "w_scale"}}}
    with pytest.raises(ValueError, match="'Dense_0'.*w_scale.*QAT"):
        quantize_variables(quantize(lsq), broken, x)
    # K = 32 is not a multiple of 128: float with one warning per layer, or an error with strict
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w4 = quantize(model, W4A16)
        sv = quantize_variables(w4, v, x)
        w4.apply(sv, x)
    msgs = [str(w.message) for w in rec if issubclass(w.category, QuantizationWarning)]
    assert len(msgs) == 4 and "'Dense_0'" in msgs[0] and "group_size = 128" in msgs[0]
    with pytest.raises(ValueError, match="'Dense_0'.*strict"):
        quantize_variables(quantize(model, W4A16, strict=True), v, x)
    with pytest.raises(ValueError, match="calibration"):
        quantize(model, W8A8, calibration=Calibration(lambda a, b: a(b), [x]))


def test_dtype_kept(rng):
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.float32)
    for dtype, pdt, expect in ((jnp.bfloat16, jnp.bfloat16, jnp.bfloat16), (None, jnp.bfloat16, jnp.float32)):
        m = nn.Dense(16, dtype=dtype, param_dtype=pdt)
        v = m.init(jax.random.PRNGKey(0), x)
        assert m.apply(v, x).dtype == expect
        for mode in ("qat", "serve"):
            q = quantize(m, W8A8, mode=mode)
            assert q.apply(quantize_variables(q, v, x), x).dtype == expect, (mode, dtype, pdt)


def test_abstract_variables(rng):
    model, v, x = _setup(rng)
    served = quantize(model, W8A8)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), v)
    sv = quantize_variables(served, abstract, jax.ShapeDtypeStruct(x.shape, x.dtype))
    real = quantize_variables(served, v, x)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), sv) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), real)


def test_qat_config_without_a_kernel_stays_simulated(rng):
    """A layer trained as W4A8 (no integer kernel) is served as a QAT layer, with one warning."""
    model, v, x = _setup(rng)
    w4a8 = QuantConfig(weight_bits=4, group_size=32)
    qat = quantize(model, [Rule("Dense_0", w4a8), Rule(".*", W8A8)], mode="qat")
    qv = quantize_variables(qat, v, x)
    served = quantize(qat)
    with pytest.warns(QuantizationWarning, match="'Dense_0' stays a QAT layer"):
        sv = quantize_variables(served, qv, x)
    assert "Dense_0" not in sv["quantized"] and "kernel" in sv["params"]["Dense_0"]
    np.testing.assert_allclose(served.apply(sv, x), qat.apply(qv, x), rtol=1e-4, atol=1e-4)
    rows = {r.path: r for r in summary(served, sv, x).rows}
    assert rows["Dense_0"].state == "qat" and rows["Dense_1"].state == "served"
