"""A two-layer MLP sharded Megatron style over 8 CPU devices (layer 1 column parallel: W1 [H, D]
split over H; layer 2 row parallel: W2 [D, H] split over H), through QAT (one optax step under
jit) and serving (W8A8 and W4A16), against the same model on one device."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import jaxquant as jq
from conftest import assert_same_bits
from sharding_harness import h, impl  # noqa: F401  (fixtures)

M, D, H = 16, 128, 256
LAYOUT = {"w1": P("m", None), "b1": P("m"), "w2": P(None, "m"), "b2": P(None), "s1": P(), "s2": P()}


def _params(rng):
    return {"w1": jnp.asarray(rng.standard_normal((H, D)) / np.sqrt(D), jnp.float32),
            "b1": jnp.asarray(rng.standard_normal(H) * 0.1, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((D, H)) / np.sqrt(H), jnp.float32),
            "b2": jnp.asarray(rng.standard_normal(D) * 0.1, jnp.float32),
            "s1": jnp.float32(0.03), "s2": jnp.float32(0.02)}


def _fq_weight(w):
    """Per-output-channel int8 fake quantization of a weight [out, in] (straight-through)."""
    s, _ = jq.choose_qparams(jax.lax.stop_gradient(w), granularity=jq.PerChannel(0), qmin=-127, qmax=127)
    return jq.fake_quantize(w, s, granularity=jq.PerChannel(0), qmin=-127, qmax=127)


def _qat_forward(p, x):
    """Activations: LSQ (learned per-tensor scale); weights: per-channel fake quantization."""
    lsq = dict(granularity=jq.PerTensor(), qmin=-128, qmax=127)
    a = jq.fake_quantize_learnable(x, p["s1"], **lsq)
    hid = jax.nn.relu(a @ _fq_weight(p["w1"]).T + p["b1"])
    hid = jq.fake_quantize_learnable(hid, p["s2"], **lsq)
    return hid @ _fq_weight(p["w2"]).T + p["b2"]


def _qat_step(p, x, t):
    opt = optax.sgd(0.05)
    loss, g = jax.value_and_grad(lambda p: jnp.mean((_qat_forward(p, x) - t) ** 2))(p)
    upd, _ = opt.update(g, opt.init(p), p)
    return optax.apply_updates(p, upd), loss


def _put_params(h, p):
    return {k: h.put(v, *LAYOUT[k]) for k, v in p.items()}


def test_qat_step_matches_one_device(h, impl, rng):
    p, x, t = _params(rng), jnp.asarray(rng.standard_normal((M, D)), jnp.float32), jnp.asarray(
        rng.standard_normal((M, D)), jnp.float32)
    run = h.run(_qat_step, _put_params(h, p), h.put(x, None, None), h.put(t, None, None), impl=impl)
    (new, loss), (new1, loss1) = run.out, run.one
    for k in ("w1", "b1", "w2", "b2"):
        assert h.laid_out(new[k], LAYOUT[k]), k  # parameters keep their layout through the step
    # The model's own matmuls (plain jnp) sum over devices in a different order than one device,
    # so the step agrees to float32 rounding; the jaxquant ops in it are exact per shard.
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    for k in new:
        np.testing.assert_allclose(np.asarray(new[k]), np.asarray(new1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert run.collectives["all-gather"][1] <= 4 * (D + H), run.collectives  # no weight is gathered


def _serving(p, fmt):
    kw = dict(bits=8) if fmt == "w8a8" else dict(bits=4, group_size=32)
    return {"w1": jq.quantize_weight(p["w1"], **kw), "b1": p["b1"], "w2": jq.quantize_weight(p["w2"], **kw),
            "b2": p["b2"]}


def _serve(q, x, fmt):
    layer = jq.quantized_linear if fmt == "w8a8" else jq.weight_only_linear
    return layer(jax.nn.relu(layer(x, q["w1"], q["b1"])), q["w2"], q["b2"])


@pytest.mark.parametrize("fmt", ["w8a8", "w4a16"])
def test_serving_matches_one_device(h, impl, rng, fmt):
    q = _serving(_params(rng), fmt)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    # codes, scales and biases sharded like the float weights they replace
    qs = {"w1": h.put_weight(q["w1"], "m", None), "b1": h.put(q["b1"], "m"),
          "w2": h.put_weight(q["w2"], None, "m"), "b2": h.put(q["b2"], None)}
    run = h.run(lambda q, x: _serve(q, x, fmt), qs, h.put(x, None, None), impl=impl)
    assert run.collectives["all-gather"] == (0, 0), run.collectives  # no weight moves
    if fmt == "w8a8":
        assert_same_bits(run.out, run.one, "W8A8 MLP")
        # layer 2: the per-token amax (max) and the int32 accumulators [M, D] (sum)
        assert run.collectives["all-reduce"][1] <= 4 * M * D + 8 * M, run.collectives
    else:
        # layer 1 is local; layer 2 sums float32 partials over devices: within the weight-only
        # bound 2 (H + 2) u sum_k |h_k w_k| (docs/sharding.md)
        with jq.implementation(impl):
            hid = np.asarray(jax.jit(lambda q, x: jax.nn.relu(jq.weight_only_linear(x, q["w1"], q["b1"])))(q, x))
        w2 = np.asarray(jq.dequantize_weight(q["w2"], dtype=jnp.float32), np.float64)
        bound = 2 * (H + 2) * 2.0 ** -24 * (np.abs(hid) @ np.abs(w2).T) + 2.0 ** -23 * np.abs(np.asarray(run.one))
        err = np.abs(np.asarray(run.out, np.float64) - np.asarray(run.one, np.float64))
        assert (err <= bound).all(), err.max()
        assert run.collectives["all-reduce"] == (1, 4 * M * D), run.collectives
