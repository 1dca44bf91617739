"""Flax (``flax.nnx``) side of jaxquant: layers, QAT and conversion to serving params.

``jaxquant.flax.minilm`` holds the float all-MiniLM-L6-v2 sentence encoder of the demo, whose
dense projections all come from one ``linear_factory`` so quantized layers can be swapped in.
"""

from jaxquant.flax.minilm import (
    MiniLM,
    MiniLMConfig,
    dense_layers,
    embed,
    load_bert_weights,
    load_minilm,
)

__all__ = [
    "MiniLM",
    "MiniLMConfig",
    "dense_layers",
    "embed",
    "load_bert_weights",
    "load_minilm",
]
