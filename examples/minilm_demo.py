"""all-MiniLM-L6-v2 quantized with jaxquant: W8A8, W8A16, W4A16-g128, FP8 vs float32, on a CPU in < 2 min.

For a fixed set of sentences prints, per variant: cosine similarity of each sentence embedding to
the float32 one (mean / min), whether each sentence's nearest neighbour (top 1), its top 3 and its
whole ranking of the other sentences by similarity are unchanged, the bytes of the dense layers' weights, and the time
per batch (median of 5 jitted calls after a warm-up). Targets: W8A8 mean cosine >= 0.995 with
unchanged nearest neighbours, W4A16-g128 >= 0.98.

Every variant is ``jaxquant.flax.quantize(model, cfg)`` of the float model; those marked "+ GPTQ"
are ``quantize(model, cfg, calibration=GPTQ(run, batches))``:
same scales as the plain variant, weights rounded by GPTQ on the dense layers' inputs. The
calibration data is ``calibration_sentences.CALIBRATION_SENTENCES`` (200 sentences, disjoint from
the evaluation ``SENTENCES``, ``calibration_sentences.EVALUATION_SENTENCES`` — checked at start-up), padded positions masked out with
``calibration_mask``.

    python examples/minilm_demo.py
"""

import os
import time

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses

import numpy as np
import jax
from flax import nnx

from jaxquant.flax import FP8, FP8_BLOCK, GPTQ, W4A16, W8A8, W8A16, calibration_mask, quantize, summary
from jaxquant.models.minilm import embed, load_minilm
from jaxquant.models.minilm import _embed_jit, tokenize

from calibration_sentences import CALIBRATION_SENTENCES, EVALUATION_SENTENCES as SENTENCES

assert not set(SENTENCES) & set(CALIBRATION_SENTENCES), "calibration and evaluation sentences must differ"

W4A16_ASYM_MSE = dataclasses.replace(W4A16, weight_symmetric=False, calibration="mse")

# (name, config, GPTQ calibration?)
VARIANTS = [
    ("W8A8 (int8 per-channel, dynamic per-token int8 acts)", W8A8, False),
    ("W8A8 + GPTQ", W8A8, True),
    ("W8A16 (int8 per-channel weights)", W8A16, False),
    ("W8A16 + GPTQ", W8A16, True),
    ("W4A16-g128 (int4 groups of 128, symmetric absmax)", W4A16, False),
    ("W4A16-g128 (symmetric absmax) + GPTQ", W4A16, True),
    ("W4A16-g128 (asymmetric, MSE clip search)", W4A16_ASYM_MSE, False),
    ("W4A16-g128 (asymmetric, MSE clip) + GPTQ", W4A16_ASYM_MSE, True),
    ("W4A16-g128 (asymmetric, MSE clip) + GPTQ sequential", W4A16_ASYM_MSE, "sequential"),
    ("FP8 (e4m3 per-channel, dynamic per-token e4m3 acts)", FP8, False),
    ("FP8-block128 (e4m3 128x128 blocks, 1x128 e4m3 acts)", FP8_BLOCK, False),
]


def calibration_batches(tokenizer, batch_size=40):
    """The calibration sentences tokenised in batches (padding to a multiple of 16 keeps the number
    of compiled shapes small; ``run`` masks the padded positions out of the statistics)."""
    return [tokenize(tokenizer, CALIBRATION_SENTENCES[i:i + batch_size])
            for i in range(0, len(CALIBRATION_SENTENCES), batch_size)]


def run(model, batch):
    ids, mask, types = batch
    with calibration_mask(mask):
        model(ids, mask, types)


def time_batch(model, tokenizer, n=5):
    graphdef, state = nnx.split(model)
    ids, mask, types = tokenize(tokenizer, SENTENCES)
    _embed_jit(graphdef, state, ids, mask, types).block_until_ready()  # compile
    times = []
    for _ in range(n):
        t = time.perf_counter()
        _embed_jit(graphdef, state, ids, mask, types).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def rankings(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :-1]


def main():
    t0 = time.perf_counter()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {len(SENTENCES)} sentences")
    model, tok = load_minilm()
    ref = np.asarray(embed(model, tok, SENTENCES))
    ref_rank = rankings(ref)
    n = len(SENTENCES)
    rows = [("float32", 1.0, 1.0, (n, n, n), summary(model).bytes, time_batch(model, tok), 0.0)]
    batches = calibration_batches(tok)
    for name, cfg, gptq in VARIANTS:
        t = time.perf_counter()
        calibration = GPTQ(run, batches, sequential=gptq == "sequential") if gptq else None
        q = quantize(model, cfg, calibration=calibration)
        t_convert = time.perf_counter() - t
        e = np.asarray(embed(q, tok, SENTENCES))
        cos = np.sum(e * ref, axis=-1)
        r = rankings(e)
        same = (int((r[:, 0] == ref_rank[:, 0]).sum()), int((r[:, :3] == ref_rank[:, :3]).all(1).sum()),
                int((r == ref_rank).all(1).sum()))
        rows.append((name, float(cos.mean()), float(cos.min()), same, summary(q).bytes, time_batch(q, tok),
                     t_convert))
    print(f"calibration (GPTQ rows): {len(CALIBRATION_SENTENCES)} sentences disjoint from the {len(SENTENCES)} "
          f"evaluation sentences")
    sim = ref @ ref.T
    np.fill_diagonal(sim, -np.inf)
    top2 = -np.sort(-sim, axis=1)[:, :2]
    i = int(np.argmin(top2[:, 0] - top2[:, 1]))
    print(f"float32 ranking margin: sentence {i} ({SENTENCES[i]!r}) has its two nearest neighbours at cosine "
          f"{top2[i, 0]:.4f} / {top2[i, 1]:.4f}, so a quantized model can swap them")
    print(f"'same NN top1/top3/all': sentences (of {n}) whose nearest neighbour / top 3 / whole ranking is unchanged")
    print(f"{'variant':56s} {'cos mean':>9s} {'cos min':>9s} {'same NN top1/top3/all':>22s} {'weight bytes':>13s} "
          f"{'ms/batch':>9s} {'convert s':>9s}")
    for name, mean, mn, same, nbytes, t, tc in rows:
        print(f"{name:56s} {mean:9.5f} {mn:9.5f} {'/'.join(str(v) for v in same):>22s} {nbytes:13,d} "
              f"{t * 1e3:9.1f} {tc:9.1f}")
    w8a8 = rows[1]
    w4 = max((r for r in rows if r[0].startswith("W4A16")), key=lambda r: r[1])
    print(f"targets: W8A8 mean cos >= 0.995 and NN ranking unchanged: "
          f"{'met' if w8a8[1] >= 0.995 and w8a8[3][0] == n else 'MISSED'}; W4A16-g128 mean cos >= 0.98: "
          f"{'met' if w4[1] >= 0.98 else 'MISSED'} (best {w4[1]:.4f}: {w4[0]})")
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
