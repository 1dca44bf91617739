"""Serving benchmark: one jitted MiniLM forward (token ids -> pooled embeddings), float vs quantized.

The layer sections time one matmul at a time; this section times what a user of ``jaxquant.flax``
serves: the all-MiniLM-L6-v2 encoder of ``jaxquant.models.minilm`` (hidden 384, 6 layers, 12 heads,
intermediate 1536; 36 dense projections) quantized with the library's own ``jaxquant.flax.quantize``. So it
includes everything around the kernels: the launches of 36 small layers, the activation
quantization of W8A8, attention, LayerNorms, pooling.

What is timed, per variant and per batch ``(B, L)``: ``jax.jit`` of ``nnx.merge(graphdef,
state)(input_ids, attention_mask, token_type_ids)`` -> unit-norm embeddings ``[B, 384]``, with
the model state passed as an argument (not baked into the executable as constants), timed by
``harness.timeit`` (docs/performance.md's method: warm-up, n back-to-back calls, median of >= 5
repeats).
Every token is real (mask all ones). Inputs are not rotated: the dense weights are 42 MB in
float32 and 5-11 MB quantized, and the whole model (incl. the 47 MB embedding table, of which a
forward reads only B*L rows) is what a server keeps resident anyway. The host cost of passing
the state (a few hundred arrays) to the jitted call is part of each call, as in ``minilm.embed``;
at 1 x 128 tokens it can be a visible share of the time.

Variants (``act`` = the dtype of the activations flowing between layers):

* ``float32``: ``nnx.Linear`` float32 model, the baseline (``vs_float`` = its time / the variant's).
  On a GPU, XLA runs float32 matmuls at its default precision (TF32 on H100/H200) unless
  ``jax_default_matmul_precision`` says otherwise; the row records the setting.
* ``bfloat16``: the same weights cast to bfloat16, parameters and computation (softmax, LayerNorm
  statistics and pooling stay float32, see ``MiniLM``); ``vs_bf16`` = its time / the variant's.
* ``W8A8`` (int8 per-channel weights, dynamic per-token int8 activations: ``quantized_linear``),
  ``W8A16`` (int8 per-channel weights), ``W4A16-g128`` (int4, groups of 128: both
  ``weight_only_linear``), ``FP8`` and ``FP8-block128`` (e4m3 weights per channel / in 128 x 128
  blocks, dynamic e4m3 activations: ``quantized_linear``'s fp8 GEMM), each converted from the float32 model and from the bfloat16 model
  (``quantize(model, preset)``; absmax scales, no calibration data), so each runs with float32 and
  with bfloat16 activations. ``implementation("auto")``: the Pallas kernels on CUDA, the jnp
  reference on the CPU (``lowering`` in the row).

Weights are random (``MiniLM``'s own initialisation; the pretrained files are not needed): the
time of every op here does not depend on the values. ``cos_vs_float`` (mean cosine of the
variant's embeddings to the float32 ones on the timed batch) is a sanity check that the variant
computed the model (a broken kernel that is fast would show up), not an accuracy figure: random
weights are not the trained ones (the demo, ``examples/minilm_demo.py``, measures accuracy).

Reported per row: ``variant``, ``act``, ``batch``, ``seq``, ``ms``, ``tokens_per_s``,
``vs_float``, ``vs_bf16``, ``weight_bytes`` (``summary(model).bytes``: the dense layers' codes +
scales (+ zero points) + biases, or float weights + biases; what quantization shrinks),
``model_bytes`` (every array of the model state, embeddings and LayerNorms included),
``cos_vs_float``, ``device``, ``jax``, ``lowering``, ``matmul_precision``. A variant that fails to
build or compile gets a row with ``error`` (the other variants still run).

``--quick``: one batch of 1 x 16 tokens and short repeats (a CPU smoke run; numbers mean nothing).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from rich.table import Table

from jaxquant.bench.harness import Context, nbytes, timeit
from jaxquant.flax import FP8, FP8_BLOCK, W4A16, W8A8, W8A16, quantize, summary
from jaxquant.models.minilm import MiniLM, MiniLMConfig
from jaxquant.flax.config import QuantConfig

#: (batch, tokens per sequence) of the full run: one query, a small and a large serving batch.
SHAPES = [(1, 128), (32, 128), (256, 128)]
QUICK_SHAPES = [(1, 16)]

#: (name, preset) of the quantized variants; each is built with float32 and bfloat16 activations.
QUANTIZED = [("W8A8", W8A8), ("W8A16", W8A16), ("W4A16-g128", W4A16), ("FP8", FP8), ("FP8-block128", FP8_BLOCK)]

_ACTS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class _Variant:
    name: str
    act: str
    preset: QuantConfig | None
    model: nnx.Module | None = None
    error: str | None = None


def float_model(config: MiniLMConfig, seed: int = 0) -> MiniLM:
    """A float32 MiniLM with random weights (``MiniLM``'s own initialisers), built as
    ``load_minilm()`` builds it: ``nnx.Linear`` dense layers, float32 parameters and computation."""
    factory = functools.partial(nnx.Linear, dtype=jnp.float32, param_dtype=jnp.float32)
    return MiniLM(config, rngs=nnx.Rngs(seed), linear_factory=factory, dtype=jnp.float32,
                  param_dtype=jnp.float32)


def cast_model(model: MiniLM, dtype) -> MiniLM:
    """``model``'s weights cast to ``dtype``, in a model built for ``dtype`` as ``load_minilm(dtype)``
    builds it (abstract build, then the cast state: no second random initialisation)."""
    factory = functools.partial(nnx.Linear, dtype=dtype, param_dtype=dtype)
    out = nnx.eval_shape(lambda: MiniLM(model.config, rngs=nnx.Rngs(0), linear_factory=factory, dtype=dtype,
                                        param_dtype=dtype))
    state = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), nnx.state(model))
    nnx.update(out, state)
    return out


def forward_fn(model: nnx.Module):
    """``(jitted f, state)`` with ``f(state, ids, mask, types)`` = the model's pooled embeddings.

    split/merge rather than ``nnx.jit`` (the same choice as ``minilm.embed``): ``nnx.jit`` walks
    the module graph in Python on every call, which would be timed as part of the forward.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids, mask, types):
        return nnx.merge(graphdef, state)(ids, mask, types)

    return f, state


def inputs(config: MiniLMConfig, batch: int, seq: int, seed: int = 0):
    """Random token ids in ``[1, vocab)``, all-ones mask, zero token types, int32 ``[batch, seq]``."""
    ids = jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 1, config.vocab_size, jnp.int32)
    return ids, jnp.ones((batch, seq), jnp.int32), jnp.zeros((batch, seq), jnp.int32)


def _variants(config: MiniLMConfig, ctx: Context) -> list[_Variant]:
    """Build every variant's model: float32, bfloat16, then each preset converted from both."""
    ctx.say("serving: building the float32 MiniLM (random weights)")
    base = {"float32": float_model(config)}
    base["bfloat16"] = cast_model(base["float32"], jnp.bfloat16)
    out = [_Variant(act, act, None, base[act]) for act in _ACTS]
    for act in _ACTS:
        for name, preset in QUANTIZED:
            v = _Variant(name, act, preset)
            ctx.say(f"serving: converting to {name} ({act} activations)")
            try:
                v.model = quantize(base[act], preset, strict=True)   # a copy: the float model stays float
            except Exception as e:  # reported in the rows, the other variants still run
                v.error = f"quantize: {type(e).__name__}: {e}"[:300]
            out.append(v)
    return out


def run(ctx: Context, *, config: MiniLMConfig | None = None, shapes=None) -> list[dict]:
    """Time every variant on every ``(batch, seq)``; rows as the module docstring lists.

    ``config`` (default: all-MiniLM-L6-v2's) and ``shapes`` (default ``SHAPES``, ``QUICK_SHAPES``
    with ``ctx.quick``) are overrides for tests.
    """
    config = config or MiniLMConfig()
    shapes = shapes or (QUICK_SHAPES if ctx.quick else SHAPES)
    min_time = 0.01 if ctx.quick else 0.05
    lowering = "pallas" if ctx.platform in ("cuda", "gpu") else "reference"
    common = dict(section="serving", device=ctx.device, jax=jax.__version__, lowering=lowering,
                  matmul_precision=str(jax.config.jax_default_matmul_precision or "default"))
    variants = _variants(config, ctx)
    fns = {}
    for v in variants:
        if v.model is not None:
            fns[(v.name, v.act)] = forward_fn(v.model)
    rows = []
    for batch, seq in shapes:
        args = inputs(config, batch, seq)
        times, ref = {}, None
        for v in variants:
            row = dict(common, op=f"MiniLM {v.name}", variant=v.name, act=v.act, batch=batch, seq=seq,
                       shape=[batch, seq])
            if v.error is not None:
                rows.append(dict(row, error=v.error))
                continue
            ctx.say(f"serving: {v.name} ({v.act} acts) {batch}x{seq}")
            f, state = fns[(v.name, v.act)]
            try:
                t = timeit(f, [(state,) + args], repeats=ctx.repeats, min_time=min_time)
                emb = np.asarray(f(state, *args), np.float32)
            except Exception as e:  # a variant that does not compile is reported, not fatal
                rows.append(dict(row, error=f"{type(e).__name__}: {e}"[:300]))
                continue
            if v.name == "float32":
                ref = emb
            times[(v.name, v.act)] = t
            cos = None if ref is None else float(np.mean(np.sum(emb * ref, axis=-1)))
            row.update(ms=t * 1e3, tokens_per_s=batch * seq / t, weight_bytes=summary(v.model).bytes,
                       model_bytes=nbytes(jax.tree_util.tree_leaves(nnx.state(v.model))), cos_vs_float=cos)
            rows.append(row)
        tf, tb = times.get(("float32", "float32")), times.get(("bfloat16", "bfloat16"))
        for row in rows:
            if row.get("batch") == batch and row.get("seq") == seq and "ms" in row:
                t = times[(row["variant"], row["act"])]  # (not ms / 1e3: the baselines' ratios are exactly 1)
                row["vs_float"] = None if tf is None else tf / t
                row["vs_bf16"] = None if tb is None else tb / t
        for row in rows[-len(variants):]:
            ctx.say(format_row(row))
    return rows


# --------------------------------------------------------------------------------------------
# Printing (``python -m jaxquant.bench`` prints this section's rows with ``table``)
# --------------------------------------------------------------------------------------------
COLUMNS = ("variant", "act", "batch x seq", "ms", "tokens/s", "vs float32", "vs bf16", "weight MB",
           "model MB", "cos vs f32")


def _f(v, spec):
    return "" if v is None else format(v, spec)


def table_cells(r: dict) -> tuple[str, ...]:
    """One row of ``table`` (strings, in ``COLUMNS`` order)."""
    head = (r["variant"], r["act"], f"{r['batch']} x {r['seq']}")
    if "error" in r:
        return head + ("error: " + r["error"][:80],) + ("",) * (len(COLUMNS) - 4)
    return head + (_f(r["ms"], ".3f"), _f(r["tokens_per_s"], ",.0f"), _f(r.get("vs_float"), ".2f"),
                   _f(r.get("vs_bf16"), ".2f"), _f(r["weight_bytes"] / 1e6, ".2f"), _f(r["model_bytes"] / 1e6, ".1f"),
                   _f(r.get("cos_vs_float"), ".4f"))


def format_row(r: dict) -> str:
    """One line per row (progress output)."""
    return "= serving " + " ".join(f"{c}={v}" for c, v in zip(COLUMNS, table_cells(r)) if v)


def table(rows: list[dict], title: str):
    """A ``rich`` table of this section's rows."""
    t = Table(title=title)
    for c in COLUMNS:
        t.add_column(c)
    for r in rows:
        t.add_row(*table_cells(r))
    return t
