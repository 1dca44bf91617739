"""Sharding benchmark: what a tensor-parallel MLP moves between devices, quantized against bf16.

The model is a Llama-style MLP block of two linear layers sharded Megatron style over every device
of the default platform (a one-axis mesh ``model``): layer 1 (``up``, ``W1 [H, D]``) column
parallel (the weight split over its output features H), layer 2 (``down``, ``W2 [D, H]``) row
parallel (split over its input features H; the layer sums over devices). Per layer and variant
the section compiles the layer under ``jax.jit`` with those layouts (the layer's input laid out as
the previous layer leaves it) and counts the collectives of the compiled module
(``jaxquant.core.describe.collectives``: count and bytes per device), against the bf16 layer
(``x @ W.T`` in XLA) under the same layouts. Variants: ``bf16``, ``W8A8``, ``FP8`` (e4m3 per channel)
and ``FP8-b128`` (e4m3, 128 x 128 blocks) (``quantized_linear``), ``W8A16`` and ``W4A16-g128``
(``weight_only_linear``). An ``fsdp`` row per variant shards the
weight over the axis that also splits the tokens (the weight must be gathered: what moves is the
codes and scales, never dequantized floats).

``issue`` rows reproduce the four layouts of the sharding issue (M = 16, K = 1024, N = 512):
``quantized_linear`` and ``weight_only_linear`` (int4, g128) with the weight split over N,
``weight_only_linear`` over K, ``dynamic_quantize`` per token with the tokens split.

On GPUs, each layer is also timed (``harness.timeit``: the layer's jitted call, sharded inputs,
docs/performance.md's method) next to its bf16 layer. On the CPU the kernels run in Pallas interpret mode
(the code paths the GPU runs) and nothing is timed. With a single device there is nothing to
partition: the rows say so (0 collectives).

Reported per row: ``layer``, ``layout``, ``variant``, ``devices``, ``shape`` (``M x K -> N``),
``collectives`` (count), ``bytes`` (per device), ``bf16_bytes`` (the bf16 layer's), ``weight_bytes``
(the stored weight: codes + scales, or bf16), ``ms`` / ``bf16_ms`` (GPU only).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from rich.table import Table

import jaxquant as jq
from jaxquant.bench.harness import Context, nbytes, timeit
from jaxquant.core.describe import collectives

__all__ = ["run", "table", "COLUMNS"]

AXIS = "model"
VARIANTS = {"bf16": None, "W8A8": dict(bits=8), "FP8": dict(dtype=jnp.float8_e4m3fn),
            "FP8-b128": dict(dtype=jnp.float8_e4m3fn, block_size=128), "W8A16": dict(bits=8),
            "W4A16-g128": dict(bits=4, group_size=128)}
LINEAR = ("W8A8", "FP8", "FP8-b128")  # quantized_linear (x quantized too); the others: weight_only_linear
COLUMNS = ("layer", "layout", "variant", "devices", "shape", "collectives", "bytes", "bf16 bytes", "weight bytes",
           "ms", "bf16 ms")


def _shapes(ctx: Context):
    """(M, D, H): tokens, model width, MLP width (Llama-3-8B's D = 4096, H = 14336 on a GPU)."""
    if ctx.quick or ctx.platform == "cpu":
        return 16, 1024, 2048
    return 16, 4096, 14336


def _layer(variant):
    """``f(x, w)`` of one layer: the bf16 matmul or the quantized op on a QuantizedWeight."""
    if variant == "bf16":
        return lambda x, w: x @ w.T
    if variant in LINEAR:
        return lambda x, w: jq.quantized_linear(x, w)
    return lambda x, w: jq.weight_only_linear(x, w)


def _weight(variant, w):
    return w.astype(jnp.bfloat16) if variant == "bf16" else jq.quantize_weight(w, **VARIANTS[variant])


def _put(mesh, tree, spec):
    """Every array of ``tree`` laid out as ``spec`` over its leading dimensions."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(*spec[:a.ndim]))), tree)


def _measure(ctx, f, args, impl):
    with jq.implementation(impl):
        jf = jax.jit(f)
        text = jf.lower(*args).compile().as_text()
        ms = None
        if ctx.platform == "gpu":
            ms = 1e3 * timeit(jf, [args], repeats=ctx.repeats, min_time=0.01 if ctx.quick else 0.03)
    c = collectives(text)
    return sum(n for n, _ in c.values()), sum(b for _, b in c.values()), ms


# (layer, layout): (weight shape key, x spec, weight spec over [N, K])
LAYOUTS = {
    ("up", "column parallel"): ("up", (None, None), (AXIS, None)),
    ("down", "row parallel"): ("down", (None, AXIS), (None, AXIS)),
    ("up", "fsdp"): ("up", (AXIS, None), (AXIS, None)),
}


def _mlp_rows(ctx, mesh, impl):
    m, d, hdim = _shapes(ctx)
    key = jax.random.PRNGKey(0)
    ws = {"up": jax.random.normal(key, (hdim, d), jnp.float32) / np.sqrt(d),
          "down": jax.random.normal(jax.random.fold_in(key, 1), (d, hdim), jnp.float32) / np.sqrt(hdim)}
    rows = []
    for (layer, layout), (wkey, xspec, wspec) in LAYOUTS.items():
        n, k = ws[wkey].shape
        x = jax.random.normal(jax.random.fold_in(key, 2), (m, k), jnp.bfloat16)
        base = {}
        for variant in VARIANTS:
            ctx.say(f"sharding {layer} {layout} {variant}")
            row = dict(section="sharding", op=variant, layer=layer, layout=layout, variant=variant,
                       devices=mesh.size, shape=f"{m} x {k} -> {n}")
            try:
                w = _weight(variant, ws[wkey])
                args = (_put(mesh, x, xspec), _put(mesh, w, wspec))
                count, nb, ms = _measure(ctx, _layer(variant), args, impl)
            except Exception as e:  # a variant that fails still leaves the others' rows
                rows.append(dict(row, error=f"{type(e).__name__}: {e}"[:300]))
                continue
            if variant == "bf16":
                base = dict(bytes=nb, ms=ms)
            rows.append(dict(row, collectives=count, bytes=nb, bf16_bytes=base.get("bytes"), weight_bytes=nbytes(w),
                             ms=ms, bf16_ms=base.get("ms")))
    return rows


def _issue_rows(ctx, mesh, impl):
    """The issue's four layouts at M = 16, K = 1024, N = 512."""
    m, k, n = 16, 1024, 512
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, (m, k), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 1), (n, k), jnp.float32)
    q8, q4 = jq.quantize_weight(w, bits=8), jq.quantize_weight(w, bits=4, group_size=128)
    cases = {
        "quantized_linear, weight over N": (jq.quantized_linear, (_put(mesh, x, ()), _put(mesh, q8, (AXIS, None)))),
        "weight_only_linear int4 g128, weight over N": (
            jq.weight_only_linear, (_put(mesh, x, ()), _put(mesh, q4, (AXIS, None)))),
        "weight_only_linear int4 g128, weight over K": (
            jq.weight_only_linear, (_put(mesh, x, (None, AXIS)), _put(mesh, q4, (None, AXIS)))),
        "dynamic_quantize per token, rows split": (jq.dynamic_quantize, (_put(mesh, x, (AXIS, None)),)),
    }
    rows = []
    for name, (f, args) in cases.items():
        ctx.say(f"sharding issue layout: {name}")
        count, nb, _ = _measure(ctx, f, args, impl)
        rows.append(dict(section="sharding", op=name.split(",")[0], layer="issue", layout=name.split(", ")[1],
                         variant=name.split(",")[0], devices=mesh.size, shape=f"{m} x {k} -> {n}", collectives=count,
                         bytes=nb, weight_bytes=nbytes(args[-1]) if len(args) > 1 else None))
    return rows


def run(ctx: Context) -> list[dict]:
    devices = jax.devices()
    mesh = Mesh(np.array(devices), (AXIS,))
    impl = "interpret" if ctx.platform == "cpu" else "auto"
    return _mlp_rows(ctx, mesh, impl) + _issue_rows(ctx, mesh, impl)


def _f(v, spec):
    return "" if v is None else format(v, spec)


def table(rows: list[dict], title: str):
    """A ``rich`` table of this section's rows."""
    t = Table(title=title, caption="bytes: per device, summed over the compiled module's collectives "
              "(all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute)")
    for c in COLUMNS:
        t.add_column(c)
    for r in rows:
        if "error" in r:
            t.add_row(r["layer"], r["layout"], r["variant"], str(r["devices"]), r["shape"], "error: " + r["error"][:60],
                      *("",) * (len(COLUMNS) - 6))
            continue
        t.add_row(r["layer"], r["layout"], r["variant"], str(r["devices"]), r["shape"], str(r["collectives"]),
                  _f(r["bytes"], ","), _f(r.get("bf16_bytes"), ","), _f(r.get("weight_bytes"), ","),
                  _f(r.get("ms"), ".3f"), _f(r.get("bf16_ms"), ".3f"))
    return t
