"""Tile sweep of weight_only_linear at mid M (GPU): the Triton tile the heuristics pick against
Mosaic GPU tiles (``jaxquant.pallas.weight_only_mgpu``), chains of layers in one jit (bench method).

    PYTHONPATH=. python3 scripts/diag_wo_mgpu.py OUT [mid|pc|wide|wide2]

``wide`` (session 8): group-wise 64 x 256 tiles whose partial sums span part_m = 128 / 64 of the 256
x rows, against the 64 x 128 tile of the heuristics, at M = 512..8192; each variant is first checked
against the float64 dequantize-then-matmul on 64 rows (the test suite's float32 bound). ``wide2``:
that tile's launch order (grid_tile_width) and epilogue store width (epi_m) at M = 2048 / 8192.
"""
import json
import os
import sys

import numpy as np
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.bench.harness import CHAIN_LAYERS, chain, timeit
from jaxquant.pallas import weight_only as K
from jaxquant.pallas import weight_only_mgpu as WM

CONFIGS = [None, WM.Config(tile_m=64), WM.Config(tile_m=128)]
# second pass (``pc``): per-channel at M = 512 / 1024, the Triton tile against 64 x 128 and 64 x 256
PC_CONFIGS = ["triton", WM.Config(tile_m=128), WM.Config(tile_m=256, stages=2)]
WIDE_CONFIGS = [None, WM.Config(tile_m=256, part_m=128, stages=2), WM.Config(tile_m=256, part_m=64, stages=2),
                WM.Config(tile_m=128, part_m=64)]
_W = dict(tile_m=256, part_m=128, stages=2)
WIDE2_CONFIGS = [WM.Config(**_W), WM.Config(**_W, grid_tile_width=4), WM.Config(**_W, grid_tile_width=16),
                 WM.Config(**_W, epi_m=64)]


def _worst_vs_bound(f, x, qw):
    """max |y - ref| / bound over x's first 64 rows (float64 reference; the tests' float32 bound)."""
    y = np.asarray(f(x, qw), np.float64)[:64]
    xr = np.asarray(x[:64], np.float64)
    w = np.asarray(jq.dequantize_weight(qw), np.float64)
    ref = xr @ w.T
    mag = np.abs(xr) @ np.abs(w).T
    k = x.shape[1]
    bound = 2 * (k + 2) * 2.0**-24 * mag + 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)
    return float((np.abs(y - ref) / bound).max())


def main(out, mode="mid"):
    os.makedirs(out, exist_ok=True)
    rows = []
    variants, ms, configs = ((4, 128), (4, None)), (64, 128, 256, 512), CONFIGS
    shapes = [(8192, 8192), (4096, 14336)]
    if mode == "pc":
        variants, ms, configs = ((4, None), (8, None)), (512, 1024), PC_CONFIGS
    if mode in ("wide", "wide2"):
        variants, ms, configs = ((4, 128),), (512, 2048, 8192), WIDE_CONFIGS
        shapes = [(8192, 8192), (4096, 14336), (14336, 4096)]
    if mode == "wide2":
        ms, configs = (2048, 8192), WIDE2_CONFIGS
    for (n, k) in shapes:
        for bits, group in variants:
            key = jax.random.PRNGKey(0)
            ws = [(jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
                  for i in range(CHAIN_LAYERS)]
            qws = [jq.quantize_weight(w, bits=bits, group_size=group) for w in ws]
            for m in ms:
                xs = tuple(jax.random.normal(jax.random.PRNGKey(100 + i), (m, k), jnp.bfloat16)
                           for i in range(CHAIN_LAYERS))
                tb = timeit(chain(jax.jit(lambda x, w: x @ w.T)), [(xs, *((w,) for w in ws))]) / CHAIN_LAYERS
                for cfg in configs:
                    if cfg == "triton":
                        cfg = K.heuristics(m, n, k, bits, group)
                    tag = None if cfg is None else cfg.tag() + (f"/w{cfg.grid_tile_width}/e{cfg.epi_m}" if mode == "wide2" else "")
                    row = dict(shape=[m, n, k], bits=bits, group=group, config=tag)
                    try:
                        f = jax.jit(lambda x, qw, cfg=cfg: jq.weight_only_linear(x, qw, config=cfg))
                        if mode in ("wide", "wide2"):
                            row.update(worst_vs_bound=_worst_vs_bound(f, xs[0], qws[0]))
                        t = timeit(chain(f), [(xs, *((q,) for q in qws))]) / CHAIN_LAYERS
                        row.update(us=t * 1e6, bf16_us=tb * 1e6, vs_bf16=tb / t)
                    except Exception as e:  # report, do not stop the sweep
                        row.update(error=str(e)[:300])
                    print(row, flush=True)
                    rows.append(row)
                    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                              open(os.path.join(out, f"wo_mgpu_{mode}.json"), "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
