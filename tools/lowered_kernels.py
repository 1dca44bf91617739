"""Lower every jaxquant kernel for CUDA (works on a CPU-only machine with jax-cuda12-plugin) and
write one fingerprint per case: the kernels' serialized modules with source locations stripped
(every op family, the integer and fp8 formats, Triton and explicit Mosaic GPU configs).

Use it to show that a refactor leaves the kernels byte-identical (after ``make venv``, which
installs the CUDA plugin to ``.cuda-plugin``)::

    JAX_PLATFORMS=cpu python tools/lowered_kernels.py before.json   # on the old tree
    JAX_PLATFORMS=cpu python tools/lowered_kernels.py after.json    # on the new tree
    python tools/lowered_kernels.py --compare before.json after.json

Only the public API is used (explicit Mosaic GPU configs are looked up by class name), so the
same script runs on both trees.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys

# The CUDA plugin a CPU machine needs to lower for CUDA (Makefile: .cuda-plugin, outside the venv).
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cuda-plugin"))

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib import mosaic_gpu_dialect, triton
from jax._src.lib.mlir import ir

def _first(*paths):
    for mod, name in paths:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {paths}")


def _get(dict_attr, key):
    try:
        return dict_attr[key]
    except (KeyError, IndexError, ValueError):
        return None


def _custom_calls(op, out):
    for region in op.regions:
        for block in region.blocks:
            for o in block.operations:
                if o.operation.name == "stablehlo.custom_call":
                    out.append(o.operation)
                _custom_calls(o.operation, out)
    return out


def _module_text(raw: bytes) -> str:
    """A serialized kernel module (MLIR bytecode) printed without debug info (source locations)."""
    ctx = jax_mlir.make_ir_context()
    triton.dialect.register_dialect(ctx)
    mosaic_gpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True
    with ctx:
        return ir.Module.parse(raw).operation.get_asm(enable_debug_info=False)


def fingerprint(f, *args):
    """The kernels of ``f``'s CUDA lowering, in program order: sha256 of each module's text."""
    lowered = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
    out = []
    for call in _custom_calls(lowered.compiler_ir("stablehlo").operation, []):
        attrs = call.attributes
        if "mhlo.backend_config" not in attrs:
            continue
        cfg = ir.DictAttr(attrs["mhlo.backend_config"])
        module = _get(cfg, "ir") or _get(cfg, "module")
        if module is None:
            continue
        rest = {k: str(_get(cfg, k)) for k in ("grid_x", "grid_y", "grid_z", "num_warps", "num_stages", "name")}
        text = _module_text(ir.StringAttr(module).value_bytes) + repr(sorted(rest.items()))
        out.append(hashlib.sha256(text.encode()).hexdigest()[:16])
    return out


def cases():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 40, 96)), jnp.bfloat16)
    s_tok = jnp.ones((6, 40), jnp.float32)
    grans = {"tensor": (jq.PerTensor(), jnp.float32(1)), "token": (jq.PerToken(), s_tok),
             "channel0": (jq.PerChannel(0), jnp.ones((6,))), "channel-1": (jq.PerChannel(-1), jnp.ones((96,))),
             "group32": (jq.PerGroup(32), jnp.ones((6, 40, 3)))}
    for gname, (g, s) in grans.items():
        for dt in (jnp.bfloat16, jnp.float32, jnp.float16):
            xd = x.astype(dt)
            z = jnp.zeros(s.shape, jnp.int32)
            q = jnp.ones(x.shape, jnp.int8)
            yield f"affine/{gname}/{jnp.dtype(dt).name}", (lambda x, s, z, q, g=g, dt=dt: (
                jq.quantize(x, s, z, granularity=g),
                jq.quantize(x, s, None, granularity=g, dtype=jnp.uint8, qmin=0, qmax=15),
                jq.quantize(x, s, z, granularity=g, dtype=jnp.float32, qmin=-8, qmax=7),
                jq.dequantize(q, s, z, granularity=g, dtype=dt),
                jq.fake_quantize(x, s, z, granularity=g, qmin=-128, qmax=127),
                jq.fake_quantize_backward(x, x, s, z, granularity=g, qmin=-128, qmax=127),
                jq.quantize_backward(x, x, s, None, granularity=g, qmin=-128, qmax=127))), (xd, s, z, q)
    for dt in (jnp.bfloat16, jnp.float32):
        xd = x.astype(dt)
        yield f"dynamic/{jnp.dtype(dt).name}", (lambda x: (
            jq.dynamic_quantize(x), jq.dynamic_quantize(x, dtype=jnp.uint8, symmetric=False),
            jq.dynamic_quantize(x, granularity=jq.PerGroup(32)),
            jq.dynamic_quantize(x, granularity=jq.PerTensor(), symmetric=False, dtype=jnp.uint8))), (xd,)
    lsq = _first(("jaxquant", "fake_quantize_learnable"), ("jaxquant.flax.lsq", "fake_quantize_learnable"))
    xf = x.astype(jnp.float32)
    yield "lsq", (lambda x, s, z: jax.grad(lambda x, s, z: jnp.sum(lsq(
        x, s, z, granularity=jq.PerChannel(1), qmin=-128, qmax=127)), argnums=(0, 1, 2))(x, s, z)), (
        xf, jnp.full((40,), 0.1), jnp.zeros((40,)))
    rng = np.random.default_rng(1)
    for m in (1, 16, 300):
        for (n, k) in ((256, 512), (384, 1024)):
            w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
            xl = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            b = jnp.ones((n,), jnp.float32)
            qw8 = jq.quantize_weight(w, bits=8)
            yield f"w8a8/{m}x{n}x{k}", (lambda x, qw=qw8, b=b: (
                jq.quantized_linear(x, qw), jq.quantized_linear(x, qw, b),
                jq.quantized_linear(x, qw, act_scale=jnp.float32(0.1)))), (xl,)
            for bits, g, sym in ((4, 128, True), (4, 128, False), (4, None, True), (8, None, True), (8, 64, False)):
                qw = jq.quantize_weight(w, bits=bits, group_size=g, symmetric=sym)
                yield f"wo/{m}x{n}x{k}/b{bits}g{g}s{sym}", (lambda x, qw=qw, b=b: (
                    jq.weight_only_linear(x, qw), jq.weight_only_linear(x, qw, b))), (xl,)
    a = jnp.ones((64, 512), jnp.int8)
    yield "int8_matmul", (lambda a, w: (jq.int8_matmul(a, w), jq.int8_matmul(a, w, jnp.float32(1.5), jnp.ones((256,))))), (
        a, jnp.ones((256, 512), jnp.int8))
    mg = _first(("jaxquant.pallas.int8_matmul.mosaic", "Config"), ("jaxquant.pallas.int8_matmul_mgpu", "Config"))
    wm = _first(("jaxquant.pallas.weight_only.mosaic", "Config"), ("jaxquant.pallas.weight_only_mgpu", "Config"))
    w = jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
    xl = jnp.asarray(rng.standard_normal((256, 512)), jnp.bfloat16)
    for cfg in (mg(), mg(tile_n=64), mg(stages=6, tile_k=64)):
        qw8 = jq.quantize_weight(w, bits=8)
        yield f"w8a8-mosaic/{cfg}", (lambda x, qw=qw8, cfg=cfg: jq.quantized_linear(x, qw, config=cfg)), (xl,)
    for cfg in (wm(), wm(tile_m=256, part_m=128), wm(tile_m=64)):
        for bits, g, sym in ((4, 128, True), (4, None, False), (8, 64, True)):
            qw = jq.quantize_weight(w, bits=bits, group_size=g, symmetric=sym)
            yield f"wo-mosaic/{cfg}/b{bits}g{g}s{sym}", (
                lambda x, qw=qw, cfg=cfg: jq.weight_only_linear(x, qw, jnp.ones((512,)), config=cfg)), (xl,)

    yield from fp8_cases(x, grans, rng)


def fp8_cases(x, grans, rng):
    """The fp8 kernels: the quantize family (e4m3 / e5m2), dynamic fp8, the fp8 GEMMs (Triton at
    M = 1 / 16 / 300, Mosaic GPU with explicit configs) and fp8_linear's forward and backward."""
    e4, e5 = jnp.float8_e4m3fn, jnp.float8_e5m2
    for gname in ("tensor", "token", "group32"):
        g, s = grans[gname]
        for code in (e4, e5):
            q = jnp.ones(x.shape, code)
            yield f"fp8/{gname}/{jnp.dtype(code).name}", (lambda x, s, q, g=g, code=code: (
                jq.quantize(x, s, granularity=g, dtype=code), jq.dequantize(q, s, granularity=g),
                jq.fake_quantize(x, s, granularity=g, code_dtype=code),
                jq.fake_quantize_backward(x, x, s, granularity=g, code_dtype=code))), (x, s, q)
    yield "fp8/dynamic", (lambda x: (jq.dynamic_quantize(x, dtype=e4), jq.dynamic_quantize(
        x, granularity=jq.PerGroup(32), dtype=e5))), (x,)
    for m in (1, 16, 300):
        w = jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32)
        xl = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
        for block in (None, 128):
            qw = jq.quantize_weight(w, dtype=e4, block_size=block)
            yield f"fp8-linear/{m}/b{block}", (lambda x, qw=qw: jq.quantized_linear(x, qw)), (xl,)
    fm = _first(("jaxquant.pallas.fp8_matmul.mosaic", "Config"),)
    w = jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
    xl = jnp.asarray(rng.standard_normal((256, 512)), jnp.bfloat16)
    for cfg in (fm(), fm(tile_n=64, part_m=None), fm(tile_m=64, part_m=None)):
        for block in (None, 128):
            qw = jq.quantize_weight(w, dtype=e4, block_size=block)
            yield f"fp8-mosaic/{cfg}/b{block}", (lambda x, qw=qw, cfg=cfg: jq.quantized_linear(
                x, qw, jnp.ones((512,)), config=cfg)), (xl,)
    for recipe in ("tensorwise", "rowwise", "blockwise"):
        yield f"fp8_linear/{recipe}", (lambda x, w, recipe=recipe: jax.grad(
            lambda x, w: jnp.sum(jq.fp8_linear(x, w, recipe=recipe).astype(jnp.float32)), (0, 1))(x, w)), (
            xl, jnp.asarray(rng.standard_normal((384, 512)), jnp.bfloat16))


def main(argv):
    if argv[:1] == ["--compare"]:
        a, b = (json.load(open(p)) for p in argv[1:3])
        bad = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        n = sum(len(v) for v in a.values())
        print(f"{len(a)} cases, {n} kernels; {len(bad)} differ" + ("" if not bad else ": " + ", ".join(bad)))
        return 1 if bad else 0
    out = {}
    for name, f, args in cases():
        out[name] = fingerprint(f, *args)
    json.dump(out, open(argv[0], "w"), indent=1, sort_keys=True)
    print(f"{len(out)} cases, {sum(len(v) for v in out.values())} kernels -> {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
