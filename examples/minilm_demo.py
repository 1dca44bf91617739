"""all-MiniLM-L6-v2 quantized with jaxquant: W8A8, W8A16, W4A16-g128 vs float32, on a CPU in < 2 min.

For a fixed set of sentences prints, per variant: cosine similarity of each sentence embedding to
the float32 one (mean / min), whether each sentence's nearest neighbour (top 1), its top 3 and its
whole ranking of the other sentences by similarity are unchanged, the bytes of the dense layers' weights, and the time
per batch (median of 5 jitted calls after a warm-up). Targets: W8A8 mean cosine >= 0.995 with
unchanged nearest neighbours, W4A16-g128 >= 0.98.

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

from jaxquant.flax import (W4A16, W8A8, W8A16, embed, linear_weight_bytes, load_minilm, serving_factory)
from jaxquant.flax.minilm import _embed_jit, tokenize

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]

VARIANTS = [
    ("W8A8 (int8 per-channel, dynamic per-token int8 acts)", W8A8),
    ("W8A16 (int8 per-channel weights)", W8A16),
    ("W4A16-g128 (int4 groups of 128, symmetric absmax)", W4A16),
    ("W4A16-g128 (asymmetric, MSE clip search)", dataclasses.replace(W4A16, weight_symmetric=False,
                                                                      calibration="mse")),
]


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
    rows = [("float32", 1.0, 1.0, (True, True, True), linear_weight_bytes(model), time_batch(model, tok))]
    for name, cfg in VARIANTS:
        q, _ = load_minilm(linear_factory=serving_factory(cfg))
        e = np.asarray(embed(q, tok, SENTENCES))
        cos = np.sum(e * ref, axis=-1)
        r = rankings(e)
        same = (bool((r[:, 0] == ref_rank[:, 0]).all()), bool((r[:, :3] == ref_rank[:, :3]).all()),
                bool((r == ref_rank).all()))
        rows.append((name, float(cos.mean()), float(cos.min()), same, linear_weight_bytes(q), time_batch(q, tok)))
    print(f"{'variant':56s} {'cos mean':>9s} {'cos min':>9s} {'NN top1/top3/all same':>22s} {'weight bytes':>13s} "
          f"{'ms/batch':>9s}")
    for name, mean, mn, same, nbytes, t in rows:
        print(f"{name:56s} {mean:9.5f} {mn:9.5f} {'/'.join('yes' if v else 'no' for v in same):>22s} {nbytes:13,d} {t * 1e3:9.1f}")
    w8a8, w4 = rows[1], rows[3]
    print(f"targets: W8A8 mean cos >= 0.995 and NN ranking unchanged: "
          f"{'met' if w8a8[1] >= 0.995 and w8a8[3][0] else 'MISSED'}; W4A16-g128 mean cos >= 0.98: "
          f"{'met' if max(w4[1], rows[4][1]) >= 0.98 else 'MISSED'} (best {max(w4[1], rows[4][1]):.4f})")
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
