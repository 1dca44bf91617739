"""The ``serving`` benchmark section (jaxquant/bench/serving.py) runs and reports complete rows.

A smoke test, not a performance test: quick mode on a small MiniLM (hidden 128 so that the W4A16
groups of 128 fit, one layer) and one 2 x 8 batch; every variant must produce a row with a
positive time, its sizes and a sane embedding (the numbers themselves mean nothing on a CPU).
"""

from __future__ import annotations

import pytest

pytest.importorskip("flax.nnx", reason="flax is needed: pip install 'jaxquant[flax]'")
pytest.importorskip("rich", reason="rich is needed: pip install 'jaxquant[bench]'")

from jaxquant.bench import harness, serving  # noqa: E402
from jaxquant.models.minilm import MiniLMConfig  # noqa: E402

SMALL = MiniLMConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=2, intermediate_size=256,
                     max_position_embeddings=16, type_vocab_size=2)

KEYS = {"section", "variant", "act", "batch", "seq", "shape", "ms", "tokens_per_s", "vs_float", "vs_bf16",
        "weight_bytes", "model_bytes", "cos_vs_float", "device", "jax", "lowering", "matmul_precision"}


def test_serving_quick_rows():
    ctx = harness.make_context(quick=True)
    rows = serving.run(ctx, config=SMALL, shapes=[(2, 8)])
    assert [r.get("error") for r in rows] == [None] * len(rows)
    variants = [(r["variant"], r["act"]) for r in rows]
    want = [("float32", "float32"), ("bfloat16", "bfloat16")]
    want += [(name, act) for act in ("float32", "bfloat16") for name, _ in serving.QUANTIZED]
    assert variants == want
    by = {v: r for v, r in zip(variants, rows)}
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["section"] == "serving" and (r["batch"], r["seq"]) == (2, 8)
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["vs_float"] > 0 and r["vs_bf16"] > 0
        assert r["device"] == ctx.device
        assert r["lowering"] == ("reference" if ctx.platform == "cpu" else "pallas")
        assert r["cos_vs_float"] > 0.9  # the variant computed the model (random weights: not accuracy)
    assert by[("float32", "float32")]["vs_float"] == 1.0 and by[("bfloat16", "bfloat16")]["vs_bf16"] == 1.0
    # Dense weights: float32 4 B, bfloat16 2 B, int8 1 B (+ scales), int4 0.5 B (+ group scales).
    wb = {v: by[v]["weight_bytes"] for v in want}
    assert wb[("float32", "float32")] == 2 * wb[("bfloat16", "bfloat16")]
    assert wb[("float32", "float32")] > wb[("W8A16", "float32")] > wb[("W4A16-g128", "float32")]
    # same codes and scales; a served layer keeps its float bias' dtype (bfloat16 from the bfloat16 model)
    assert wb[("W8A8", "float32")] == wb[("W8A16", "float32")] > wb[("W8A16", "bfloat16")]
    # The printed table has one line per row.
    assert serving.table(rows, "t").row_count == len(rows)
