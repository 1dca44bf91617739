"""Diagnostic: is the chained per-layer time of a small decode layer bound by the host?

The session-9 profile (``diag_profile.py``) of 4096x4096 at M = 16 gave 25.6 us per layer for a
4-layer W8A8 chain but only 10.2 us of GPU kernels per layer (bf16: 19.8 us against 11.5 us).
If the host's dispatch of one jitted call is the bound, longer chains (distinct weights per layer)
bring the per-layer time down to the kernels' time; if the host cost is per kernel, they do not.
Usage (H100 / H200): ``PYTHONPATH=. python3 scripts/diag_chain_len.py OUT`` -> ``OUT/chain_len.json``.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.bench.harness import chain, timeit

LENGTHS = (4, 8, 16, 32)
SHAPES = ((4096, 4096), (8192, 8192))


def main(out):
    os.makedirs(out, exist_ok=True)
    rows = []
    for n, k in SHAPES:
        top = max(LENGTHS) if n * k <= 4096 * 4096 else 8
        ws = [(jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
              for i in range(top)]
        fmts = {"bf16": ws, "w8a8": [jq.quantize_weight(w, bits=8) for w in ws],
                "w4a16": [jq.quantize_weight(w, bits=4, group_size=128) for w in ws]}
        fns = {"bf16": lambda x, w: x @ w.T, "w8a8": jq.quantized_linear, "w4a16": jq.weight_only_linear}
        for m in (1, 16):
            xs = [jax.random.normal(jax.random.PRNGKey(100 + i), (m, k), jnp.bfloat16) for i in range(top)]
            for length in LENGTHS:
                if length > top:
                    continue
                row = dict(shape=[m, n, k], layers=length)
                for op, f in fns.items():
                    g = chain(f)
                    row[op + "_us"] = timeit(g, [(tuple(xs[:length]), *((w,) for w in fmts[op][:length]))]) / length * 1e6
                row["w8a8_vs_bf16"] = row["bf16_us"] / row["w8a8_us"]
                row["w4a16_vs_bf16"] = row["bf16_us"] / row["w4a16_us"]
                print({a: (round(v, 2) if isinstance(v, float) else v) for a, v in row.items()}, flush=True)
                rows.append(row)
                json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                          open(os.path.join(out, "chain_len.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
