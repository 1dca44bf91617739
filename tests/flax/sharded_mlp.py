"""A two-layer nnx MLP sharded Megatron style, float -> QAT -> serving, against one device.

Run by tests/flax/test_flax_sharding.py in a subprocess (the host-device count is fixed when jax
starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before the import)::

    python tests/flax/sharded_mlp.py 2x4 1x8

For each mesh ``(data, model)``: the first Linear is column parallel (kernel ``(None, "model")``,
bias ``("model",)``), the second row parallel (kernel ``("model", None)``). The float model is built
with its partitioning metadata only (no eager sharding); every step places its parameters with
``NamedSharding`` s from ``nnx.get_partition_spec`` and the input with rows over ``"data"``, runs
under ``jax.jit`` in the mesh, and runs the same jitted function on one device's copies. Checks
(an ``AssertionError`` names the first that fails; the script prints one JSON line per mesh):

* every quantized variable carries the partition spec mapped from its kernel;
* one optax SGD step of the QAT model (W8A8 with learnable scales): sharded and one-device
  parameters agree to float32 rounding of the reordered sums (the row-parallel layer sums over a
  sharded K);
* serving W8A8 (``quantize(qat)``): bit-exact with one device (int32 partial sums are exact; the
  per-token amax reduces exactly);
* serving W4A16-g128 (``quantize(model, rules)``): within twice the float32 error bound of the
  two-layer computation (each result is within it of the exact one), the one-device result and
  the sharded one differing only in the summation order.

The serving checks run the plain-jnp reference ops and the Pallas kernels (interpret mode), each
sharded, against the one-device reference result.

and reports the collective bytes of the compiled serving MLPs (informational).
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import jax
import jax.numpy as jnp
import optax
import jaxquant as jq
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxquant.core.weights import unpack_int4
from jaxquant.flax import W4A16, W8A8, QATLayer, QuantConfig, QuantizedLayer, quantize

D, H, TOKENS = 256, 1024, 16
U = 2.0**-24
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
#: "reference": the plain-jnp ops (XLA partitions them); "interpret": the Pallas kernels (interpret
#: mode), partitioned by the ops' own sharding rules where they have them, else gathered.
IMPLEMENTATIONS = ("reference", "interpret")
#: One-device results by step name (the model and data are the same for every mesh).
ONE_DEVICE: dict = {}
W8A8_LSQ = QuantConfig(weight_bits=8, activations="dynamic", learnable_scales=True)


class MLP(nnx.Module):
    def __init__(self, rngs):
        wp, init = nnx.with_partitioning, nnx.initializers.lecun_normal()
        self.up = nnx.Linear(D, H, kernel_init=wp(init, (None, "model")),
                             bias_init=wp(nnx.initializers.normal(0.1), ("model",)), rngs=rngs)
        self.down = nnx.Linear(H, D, kernel_init=wp(init, ("model", None)),
                               bias_init=wp(nnx.initializers.normal(0.1), (None,)), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of collective writes in a compiled module's text (``-start`` ops: their result)."""
    itemsize = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
    out = {c: 0 for c in COLLECTIVES}
    pattern = re.compile(r"=\s*(\S.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo.splitlines():
        m = pattern.search(line)
        if not m:
            continue
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1))
        if m.group(3):
            shapes = shapes[-1:]
        out[m.group(2)] += sum(itemsize.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
                               for t, dims in shapes)
    return out


def specs_of(model):
    return nnx.get_partition_spec(nnx.state(model))


def shard(mesh, model):
    """``(graphdef, state)`` of ``model`` with its state placed by its partition specs."""
    graphdef, state = nnx.split(model)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs_of(model))
    return graphdef, jax.device_put(state, shardings)


def one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


def check_specs(model, expect_up, expect_down):
    for name, expect in (("up", expect_up), ("down", expect_down)):
        layer = getattr(model, name)
        got = {k: tuple(v.get_value()) for k, v in nnx.to_flat_state(nnx.get_partition_spec(nnx.state(layer)))
               if k[-1] in expect}
        got = {k[-1]: v for k, v in got.items()}
        assert got == expect, f"{name}: partition specs {got}, expected {expect}"


def train_step(graphdef, state, x, y):
    """One SGD step of the QAT model on the squared error (returns the new state)."""
    params, rest = state.split(nnx.Param, ...)
    tx = optax.sgd(0.05)

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)

    grads = jax.grad(loss)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return nnx.merge_state(optax.apply_updates(params, updates), rest)


def forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def dequantized(layer: QuantizedLayer):
    """``W_hat [N, K]`` float64 and the bias of a served layer (numpy)."""
    qw = layer.qweight
    codes = qw.codes if qw.bits == 8 else unpack_int4(qw.codes, signed=qw.symmetric)
    codes = np.asarray(codes, np.float64)
    scale = np.asarray(qw.scale, np.float64)
    if qw.group_size is None:
        w = codes * scale[:, None]
    else:
        n, k = codes.shape
        w = (codes.reshape(n, k // qw.group_size, qw.group_size) * scale[:, :, None]).reshape(n, k)
    return w, np.asarray(layer.bias.get_value(), np.float64)


def weight_only_bound(model, x):
    """Float32 error bound of the served two-layer weight-only MLP against exact arithmetic."""
    w1, b1 = dequantized(model.up)
    w2, b2 = dequantized(model.down)
    x = np.asarray(x, np.float64)
    pre = x @ w1.T + b1
    e1 = (D + 2) * U * (np.abs(x) @ np.abs(w1).T) + U * np.abs(pre) + U * np.abs(b1)
    h = np.maximum(pre, 0)
    y = h @ w2.T + b2
    return ((H + 2) * U * ((np.abs(h) + e1) @ np.abs(w2).T) + (np.abs(e1) @ np.abs(w2).T) + U * np.abs(y)
            + U * np.abs(b2))


def run(mesh_shape):
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with nnx.use_eager_sharding(False):
        model = MLP(nnx.Rngs(0))
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (TOKENS, D), jnp.float32)
    target = jax.random.normal(ky, (TOKENS, D), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    report = {"mesh": "x".join(map(str, mesh_shape))}

    # QAT: one SGD step, sharded and on one device
    qat = quantize(model, W8A8_LSQ, mode="qat")
    assert isinstance(qat.up, QATLayer) and isinstance(qat.down, QATLayer)
    check_specs(qat, {"kernel": (None, "model"), "bias": ("model",), "w_scale": ("model",)},
                {"kernel": ("model", None), "bias": (None,), "w_scale": (None,)})
    graphdef, state = shard(mesh, qat)
    step = jax.jit(train_step)
    with jax.set_mesh(mesh):
        new_sharded = step(graphdef, state, xs, target)
    assert new_sharded["up"]["kernel"].get_value().sharding.spec == P(None, "model")
    if "qat" not in ONE_DEVICE:       # the same model and data on every mesh: computed once
        ONE_DEVICE["qat"] = step(graphdef, one_device(nnx.state(qat)), one_device(x), one_device(target))
    new_one = ONE_DEVICE["qat"]
    for (path, a), (_, b) in zip(nnx.to_flat_state(new_sharded), nnx.to_flat_state(new_one)):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        # float32 sums reordered across the K shards of the row-parallel layer: a few ulps of the
        # largest entry (the SGD step moves parameters by ~1e-3 of it)
        np.testing.assert_allclose(a, b, rtol=0, atol=64 * U * np.max(np.abs(b)) * np.sqrt(H),
                                   err_msg=f"QAT step {mesh_shape}: {path}")
    nnx.update(qat, one_device(new_one))

    servers = {"W8A8 (from QAT)": quantize(qat), "W4A16-g128 (PTQ)": quantize(model, W4A16)}
    check_specs(servers["W8A8 (from QAT)"], {"codes": ("model", None), "w_scale": ("model",)},
                {"codes": (None, "model"), "w_scale": (None,)})
    check_specs(servers["W4A16-g128 (PTQ)"], {"codes": ("model", None), "w_scale": ("model", None)},
                {"codes": (None, "model"), "w_scale": (None, "model")})
    fwd = jax.jit(forward)
    for name, served in servers.items():
        graphdef, state = shard(mesh, served)
        if name not in ONE_DEVICE:
            ONE_DEVICE[name] = np.asarray(fwd(graphdef, one_device(nnx.state(served)), one_device(x)))
        y_one = ONE_DEVICE[name]
        bound = None if name.startswith("W8A8") else 2 * weight_only_bound(served, x)
        weight_bytes = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(served)))
        report[name] = {"weight_bytes": int(weight_bytes)}
        for impl in IMPLEMENTATIONS:
            with jq.implementation(impl), jax.set_mesh(mesh):
                compiled = fwd.lower(graphdef, state, xs).compile()
                y_sharded = np.asarray(compiled(graphdef, state, xs))
            hlo = compiled.as_text()
            what = f"{name} {mesh_shape} {impl}: sharded vs one device"
            if bound is None:
                assert y_sharded.tobytes() == y_one.tobytes(), f"{what}: max diff {np.max(np.abs(y_sharded - y_one))}"
            else:
                assert np.all(np.abs(y_sharded.astype(np.float64) - y_one) <= bound), f"{what}: beyond the bound"
            report[name][impl] = {"collective_bytes": collective_bytes(hlo),
                                  "max_abs_diff": float(np.max(np.abs(y_sharded - y_one)))}
    return report


if __name__ == "__main__":
    assert len(jax.devices()) == 8, f"expected 8 host devices (XLA_FLAGS), got {jax.devices()}"
    for arg in sys.argv[1:]:
        print(json.dumps(run(tuple(int(s) for s in arg.split("x")))), flush=True)
