"""Checkpoints record each layer's config: round trip, mismatch errors naming the layer, restore into an
abstract (nnx.eval_shape) serving model, quantize on abstract parameters."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.flax import (W4A16, W8A8, W8A16, QuantizedLayer, Rule, quantize, restore_checkpoint,
                           save_checkpoint)
from tests.conftest import assert_same_bits

G32_ASYM = dataclasses.replace(W4A16, group_size=32, weight_symmetric=False)


class Block(nnx.Module):
    def __init__(self, *, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=64, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        return self.mlp(x + self.attn(x))


RULES = [Rule("attn/.*", W8A8), Rule(".*", G32_ASYM)]


def test_round_trip_into_an_abstract_model(rng, tmp_path):
    x = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    served = quantize(Block(rngs=nnx.Rngs(0)), RULES)
    y = served(x)
    save_checkpoint(tmp_path / "ckpt", served)
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path / "ckpt", served)
    # built abstractly: no float weights are materialised, no array is computed
    abstract = nnx.eval_shape(lambda: quantize(Block(rngs=nnx.Rngs(7)), RULES))
    assert isinstance(abstract.mlp, QuantizedLayer)
    assert isinstance(abstract.mlp.codes.get_value(), jax.ShapeDtypeStruct)
    model = restore_checkpoint(tmp_path / "ckpt", abstract)
    assert_same_bits(model(x), y, "restored forward")
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model)), jax.tree_util.tree_leaves(nnx.state(served))):
        assert_same_bits(a, b, "leaf")


def test_mismatched_configs_name_the_layer(tmp_path):
    served = quantize(Block(rngs=nnx.Rngs(0)), W8A8)
    save_checkpoint(tmp_path / "w8a8", served)
    # W8A16 has the same array shapes as W8A8 but other math: refused, per layer
    other = nnx.eval_shape(lambda: quantize(Block(rngs=nnx.Rngs(0)), [Rule("mlp", W8A16), Rule(".*", W8A8)]))
    with pytest.raises(ValueError, match=r"1 layer\(s\)[\s\S]*'mlp': checkpoint Linear served W8A8, model Linear "
                                         r"served W8A16"):
        restore_checkpoint(tmp_path / "w8a8", other)
    with pytest.raises(ValueError, match="'mlp'.*float"):
        restore_checkpoint(tmp_path / "w8a8", quantize(Block(rngs=nnx.Rngs(0)), [Rule("attn/.*", W8A8)]))
    with pytest.raises(FileNotFoundError):
        restore_checkpoint(tmp_path / "nothing", served)


def test_quantize_abstract_parameters():
    """A model whose variables are ShapeDtypeStruct (nnx.eval_shape) quantizes to abstract serving variables
    of the same shapes as the concrete conversion, for serving and QAT."""
    abstract = nnx.eval_shape(lambda: Block(rngs=nnx.Rngs(0)))
    concrete = Block(rngs=nnx.Rngs(0))
    for mode, rules in (("serve", RULES), ("qat", [Rule(".*", dataclasses.replace(W8A8, learnable_scales=True))])):
        a = nnx.state(quantize(abstract, rules, mode=mode))
        c = nnx.state(quantize(concrete, rules, mode=mode))
        shapes = lambda s: jax.tree_util.tree_map(lambda v: (tuple(v.shape), np.dtype(v.dtype)), s)
        assert shapes(a) == shapes(c)
        assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree_util.tree_leaves(a))
