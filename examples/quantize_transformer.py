"""Quantize an unmodified Flax transformer block (nnx) and an unmodified linen MLP with one call each.

Both models are written as plain Flax code, with no quantization in mind. The script takes them
through post-training quantization (W8A8 / W8A16 / W4A16-g128), quantization-aware training (a
few optax steps distilling the float model), serving, ``summary``, and an orbax checkpoint restored
into an abstract model (no float weights materialised), and prints the summary tables and, per
variant, the weight bytes and the agreement with the float model on held-out inputs (mean cosine
similarity of the output rows, relative L2 error). Runs in well under a minute on a CPU.

    python examples/quantize_transformer.py
"""

import os

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import pathlib
import tempfile
import time
import warnings

import numpy as np
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import linen as nn
from flax import nnx

from jaxquant.flax import (W4A16, W8A8, W8A16, QuantizationWarning, Rule, quantize, quantize_variables,
                           restore_checkpoint, save_checkpoint, summary)

D, HEADS, HIDDEN, SEQ = 128, 4, 512, 16


# -- the models, as anyone would write them ---------------------------------------------------
class Block(nnx.Module):
    def __init__(self, *, rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(HIDDEN)(x))
        x = nn.gelu(nn.Dense(HIDDEN)(x))
        return nn.Dense(D)(x)


# -- figures ---------------------------------------------------------------------------------
def agreement(y, ref):
    y, ref = np.asarray(y, np.float64).reshape(-1, D), np.asarray(ref, np.float64).reshape(-1, D)
    cos = np.sum(y * ref, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.mean()), float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def distill_nnx(qat, teacher, xs, steps=40):
    """A few Adam steps pulling the QAT model's outputs towards the float model's."""
    opt = nnx.Optimizer(qat, optax.adam(1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, g)
        return loss

    for i in range(steps):
        x = xs[i % len(xs)]
        step(qat, opt, x, teacher(x))
    return qat


def distill_linen(qat, params, teacher, xs, steps=40):
    tx = optax.adam(1e-4)
    state = tx.init(params["params"])

    @jax.jit
    def step(p, state, x, y):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((qat.apply({**params, "params": p}, x) - y) ** 2))(p)
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    p = params["params"]
    for i in range(steps):
        x = xs[i % len(xs)]
        p, state = step(p, state, x, teacher(x))
    return {**params, "params": p}


def main():
    t0 = time.perf_counter()
    warnings.simplefilter("ignore", QuantizationWarning)   # the summaries show which layers stay float and why
    key = jax.random.key(0)
    train = [jax.random.normal(k, (8, SEQ, D)) for k in jax.random.split(key, 4)]
    test = jax.random.normal(jax.random.key(1), (16, SEQ, D))
    presets = {"W8A8": W8A8, "W8A16": W8A16, "W4A16-g128": W4A16}
    rows = []

    # ---- nnx: PTQ, QAT, serving ------------------------------------------------------------
    block = Block(rngs=nnx.Rngs(0))
    fwd = nnx.jit(lambda m, x: m(x))
    ref = fwd(block, test)
    float_bytes = summary(block).float_bytes
    for name, cfg in presets.items():
        served = quantize(block, cfg)                                 # PTQ
        qat = distill_nnx(quantize(block, cfg, mode="qat"), lambda x: fwd(block, x), train)
        served_qat = quantize(qat)                                    # serve what QAT simulated
        for how, model in (("PTQ", served), ("QAT", served_qat)):
            rows.append(("nnx block", name, how, float_bytes, summary(model).bytes, *agreement(fwd(model, test), ref)))
        if name == "W4A16-g128":
            summary(served_qat).print("nnx transformer block, W4A16-g128 (served from QAT)")
    mixed = quantize(block, [Rule(r"attn/.*", W8A8), Rule(r".*", W4A16)])
    summary(mixed).print("nnx block, mixed rules: attention W8A8, MLP W4A16-g128")
    rows.append(("nnx block", "attn W8A8 + MLP W4A16", "PTQ", float_bytes, summary(mixed).bytes,
                 *agreement(fwd(mixed, test), ref)))

    # ---- checkpoint: save, restore into an abstract model (config-checked) -------------------
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(pathlib.Path(tmp) / "block-mixed", mixed)
        abstract = nnx.eval_shape(lambda: quantize(Block(rngs=nnx.Rngs(0)), [Rule(r"attn/.*", W8A8),
                                                                              Rule(r".*", W4A16)]))
        restored = restore_checkpoint(path, abstract)
        same = bool(jnp.array_equal(fwd(restored, test), fwd(mixed, test)))
        try:
            restore_checkpoint(path, nnx.eval_shape(lambda: quantize(Block(rngs=nnx.Rngs(0)), W8A16)))
            refused = "NOT refused"
        except ValueError as e:
            refused = " ".join(l.strip() for l in str(e).splitlines()[:2])
    print(f"\ncheckpoint restored into an abstract model: outputs identical: {same}; into a W8A16 model: {refused}")

    # ---- linen: the same rules on an unmodified module ---------------------------------------
    mlp = MLP()
    x0 = train[0]
    variables = mlp.init(jax.random.key(2), x0)
    lref = jax.jit(mlp.apply)(variables, test)
    teacher = jax.jit(lambda x: mlp.apply(variables, x))
    lin_float = summary(quantize(mlp, W8A8), variables, x0).float_bytes
    for name, cfg in presets.items():
        served = quantize(mlp, cfg)
        sv = quantize_variables(served, variables, x0)                # float variables -> serving variables
        qat = quantize(mlp, cfg, mode="qat")
        qv = distill_linen(qat, quantize_variables(qat, variables, x0), teacher, train)
        served_qat = quantize(qat)
        sqv = quantize_variables(served_qat, qv, x0)                  # QAT variables -> serving variables
        for how, m, v in (("PTQ", served, sv), ("QAT", served_qat, sqv)):
            nbytes = summary(m, variables if how == "PTQ" else qv, x0).bytes
            rows.append(("linen MLP", name, how, lin_float, nbytes, *agreement(jax.jit(m.apply)(v, test), lref)))
        if name == "W4A16-g128":
            summary(served, variables, x0).print("linen MLP (auto-named layers), W4A16-g128")
            with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as ckpt:
                ckpt.save(pathlib.Path(tmp) / "mlp", sv)
                target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sv)
                back = ckpt.restore(pathlib.Path(tmp) / "mlp", target)
            same = bool(jnp.array_equal(served.apply(back, test), served.apply(sv, test)))
            print(f"linen serving variables saved and restored with orbax: outputs identical: {same}")

    print(f"\n{'model':10s} {'config':22s} {'how':4s} {'float bytes':>12s} {'bytes':>9s} {'ratio':>6s} "
          f"{'cos mean':>9s} {'rel err':>8s}")
    for model, name, how, fb, qb, cos, err in rows:
        print(f"{model:10s} {name:22s} {how:4s} {fb:12,d} {qb:9,d} {qb / fb:6.3f} {cos:9.5f} {err:8.4f}")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
