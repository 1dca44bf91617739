"""GPTQ calibration (jaxquant/flax/gptq.py): the algorithm vs a float64 numpy oracle, error reduction on
data with outlier channels, RTN equivalence for a diagonal Hessian, input statistics / masks /
sequential groups, and quantize(..., calibration=GPTQ(...)) serving == the calibrated fake-quant forward."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq
from jaxquant.core import weights as Wm
from jaxquant.flax import (GPTQ, W4A8, W4A16, W8A8, W8A16, Calibration, QuantConfig, QuantizationWarning,
                           QuantizedLayer, calibration_mask, gptq_quantize_weight, layer_output_error, quantize,
                           weight_qparams)
from jaxquant.flax.gptq import gptq_calibrate, gptq_codes
from jaxquant.flax.layers import geometry_of, serving_weight as quantize_weight_with
from jaxquant.flax.observe import collect_input_stats
from tests.conftest import assert_same_bits

U = 2.0**-24
# one weight shape [16, 128] and group size 32 almost everywhere: each new shape / config compiles GPTQ again
G32 = dataclasses.replace(W4A16, group_size=32)
G32_ASYM_MSE = dataclasses.replace(W4A16, group_size=32, weight_symmetric=False, calibration="mse")


class _Source:
    """Correlated inputs [T, K] with 8 outlier channels (x20), one fixed distribution."""

    def __init__(self, rng, k=128, rank=32, outliers=8):
        self.k = k
        self.mix = rng.standard_normal((rank, k)) / 4
        self.idx = rng.choice(k, outliers, replace=False)

    def sample(self, rng, t):
        x = rng.standard_normal((t, self.mix.shape[0])) @ self.mix + 0.3 * rng.standard_normal((t, self.k))
        x[:, self.idx] *= 20
        return x.astype(np.float32)


def _rtn(w, cfg):
    s, z = weight_qparams(w, bits=cfg.weight_bits, group_size=cfg.group_size, symmetric=cfg.weight_symmetric,
                          method=cfg.calibration)
    return jq.dequantize_weight(quantize_weight_with(w, s, z, cfg))


def _numpy_gptq(w, h, scale, zp, cfg, damp=0.01, act_order=True):
    """Textbook GPTQ (one column at a time, no blocks) in float64, static per-group parameters."""
    qmin, qmax = cfg.weight_range
    n, k = w.shape
    g = k if cfg.group_size is None else cfg.group_size
    s_cols = np.repeat(np.asarray(scale, np.float64).reshape(n, -1), g, 1)
    z_cols = np.repeat(np.asarray(zp, np.float64).reshape(n, -1), g, 1)
    inv_cols = np.repeat((np.float32(1) / np.asarray(scale, np.float32)).reshape(n, -1), g, 1).astype(np.float64)
    w = np.asarray(w, np.float64).copy()
    h = np.asarray(h, np.float64).copy()
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h, s_cols, z_cols, inv_cols = w[:, perm], h[perm][:, perm], s_cols[:, perm], z_cols[:, perm], inv_cols[:, perm]
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros((n, k))
    for j in range(k):
        q[:, j] = np.clip(np.round(w[:, j] * inv_cols[:, j]) + z_cols[:, j], qmin, qmax)
        err = (w[:, j] - (q[:, j] - z_cols[:, j]) * s_cols[:, j]) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
    return q[:, np.argsort(perm)]


@pytest.mark.parametrize("cfg", [G32_ASYM_MSE, W8A16], ids=["w4g32-asym-mse", "w8-per-channel"])
def test_gptq_reduces_layer_output_error(rng, cfg):
    """On inputs with outlier channels GPTQ's output error is far below round-to-nearest with the same
    scales: on the calibration rows and on held-out rows of the same distribution."""
    src = _Source(rng)
    x, x_test = src.sample(rng, 400), src.sample(rng, 400)
    w = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    h = jnp.asarray(x.T @ x)
    qw = gptq_quantize_weight(w, h, cfg)
    w_gptq, w_rtn = jq.dequantize_weight(qw), _rtn(w, cfg)
    s, _ = weight_qparams(w, bits=cfg.weight_bits, group_size=cfg.group_size, symmetric=cfg.weight_symmetric,
                          method=cfg.calibration)
    assert_same_bits(qw.scale, s, "GPTQ keeps the plain scales")
    err = lambda a, xx: float(np.sum((xx @ (w - np.asarray(a)).T).astype(np.float64) ** 2))
    calib, held_out = err(w_gptq, x) / err(w_rtn, x), err(w_gptq, x_test) / err(w_rtn, x_test)
    print(f"\n{cfg}: GPTQ / RTN output error: calibration {calib:.3f}, held-out {held_out:.3f}")
    assert calib < 0.5 and held_out < 0.5
    # layer_output_error is the same quantity from the Hessian
    np.testing.assert_allclose(float(layer_output_error(w, w_gptq, h)), err(w_gptq, x), rtol=1e-3)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_matches_float64_oracle(rng, act_order):
    """Our float32 blocked GPTQ (block 48: a padded last block) picks the float64 textbook oracle's codes,
    for a well-conditioned H (cond ~ 25) and an ill-conditioned one (outlier channels, cond ~ 1e5).
    Measured: all codes equal in 110 of 110 seeded trials (this test found a damping computed on the
    padded Hessian, which changed ~7% of the codes); one row may differ for a float32 near-tie."""
    cfg = G32_ASYM_MSE
    w = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    s, z = weight_qparams(w, bits=4, group_size=32, symmetric=False, method="mse")
    deq = lambda q: (q - np.repeat(np.asarray(z), 32, 1)) * np.repeat(np.asarray(s), 32, 1)
    mix = np.eye(128) + rng.standard_normal((128, 128)) * 0.03
    for x in (rng.standard_normal((400, 128)) @ mix, _Source(rng).sample(rng, 300)):
        h = x.T.astype(np.float64) @ x
        ours = np.asarray(gptq_codes(w, jnp.asarray(h, jnp.float32), s, z, cfg, act_order=act_order, block_size=48))
        oracle = _numpy_gptq(w, h, s, z, cfg, act_order=act_order)
        rows = int((ours != oracle).any(axis=1).sum())
        e_ours, e_oracle = (float(layer_output_error(w, deq(c), h)) for c in (ours, oracle))
        print(f"\ncond(H) {np.linalg.cond(h):.3g}: {rows} of 16 rows differ from the float64 oracle, "
              f"output error ours / oracle {e_ours / e_oracle:.4f}")
        assert rows <= 1 and abs(e_ours / e_oracle - 1) < 0.02


def test_block_size_does_not_change_the_result(rng):
    """Lazy-batch blocks are an evaluation order only: the codes do not depend on the block size (up to
    float32 summation order), and neither does the damping (computed before padding)."""
    cfg = G32_ASYM_MSE
    x = _Source(rng).sample(rng, 300)   # ill-conditioned: sensitive to the damping
    w = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    h = jnp.asarray(x.T @ x, jnp.float32)
    ref = np.asarray(jq.dequantize_weight(gptq_quantize_weight(w, h, cfg, block_size=48)))   # 48: a padded last block
    for b in (1, 128):
        got = np.asarray(jq.dequantize_weight(gptq_quantize_weight(w, h, cfg, block_size=b)))
        # measured: identical codes in 60 of 60 seeded trials; a float32 near-tie flipped by the
        # summation order would change the rest of one row
        assert int((got != ref).any(axis=1).sum()) <= 1
        np.testing.assert_allclose(float(layer_output_error(w, got, h)), float(layer_output_error(w, ref, h)),
                                   rtol=0.02)


@pytest.mark.parametrize("cfg", [G32, G32_ASYM_MSE, W8A8], ids=["w4g32", "w4g32-asym-mse", "w8a8"])
def test_diagonal_hessian_is_round_to_nearest(rng, cfg):
    """With uncorrelated inputs (diagonal H) no error is passed on: GPTQ's codes are plain quantization's,
    bit for bit (jaxquant.quantize with the same scales), whatever the column order."""
    w = jnp.asarray(rng.standard_normal((16, 128)) * 0.05, jnp.float32)
    h = jnp.diag(jnp.asarray(rng.uniform(0.1, 5.0, 128), jnp.float32))
    s, z = weight_qparams(w, bits=cfg.weight_bits, group_size=cfg.group_size, symmetric=cfg.weight_symmetric,
                          method=cfg.calibration)
    plain = quantize_weight_with(w, s, z, cfg)
    for act_order in (True, False):
        qw = gptq_quantize_weight(w, h, cfg, act_order=act_order)
        assert_same_bits(qw.codes, plain.codes, "codes")
        assert_same_bits(qw.scale, plain.scale, "scale")


def test_dead_inputs_and_validation(rng):
    x = rng.standard_normal((200, 128)).astype(np.float32)
    x[:, 5] = 0.0  # an input that is always zero: H_55 = 0
    w = jnp.asarray(rng.standard_normal((16, 128)), jnp.float32)
    cfg = G32
    qw = gptq_quantize_weight(w, jnp.asarray(x.T @ x), cfg)
    assert np.isfinite(np.asarray(jq.dequantize_weight(qw))).all()
    # a Hessian of rank 1 (one sample): the damping keeps it invertible
    gptq_quantize_weight(w, jnp.asarray(np.outer(x[0], x[0])), cfg)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize_weight(w, jnp.eye(64), cfg)
    with pytest.raises(ValueError, match="damp"):
        GPTQ(lambda m, b: m(b), [x], damp=0.0)
    with pytest.raises(ValueError, match="batches"):
        GPTQ(lambda m, b: m(b), [])


# ------------------------------------------------------------------------------------------
# Input statistics, masks, sequential groups
# ------------------------------------------------------------------------------------------
class _Block(nnx.Module):
    """Two projections of the same input (like query/key), then a third on their sum."""

    def __init__(self, k=128, n=64, *, rngs):
        self.a = nnx.Linear(k, n, rngs=rngs)
        self.b = nnx.Linear(k, n, rngs=rngs)
        self.c = nnx.Linear(n, 16, rngs=rngs)

    def __call__(self, x):
        return self.c(jax.nn.gelu(self.a(x) + self.b(x)))


def _masked_run(model, batch):
    x, mask = batch
    with calibration_mask(mask):
        model(x)


def test_input_stats_and_mask(rng):
    model = _Block(rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((3, 10, 128)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, (3, 10)).astype(np.int32))
    mask = mask.at[0, 0].set(1)
    for jit in (True, False):
        stats = collect_input_stats(model, Calibration(_masked_run, [(x, mask)], jit=jit))
        rows = np.asarray(x)[np.asarray(mask) != 0]
        st = stats[("a",)]
        assert st.rows == rows.shape[0]
        np.testing.assert_allclose(np.asarray(st.hessian), rows.T @ rows / rows.shape[0], rtol=1e-5, atol=1e-6)
        assert float(st.amax) == float(np.max(np.abs(rows)))
        assert_same_bits(stats[("b",)].hessian, st.hessian, "same input, same statistics")
    assert isinstance(model.a, nnx.Linear)  # observers removed
    with pytest.raises(ValueError, match="calibration_mask"):
        collect_input_stats(model, Calibration(_masked_run, [(x, mask[:, :5])]))
    # without a mask every row counts
    stats = collect_input_stats(model, Calibration(lambda m, b: m(b), [x, x[:1]], jit=False))
    assert stats[("a",)].rows == 40


def test_sequential_sees_quantized_inputs(rng):
    """sequential=True: the last layer's statistics come from the GPTQ-quantized first layers (one
    group for the two layers that share an input), parallel: from the float model."""
    model = _Block(rngs=nnx.Rngs(1))
    x = jnp.asarray(rng.standard_normal((4, 16, 128)), jnp.float32)
    cfg = G32
    layers = [((p,), geometry_of(getattr(model, p)), cfg) for p in "abc"]
    calls = []
    run = lambda m, b: (calls.append(1), m(b))
    seq = gptq_calibrate(model, GPTQ(run, [x], sequential=True, jit=False), layers)
    # one calibration pass per group: (a, b) share their input, c is alone -> 2 passes
    assert len(calls) == 2
    par = gptq_calibrate(model, GPTQ(run, [x], jit=False), layers)
    assert len(calls) == 3
    assert isinstance(model.a, nnx.Linear) and isinstance(model.c, nnx.Linear)
    ka = model.a.kernel.get_value()
    x2 = np.asarray(x).reshape(-1, 128)

    def hidden(wa, wb):
        return np.asarray(jax.nn.gelu(x2 @ np.asarray(wa).T + model.a.bias[...] + x2 @ np.asarray(wb).T
                                      + model.b.bias[...]))

    h_float = hidden(ka.T, model.b.kernel.get_value().T)
    h_quant = hidden(jq.dequantize_weight(seq[("a",)][0]), jq.dequantize_weight(seq[("b",)][0]))
    np.testing.assert_allclose(np.asarray(par[("c",)][1].hessian), h_float.T @ h_float / 64, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(seq[("c",)][1].hessian), h_quant.T @ h_quant / 64, rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(seq[("c",)][1].hessian), np.asarray(par[("c",)][1].hessian), rtol=1e-3)
    # the first group (a, b) is identical in both modes
    assert_same_bits(seq[("a",)][0].codes, par[("a",)][0].codes, "first-group codes")
    assert_same_bits(model.a.kernel.get_value(), ka, "float kernel restored")


# ------------------------------------------------------------------------------------------
# quantize(..., calibration=GPTQ(...)): what is calibrated is what is served
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [G32_ASYM_MSE, W8A8, QuantConfig(weight_bits=8, activations="static")],
                         ids=["w4a16-g32-asym-mse", "w8a8", "w8a8-static"])
def test_quantize_with_gptq_serves_the_calibrated_weights(rng, cfg):
    src = _Source(rng)
    model = nnx.Sequential(nnx.Linear(128, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 16, rngs=nnx.Rngs(1)))
    for layer in model.layers:
        layer.bias.set_value(jnp.asarray(rng.standard_normal(layer.bias.get_value().shape) * 0.1, jnp.float32))
    batches = [jnp.asarray(src.sample(rng, 96).reshape(4, 24, 128)) for _ in range(2)]
    run = lambda m, b: m(b)
    float_layers = [nnx.clone(l) for l in model.layers]
    stats = collect_input_stats(model, Calibration(run, batches))
    model = quantize(model, cfg, calibration=GPTQ(run, batches))
    assert all(isinstance(l, QuantizedLayer) for l in model.layers)
    x = jnp.asarray(src.sample(rng, 20))
    for i, (fl, sl) in enumerate(zip(float_layers, model.layers)):
        st = stats[("layers", i)]
        expect = gptq_quantize_weight(fl.kernel.get_value().T, st.hessian, cfg)
        assert_same_bits(sl.qweight.codes, expect.codes, "served codes == GPTQ codes")
        assert_same_bits(sl.qweight.scale, expect.scale, "served scales")
        w_hat = np.asarray(jq.dequantize_weight(expect), np.float64)
        b = np.asarray(fl.bias.get_value(), np.float64)
        xin = np.asarray(x if i == 0 else model.layers[0](x))
        if cfg.activations == "static":
            amax = max(float(jnp.max(jnp.abs(bb))) for bb in batches) if i == 0 else float(st.amax)
            assert float(sl.act_scale.get_value()) == np.float32(np.float32(amax) * np.float32(1 / 127))
            sx = sl.act_scale.get_value()
            xin_hat = np.asarray(jq.fake_quantize(jnp.asarray(xin), sx, granularity=jq.PerTensor(), qmin=-128, qmax=127))
        elif cfg.activations == "dynamic":
            sx, _ = jq.choose_qparams(jnp.asarray(xin), granularity=jq.PerToken(), qmin=-128, qmax=127)
            xin_hat = np.asarray(jq.fake_quantize(jnp.asarray(xin), sx, granularity=jq.PerToken(), qmin=-128, qmax=127))
        else:
            xin_hat = xin
        # the calibrated fake-quant forward: x_hat @ W_hat^T + b, in float32
        y_fake = np.asarray(jnp.asarray(xin_hat) @ jnp.asarray(w_hat, jnp.float32).T + jnp.asarray(b, jnp.float32),
                            np.float64)
        y_srv = np.asarray(sl(jnp.asarray(xin)), np.float64)
        k = xin.shape[-1]
        mag = np.abs(np.asarray(xin_hat, np.float64)) @ np.abs(w_hat).T
        bound = (k + 2) * U * mag + U * np.abs(y_fake) + U * np.abs(b)   # convert's stated bound (x2 orders)
        excess = np.abs(y_srv - y_fake) - 2 * bound
        assert (excess <= 0).all(), f"layer {i}: max excess {excess.max()}"


def test_quantize_gptq_beats_plain_on_a_model(rng):
    """End to end on a 2-layer model with outlier input channels: the GPTQ-converted model's output error
    (vs float, held-out inputs) is below the plain-converted one's."""
    src = _Source(rng)
    make = lambda: nnx.Sequential(nnx.Linear(128, 64, rngs=nnx.Rngs(3)), nnx.Linear(64, 16, rngs=nnx.Rngs(4)))
    float_model = make()
    batches = [jnp.asarray(src.sample(rng, 400))]
    x = jnp.asarray(src.sample(rng, 256))
    y = np.asarray(float_model(x))
    cfg = G32_ASYM_MSE
    e_plain = np.sum((np.asarray(quantize(make(), cfg)(x)) - y) ** 2)
    e_gptq = np.sum((np.asarray(quantize(make(), cfg, calibration=GPTQ(lambda m, b: m(b), batches))(x)) - y) ** 2)
    e_seq = np.sum((np.asarray(quantize(make(), cfg, calibration=GPTQ(lambda m, b: m(b), batches,
                                                                       sequential=True))(x)) - y) ** 2)
    print(f"\nheld-out output error vs float: plain {e_plain:.4g}, GPTQ {e_gptq:.4g}, sequential {e_seq:.4g}")
    assert e_gptq < 0.5 * e_plain and e_seq < 0.5 * e_plain


def test_quantize_calibration_errors(rng):
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)
    with pytest.raises(ValueError, match="static"):
        quantize(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), QuantConfig(activations="static"))
    with pytest.raises(ValueError, match="not called"):
        quantize(_Block(rngs=nnx.Rngs(0)), W8A16, calibration=GPTQ(lambda m, b: m.a(b), [x]))
    # a config no kernel serves leaves the layers float (warned) before any calibration runs
    with pytest.warns(QuantizationWarning, match="no integer kernel"):
        quantize(_Block(rngs=nnx.Rngs(0)), W4A8, calibration=GPTQ(lambda m, b: 1 / 0, [x]))
    with pytest.raises(TypeError, match="GPTQ"):
        quantize(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), W8A16, calibration="gptq")
    with pytest.raises(ValueError, match="QAT"):
        quantize(nnx.Sequential(nnx.Linear(64, 8, rngs=nnx.Rngs(0))), W8A16, mode="qat",
                 calibration=GPTQ(lambda m, b: m(b), [x]))
