"""Diagnostic: decode (M = 1, 16) tiles with split-K for the W8A8 and weight-only kernels vs XLA bf16.

Times each op as a chain of SETS layers with distinct weights inside one jitted call (per-layer GPU
time: at decode one jitted call of one layer is bound by the host's dispatch, ~25 us on the H200,
so timing calls one by one measures the host, not the kernel). Prints one line per (shape, kernel)
with each tile's speed-up over the bf16 matmul chain, and writes OUT/decode_sweep.json.
H100/H200; not part of the suite. Usage: python3 scripts/diag_decode.py OUT [MODE[,MODE...]], MODE one of
decode | mid | w8a8 | w4 | fused1 | bcast | gemm | dynq
(``mid``: W4A16 tiles at M = 128 and 512 instead, written to OUT/mid_sweep.json; ``w8a8``: W8A8
split / tile options where it is slower than bf16, OUT/w8a8_small_sweep.json).
"""
import dataclasses, json, os, sys

import jax, jax.numpy as jnp
import jaxquant as jq
from jaxquant.bench.harness import chain, timeit  # PERF.md's method, one jitted call per chain
from jaxquant.pallas import int8_matmul as MM, weight_only as WO
from jaxquant.pallas.int8_matmul import Config as C8
from jaxquant.pallas.weight_only import Config as CW

SETS = 8  # layers per chain, each with its own weights

W8A8 = [None, C8(16, 32, 512, 1, 2, 4), C8(16, 32, 256, 1, 2, 3, split_k=2), C8(16, 32, 256, 1, 2, 3, split_k=4),
        C8(16, 32, 256, 1, 2, 3, split_k=8), C8(16, 32, 128, 1, 2, 4, split_k=4), C8(16, 32, 128, 1, 2, 4, split_k=8),
        C8(16, 64, 256, 1, 4, 3, split_k=2), C8(16, 64, 256, 1, 4, 3, split_k=4), C8(16, 16, 256, 1, 1, 3, split_k=4),
        C8(16, 64, 512, 1, 4, 3), C8(16, 128, 256, 1, 4, 3, split_k=2), C8(16, 128, 256, 1, 8, 3, split_k=4)]
WO = [None, CW(16, 32, 512, 1, 2, 4), CW(16, 32, 256, 2, 2, 3), CW(16, 32, 256, 4, 2, 3), CW(16, 32, 256, 8, 2, 3),
      CW(16, 32, 128, 4, 2, 4), CW(16, 32, 128, 8, 2, 4), CW(16, 64, 256, 2, 4, 3), CW(16, 64, 256, 4, 4, 3),
      CW(16, 16, 256, 4, 1, 3), CW(16, 16, 256, 8, 1, 3),
      CW(16, 64, 512, 1, 4, 3), CW(16, 128, 256, 2, 4, 3), CW(16, 128, 256, 4, 8, 3)]


MID = [None, CW(64, 64, 128, 1, 4, 3), CW(64, 64, 128, 2, 4, 3), CW(64, 64, 128, 4, 4, 3), CW(32, 64, 128, 2, 4, 3),
       CW(32, 64, 128, 4, 4, 3), CW(64, 64, 64, 2, 4, 4), CW(128, 64, 64, 2, 4, 3), CW(64, 128, 64, 2, 4, 3),
       CW(64, 128, 64, 4, 4, 3), CW(128, 128, 64, 1, 8, 3), CW(128, 128, 64, 2, 8, 3)]


def tag(c):
    if c is None:
        return "auto"
    if c == "auto/rows":
        return c
    extra = "/slices" if getattr(c, "x_pairs", None) is False else ""
    extra += "/rows" if getattr(c, "row_bcast", None) is False else ""
    extra += f"/g{c.group_m}" if getattr(c, "group_m", 1) != 1 else ""
    return f"{c.block_m}x{c.block_n}x{c.block_k}/w{c.num_warps}/st{c.num_stages}/s{c.split_k}{extra}"


# M = 1 weight-only: x's one row broadcast in registers (Config.row_bcast, the default at M = 1)
# against the 16-row x tile ("auto/rows": the heuristic tile without it), and tiles that the smaller
# shared-memory footprint may now favour (more stages, wider N)
BC4 = [None, "auto/rows", CW(16, 32, 256, 4, 2, 4), CW(16, 32, 256, 8, 2, 4), CW(16, 32, 256, 4, 2, 5),
       CW(16, 64, 256, 4, 2, 4), CW(16, 64, 256, 4, 4, 4), CW(16, 32, 512, 4, 2, 3), CW(16, 32, 128, 8, 2, 6),
       CW(16, 32, 256, 4, 1, 4), CW(16, 16, 256, 8, 1, 4)]
BC8 = [None, "auto/rows", CW(16, 32, 128, 4, 2, 6), CW(16, 32, 256, 4, 2, 4), CW(16, 64, 256, 4, 4, 4),
       CW(16, 32, 256, 8, 2, 4), CW(16, 64, 128, 4, 2, 6)]
# W8A8 at M = 1: a's one row broadcast (the default) against its 16-row tile, and tiles the smaller
# shared-memory footprint may favour
BC8A8 = [None, "auto/rows", C8(16, 32, 256, 1, 2, 4, split_k=4), C8(16, 32, 256, 1, 2, 3, split_k=4),
         C8(16, 32, 256, 1, 2, 3, split_k=2), C8(16, 64, 256, 1, 2, 3, split_k=4), C8(16, 32, 512, 1, 2, 3, split_k=4),
         C8(16, 32, 128, 1, 2, 6, split_k=4), C8(16, 64, 256, 1, 2, 4, split_k=2)]
# W4A16 decode: deeper pipelines (num_stages > a program's K steps: every load issued up front)
W4S = [None, CW(16, 32, 256, 4, 2, 5), CW(16, 32, 256, 4, 2, 3), CW(16, 64, 256, 4, 2, 5), CW(16, 32, 256, 4, 2, 9),
       CW(16, 32, 256, 2, 2, 9), CW(16, 32, 256, 8, 2, 8), CW(16, 32, 128, 8, 2, 5)]
# W8A8 GEMM tiles at prefill (the M >= 2048 default is 128x128x128, 4 warps, 3 stages)
GEMM = [None, C8(128, 128, 128, 8, 4, 4), C8(128, 128, 64, 8, 4, 5), C8(128, 128, 256, 8, 4, 2),
        C8(128, 256, 64, 8, 8, 4), C8(256, 128, 64, 8, 8, 4), C8(128, 128, 128, 16, 4, 3), C8(128, 128, 128, 4, 4, 3),
        C8(128, 64, 128, 8, 4, 4)]


SMALL = [None, C8(16, 32, 256, 1, 2, 3, split_k=1), C8(16, 32, 256, 1, 2, 3, split_k=2),
         C8(16, 32, 256, 1, 2, 3, split_k=4), C8(16, 64, 256, 1, 4, 3, split_k=1), C8(16, 64, 256, 1, 4, 3, split_k=2),
         C8(16, 32, 512, 1, 2, 3, split_k=1)]
MID8 = [None, C8(64, 64, 256, 8, 4, 3, split_k=2), C8(64, 64, 256, 8, 4, 3, split_k=4), C8(32, 64, 256, 8, 4, 3),
        C8(32, 64, 256, 8, 4, 3, split_k=2), C8(64, 32, 256, 8, 4, 3), C8(128, 64, 128, 8, 4, 3, split_k=2)]

# int4 x in (even, odd) pair words (the default) against the two XLA slices, and wider / deeper tiles
W4P = [None, CW(16, 32, 256, 4, 2, 3, True, False), CW(16, 64, 256, 4, 2, 3, True, False), CW(16, 32, 256, 8, 2, 3), CW(16, 32, 256, 2, 2, 3),
       CW(16, 64, 256, 2, 2, 3), CW(16, 64, 256, 4, 2, 3), CW(16, 64, 256, 8, 2, 3), CW(16, 32, 256, 4, 2, 4),
       CW(16, 32, 128, 8, 2, 4), CW(16, 32, 512, 2, 2, 3), CW(16, 64, 128, 8, 2, 4), CW(16, 128, 256, 4, 4, 3),
       CW(16, 64, 256, 4, 4, 3), CW(16, 32, 256, 4, 1, 3)]
W8P = [None, CW(16, 32, 128, 4, 2, 4), CW(16, 64, 128, 4, 2, 4), CW(16, 64, 128, 8, 2, 4), CW(16, 32, 256, 4, 2, 3),
       CW(16, 32, 128, 8, 2, 6), CW(16, 64, 256, 4, 4, 4), CW(16, 32, 128, 4, 1, 4)]

# W8A8 at M = 1 with the activation quantized inside the GEMM (one kernel, K split) vs the default
FUSED1 = [None, C8(16, 32, 256, 1, 2, 3, split_k=8), C8(16, 32, 256, 1, 2, 3, split_k=4),
          C8(16, 32, 256, 1, 2, 3, split_k=2), C8(16, 64, 256, 1, 2, 3, split_k=4), C8(16, 64, 256, 1, 4, 3, split_k=4),
          C8(16, 32, 512, 1, 2, 3, split_k=4), C8(16, 128, 256, 1, 4, 3, split_k=2), C8(16, 32, 128, 1, 2, 4, split_k=8)]


def _fused_linear(x, qw, config=None):
    from jaxquant.primitives import linear as L
    return L.linear_kernel(x, qw.codes, qw.scale, None, out_dtype=x.dtype, config=config, fuse=True)


# op name -> (function, weight format)
OPS = {"w8a8fused": (_fused_linear, dict(bits=8)), "w8a8": (jq.quantized_linear, dict(bits=8)), "w4a16": (jq.weight_only_linear, dict(bits=4, group_size=128)),
       "w8a16": (jq.weight_only_linear, dict(bits=8))}
# mode -> (output file, (N, K) shapes, [(M, [(op, configs), ...]), ...])
MODES = {
    "decode": ("decode_sweep.json", ((8192, 8192), (4096, 14336), (14336, 4096)),
               [(m, [("w8a8", W8A8), ("w4a16", WO), ("w8a16", WO)]) for m in (1, 16)]),
    "w4": ("w4_sweep.json", ((8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)),
           [(m, [("w4a16", W4P), ("w8a16", W8P)]) for m in (1, 16)]),
    "fused1": ("w8a8_fused1_sweep.json", ((8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)),
               [(1, [("w8a8", [None]), ("w8a8fused", FUSED1)])]),
    "bcast": ("bcast_sweep.json", ((8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)),
              [(1, [("w4a16", BC4), ("w8a16", BC8)])]),
    "w4s": ("w4s_sweep.json", ((8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)),
            [(m, [("w4a16", W4S)]) for m in (1, 16)]),
    "w8bc": ("w8a8_bcast_sweep.json", ((8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)),
             [(1, [("w8a8", BC8A8)])]),
    "gemm": ("gemm_sweep.json", ((4096, 14336), (8192, 8192)), [(m, [("w8a8", GEMM)]) for m in (2048, 8192)]),
    "mid": ("mid_sweep.json", ((8192, 8192), (4096, 14336)), [(m, [("w4a16", MID)]) for m in (128, 512)]),
    "w8a8": ("w8a8_small_sweep.json", ((4096, 4096), (4096, 14336)), [(16, [("w8a8", SMALL)]), (128, [("w8a8", MID8)])]),
}


def run(out, mode):
    fname, nks, plan = MODES[mode]
    os.makedirs(out, exist_ok=True)
    rows = []
    for (n, k) in nks:
        ws = [jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02 for i in range(SETS)]
        wb = [w.astype(jnp.bfloat16) for w in ws]
        fmts = {op for _, ops in plan for op, _ in ops}
        qs = {op: [jq.quantize_weight(w, **OPS[op][1]) for w in ws] for op in fmts}
        del ws
        for m, ops in plan:
            xs = tuple(jax.random.normal(jax.random.PRNGKey(9 + i), (m, k), jnp.bfloat16) for i in range(SETS))
            tb = timeit(chain(lambda x, w: x @ w.T), [(xs, *((w,) for w in wb))]) / SETS
            for op, cfgs in ops:
                fn = OPS[op][0]
                line = []
                for c in cfgs:
                    if c == "auto/rows":  # the heuristic tile with x's 16-row tile (no row broadcast)
                        b = OPS[op][1]
                        base = (MM.heuristics(m, n, k) if op == "w8a8"
                                else WO.heuristics(m, n, k, b["bits"], b.get("group_size")))
                        c = dataclasses.replace(base, row_bcast=False)
                    try:
                        t = timeit(chain(lambda x, q, c=c, fn=fn: fn(x, q, config=c)),
                                   [(xs, *((q,) for q in qs[op]))]) / SETS
                        rows.append(dict(op=op, shape=[m, n, k], config=tag(c), us=t * 1e6, bf16_us=tb * 1e6,
                                         vs_bf16=tb / t))
                        line.append(f"{tag(c)} {tb / t:.2f}")
                    except Exception as e:  # a tile that does not compile is reported, not fatal
                        rows.append(dict(op=op, shape=[m, n, k], config=tag(c), error=str(e)[:300]))
                        line.append(f"{tag(c)} ERR")
                print(f"{op} M={m} N={n} K={k} bf16 {tb * 1e6:.1f}us: " + " | ".join(line), flush=True)
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                      open(os.path.join(out, fname), "w"), indent=1)


def run_dynq(out):
    """The dynamic per-token quantize kernel alone at decode rows (M = 1, 16), per tile: kernel
    durations from PyTorch's CUPTI profiler (scripts/diag_profile.py), SETS calls in one jit."""
    import statistics
    import torch
    sys.path.insert(0, os.path.dirname(__file__))
    from diag_profile import kernels
    from jaxquant.pallas import dynamic as D
    torch.zeros(1, device="cuda")
    cfgs = [None, D.Config(1, 16384, 32), D.Config(1, 16384, 8), D.Config(1, 8192, 8), D.Config(1, 4096, 8),
            D.Config(1, 4096, 4), D.Config(1, 2048, 4), D.Config(1, 8192, 16), D.Config(1, 4096, 16)]
    rows = []
    for m in (1, 16):
        for k in (4096, 8192, 14336):
            xs = tuple(jax.random.normal(jax.random.PRNGKey(i), (m, k), jnp.bfloat16) for i in range(SETS))
            line = []
            for c in cfgs:
                f = jax.jit(lambda xs, c=c: [D.dynamic_quantize_rows(x, qmin=-128, qmax=127, symmetric=True,
                                                                     out_dtype=jnp.int8, config=c)[:2] for x in xs])
                tg = "auto" if c is None else f"{c.block_rows}x{c.block_cols}/w{c.num_warps}"
                try:
                    ks = [e["us"] for e in kernels(f, (xs,)) if "dynamic_quantize" in e["name"]]
                    t = statistics.median(ks)
                    rows.append(dict(op="dynq", shape=[m, k], config=tg, kernel_us=t))
                    line.append(f"{tg} {t:.2f}")
                except Exception as e:
                    line.append(f"{tg} ERR {str(e)[:80]}")
            print(f"dynq M={m} K={k} (kernel us): " + " | ".join(line), flush=True)
    os.makedirs(out, exist_ok=True)
    json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
              open(os.path.join(out, "dynq_kernels.json"), "w"), indent=1)


if __name__ == "__main__":
    for mode in (sys.argv[2] if len(sys.argv) > 2 else "decode").split(","):
        run_dynq(sys.argv[1]) if mode == "dynq" else run(sys.argv[1], mode)
