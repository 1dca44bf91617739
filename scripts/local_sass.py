"""Compile the Pallas weight-only / W8A8 kernels to SASS, on a machine WITHOUT a GPU too, and report
shared memory, registers, spills and the main loop's instruction mix: occupancy and code questions
answered without device time. (On the GPU machine: ``--triton-python python3``; this replaces the
former scripts/diag_ttgir.py, which compiled the IR without the TTIR passes.)

Two Pythons: this one (the project's venv: jax lowers the kernels to Triton IR for CUDA through the
CPU-installed CUDA plugin, PALLAS_NOTES.md §2) and one with ``triton`` (the GPU machine's version,
3.6.0; its wheel ships ptxas / nvdisasm), e.g. ``python3 -m venv /tmp/tv && /tmp/tv/bin/pip install
triton==3.6.0``. The TTIR passes (inliner, canonicalize, combine, ...) are run before compiling, as in
a normal Triton compile (triton.compile skips them for IR files), so dot+add fusion etc. show.

Usage: JAX_PLATFORMS=cpu .venv/bin/python scripts/local_sass.py --triton-python /tmp/tv/bin/python \
           OUTDIR 'w4:16x8192x8192:g128:16,32,256,4,2,3' ['w8a8:16x4096x4096:32,...' ...]
A case is KIND:MxNxK[:gGROUP]:CONFIG with KIND w4 / w8 (weight_only Config fields) or w8a8
(int8_matmul Config fields), CONFIG the Config's positional fields; x is bfloat16 (``KIND32``: float32).
Not part of the suite; not GPU truth (XLA's Triton pipeline may differ in details).
"""
import argparse
import contextlib
import functools
import io
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

import jaxquant as jq
from jaxquant.pallas import int8_matmul as K8
from jaxquant.pallas import weight_only as KW

COMPILE = r'''
import glob, os, re, subprocess, sys, triton
from triton._C.libtriton import ir, passes
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
out = sys.argv[1]
target = GPUTarget("cuda", 90, 32)
bindir = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/"
for p in sorted(glob.glob(os.path.join(out, "*.ttir"))):
    if p.endswith("_opt.ttir"):
        continue
    warps, stages = map(int, open(p[:-5] + ".cfg").read().split())
    ctx = ir.context(); ir.load_dialects(ctx); CUDABackend(target).load_dialects(ctx)
    mod = ir.parse_mlir_module(p, ctx)
    pm = ir.pass_manager(ctx)
    passes.common.add_inliner(pm); passes.ttir.add_rewrite_tensor_pointer(pm); passes.common.add_canonicalizer(pm)
    passes.ttir.add_combine(pm); passes.ttir.add_reorder_broadcast(pm); passes.common.add_cse(pm)
    passes.common.add_symbol_dce(pm); passes.ttir.add_loop_unroll(pm)
    pm.run(mod, "make_ttir")
    q = p[:-5] + "_opt.ttir"
    open(q, "w").write(str(mod))
    c = triton.compile(q, target=target, options=dict(num_warps=warps, num_stages=stages))
    base = p[:-5]
    open(base + ".ttgir", "w").write(c.asm["ttgir"])
    open(base + ".ptx", "w").write(c.asm["ptx"])
    r = subprocess.run([bindir + "ptxas", "-v", "--gpu-name", "sm_90a", base + ".ptx", "-o", base + ".cubin"],
                       capture_output=True, text=True)
    regs = " ".join(l.split(":", 1)[-1].strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l)
    sass = subprocess.run([bindir + "nvdisasm", "-c", base + ".cubin"], capture_output=True, text=True).stdout
    open(base + ".sass", "w").write(sass)
    # main loop: from the first label to the first branch back
    lines = sass.splitlines()
    first = next((i for i, l in enumerate(lines) if re.match(r"^\.L_x_\d+:", l)), 0)
    last = next((i for i, l in enumerate(lines) if " BRA " in l and i > first), len(lines))
    ops = {}
    for l in lines[first:last]:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", l)
        if m:
            ops[m.group(1)] = ops.get(m.group(1), 0) + 1
    top = " ".join(f"{k}:{v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:14])
    print(f"{os.path.basename(base)}: smem {c.metadata.shared} B | {regs}\n  loop ({sum(ops.values())} "
          f"instructions a warp): {top}", flush=True)
'''



def _ttir(fn, *avals):
    """The Triton IR of the last Pallas kernel in ``fn`` (lowered for CUDA on this CPU machine): the
    GEMM of ``quantized_linear`` (after its activation-quantization kernel), the weight-only kernel."""
    mods = {"weight_only": KW, "int8_matmul": K8}
    saved = {name: m.pl for name, m in mods.items()}
    shim = types.SimpleNamespace(**{a: getattr(pl, a) for a in dir(pl) if not a.startswith("__")})
    shim.pallas_call = functools.partial(pl.pallas_call, debug=True)
    buf = io.StringIO()
    try:
        for m in mods.values():
            m.pl = shim
        with contextlib.redirect_stdout(buf):
            jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",))
    finally:
        for name, m in mods.items():
            m.pl = saved[name]
    txt = buf.getvalue()
    mods_txt = [t for t in txt.split("module @")[1:] if "tt.func" in t]
    mod = "module @" + mods_txt[-1]
    mod = mod.replace(" [unknown]", "")
    mod = re.sub(r'\s*"[^"\n]*"\(#loc\d*\)', "", mod)
    mod = re.sub(r"\s*loc\([^\n]*\)", "", mod)
    mod = mod[:mod.rindex("}") + 1]
    return "\n".join(l for l in mod.splitlines() if not l.startswith("#loc"))


def case(spec):
    """'KIND:MxNxK[:gGROUP]:CONFIG' -> (name, fn, avals, warps, stages)."""
    parts = spec.split(":")
    kind, (m, n, k) = parts[0], map(int, parts[1].split("x"))
    group = int(parts[2][1:]) if parts[2].startswith("g") else None
    fields = [int(v) for v in parts[-1].split(",")]
    dt = jnp.float32 if kind.endswith("32") else jnp.bfloat16
    kind = kind.removesuffix("32")
    x = jax.ShapeDtypeStruct((m, k), dt)
    w = jax.ShapeDtypeStruct((n, k), jnp.float32)
    if kind == "w8a8":
        cfg = K8.Config(*fields)
        qw = jax.eval_shape(lambda w: jq.quantize_weight(w, bits=8), w)
        fn = lambda x, q: jq.quantized_linear(x, q, config=cfg)
    else:
        cfg = KW.Config(*fields)
        bits = 4 if kind == "w4" else 8
        qw = jax.eval_shape(lambda w: jq.quantize_weight(w, bits=bits, group_size=group), w)
        fn = lambda x, q: jq.weight_only_linear(x, q, config=cfg)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", spec)
    return name, fn, (x, qw), cfg.num_warps, cfg.num_stages


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--triton-python", required=True, help="a python with triton==3.6.0")
    p.add_argument("out")
    p.add_argument("cases", nargs="+")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    for spec in a.cases:
        name, fn, avals, warps, stages = case(spec)
        open(os.path.join(a.out, name + ".ttir"), "w").write(_ttir(fn, *avals))
        open(os.path.join(a.out, name + ".cfg"), "w").write(f"{warps} {stages}")
    subprocess.run([a.triton_python, "-c", COMPILE, a.out], check=True)


if __name__ == "__main__":
    sys.exit(main())
