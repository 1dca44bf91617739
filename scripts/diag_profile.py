"""Diagnostic: the GPU kernels of one decode layer, with durations and the gaps between them.

Runs chains of SETS layers (distinct weights, one jitted call: ``jaxquant.bench.harness.chain``)
under PyTorch's profiler, which records every kernel of the process through CUPTI, JAX's included,
and prints each kernel of the last call (name, microseconds, idle gap before it). The sum of a
layer's kernels against its share of the chain tells launch gaps from kernel time.
H100/H200; not part of the suite. Usage: python3 scripts/diag_profile.py OUT [M ...]
"""
import json, os, sys

import torch
from torch.profiler import ProfilerActivity, profile
import jax, jax.numpy as jnp

import jaxquant as jq
from jaxquant.bench.harness import chain, timeit
from jaxquant.pallas.int8_matmul import Config as C8
from jaxquant.pallas.weight_only import Config as CW

SETS = 4
SHAPES = ((8192, 8192), (4096, 14336), (4096, 4096))
# unsplit decode tiles (one kernel and the epilogue fused, no partials to sum)
VARIANTS = [("w8a8:16x16x256/w1/st4", "w8a8", C8(16, 16, 256, 1, 1, 4)),
            ("w8a8:16x16x512/w1/st3", "w8a8", C8(16, 16, 512, 1, 1, 3)),
            ("w8a8:16x32x256/w2/st5", "w8a8", C8(16, 32, 256, 1, 2, 5)),
            ("w4a16:16x16x256/w1/st4", "w4a16", CW(16, 16, 256, 1, 1, 4)),
            ("w4a16:16x16x512/w1/st3", "w4a16", CW(16, 16, 512, 1, 1, 3)),
            ("w8a16:16x16x256/w1/st4", "w8a16", CW(16, 16, 256, 1, 1, 4))]


def kernels(fn, args):
    jax.block_until_ready(fn(*args))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            jax.block_until_ready(fn(*args))
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    if not ev:
        return []
    # the last call: kernels after the largest gap before the last third
    gaps = [(ev[i].time_range.start - ev[i - 1].time_range.end, i) for i in range(1, len(ev))]
    cut = max(gaps[len(gaps) * 2 // 3:] or [(0, 0)])[1] if len(gaps) > 2 else 0
    out, prev = [], None
    for e in ev[cut:]:
        gap = 0.0 if prev is None else e.time_range.start - prev
        out.append(dict(name=e.name[:70], us=e.time_range.end - e.time_range.start, gap_us=gap))
        prev = e.time_range.end
    return out


def main(out, ms):
    os.makedirs(out, exist_ok=True)
    torch.zeros(1, device="cuda")
    rows = []
    for n, k in SHAPES:
        ws = [jax.random.normal(jax.random.PRNGKey(i), (n, k), jnp.float32) * 0.02 for i in range(SETS)]
        fmts = {"bf16": [w.astype(jnp.bfloat16) for w in ws],
                "w8a8": [jq.quantize_weight(w, bits=8) for w in ws],
                "w4a16": [jq.quantize_weight(w, bits=4, group_size=128) for w in ws],
                "w8a16": [jq.quantize_weight(w, bits=8) for w in ws]}
        fns = {"bf16": ("bf16", lambda x, w: x @ w.T), "w8a8": ("w8a8", jq.quantized_linear),
               "w4a16": ("w4a16", jq.weight_only_linear), "w8a16": ("w8a16", jq.weight_only_linear)}
        for name, fmt, c in VARIANTS:
            f0 = jq.quantized_linear if fmt == "w8a8" else jq.weight_only_linear
            fns[name] = (fmt, lambda x, w, f0=f0, c=c: f0(x, w, config=c))
        del ws
        for m in ms:
            xs = tuple(jax.random.normal(jax.random.PRNGKey(9 + i), (m, k), jnp.bfloat16) for i in range(SETS))
            for op, (fmt, f) in fns.items():
                g = chain(f)
                args = (xs, *((w,) for w in fmts[fmt]))
                try:
                    t = timeit(g, [args]) / SETS * 1e6
                except Exception as e:  # a tile that does not compile is reported, not fatal
                    print(f"{op} M={m} {n}x{k}: ERROR {str(e)[:300]}")
                    continue
                try:
                    ks = kernels(g, args)
                except Exception as e:  # the profiler is a diagnostic extra
                    print("profiler failed:", str(e)[:200])
                    ks = []
                tot = sum(r["us"] for r in ks) / SETS
                span = (sum(r["us"] + r["gap_us"] for r in ks) - (ks[0]["gap_us"] if ks else 0)) / SETS
                rows.append(dict(op=op, shape=[m, n, k], layer_us=t, kernel_us=tot, span_us=span, kernels=ks))
                print(f"{op:6s} M={m:<3d} {n}x{k}: {t:6.1f} us/layer, kernels {tot:6.1f} us/layer, "
                      f"span {span:6.1f}; {len(ks)} kernels/call", flush=True)
                for r in ks[: len(ks) // SETS + 2]:
                    print(f"      {r['us']:7.2f} us  gap {r['gap_us']:6.2f}  {r['name']}")
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows),
                      open(os.path.join(out, "profile.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or [1, 16])
