"""The timing method of docs/performance.md, shared by every benchmark section.

* Warm up (compile) first. Time ``n`` calls issued back to back, then one ``block_until_ready``;
  report the median over ``repeats`` (>= 5) such runs, per call.
* Rotate several input sets (``args_sets``) when one set would sit in L2 (50-60 MB).
* Each section times, in the same process and run, the op, the plain-jnp version of it under
  ``jax.jit`` and a device copy; it reports ratios. Effective bandwidth counts each input read
  once and each output written once; matmul rate is ``2*M*N*K / time``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Context:
    """What a section needs: device facts, the quick flag and the baseline copy bandwidth."""

    quick: bool
    device: str
    platform: str
    copy_gbps: float = float("nan")
    repeats: int = 5
    progress: Any = None  # a callable(str) reporting what runs now
    log: Any = None  # a callable(str) keeping a finished measurement's line (the run may be cut short)

    def say(self, msg: str):
        if self.progress is not None:
            self.progress(msg)

    def record(self, msg: str):
        """Report a finished measurement: kept in the log (``say`` only shows what runs now)."""
        if self.log is not None:
            self.log(msg)
        else:
            self.say(msg)


def nbytes(*arrays) -> int:
    return int(sum(a.size * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(arrays)))


def timeit(fn: Callable, args_sets: Sequence[tuple], *, repeats: int = 5, min_time: float = 0.05,
           max_calls: int = 200) -> float:
    """Median seconds per call of ``fn`` (already jitted), by the method of docs/performance.md.

    The number of back-to-back calls per repeat is chosen so one repeat lasts ~``min_time``.
    """
    out = fn(*args_sets[0])  # compile + warm up
    jax.block_until_ready(out)
    for a in args_sets[1:]:
        jax.block_until_ready(fn(*a))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args_sets[0]))
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(max_calls, max(len(args_sets), math.ceil(min_time / one))))
    times = []
    for _ in range(max(5, repeats)):
        t0 = time.perf_counter()
        for i in range(n):
            out = fn(*args_sets[i % len(args_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


CHAIN_LAYERS = 4  # the fewest layers in a ``chain`` (one dispatch spread over them)
# A chain streams at least this many bytes of bf16 weights (up to MAX_CHAIN_LAYERS layers): the
# host's dispatch of one jitted call (~80-100 us on the H200 for a 4-layer decode chain) must stay
# below its GPU time. 4096x4096 decode layers (~10 us of kernels each) timed as 4-layer chains were
# host-bound (W8A8 at M = 16: 18.9 us a layer, bf16 13.4 us); 16-layer chains came to their
# kernels' GPU time (10.5 / 12.0 us; per-layer time against chain length 4..32, measured on an
# H200, jax 0.11.2, 2026-11-21), though such ~10 us layers still vary by 10-50% between identical
# runs.
MIN_CHAIN_BYTES = 512 << 20
MAX_CHAIN_LAYERS = 32


def chain_layers(bf16_weight_bytes: int, *, quick: bool = False) -> int:
    """How many layers (distinct weight sets) a ``chain`` of layers with this many bytes of bf16
    weights each needs: ``CHAIN_LAYERS``, or more until the chain streams ``MIN_CHAIN_BYTES``
    (``quick``, the CPU smoke run: ``CHAIN_LAYERS``)."""
    if quick:
        return CHAIN_LAYERS
    want = math.ceil(MIN_CHAIN_BYTES / max(bf16_weight_bytes, 1))
    return max(CHAIN_LAYERS, min(MAX_CHAIN_LAYERS, want))


def chain(f: Callable) -> Callable:
    """``f(xs[i], *ws[i])`` for every layer ``i`` in ONE jitted call, outputs summed: the GPU time per
    layer without the per-call dispatch (at decode ~25 us a call on the H200, more than the kernel).

    Call it with ``(xs, w_0, w_1, ...)``: a tuple of activations and one tuple of weight arguments
    per layer. Every layer needs its own activation and weights: XLA's CSE merges identical layers
    and its dot merger reads a weight shared by several dots once (bf16 looked 2x faster per layer).
    """
    def g(xs, *ws):
        assert len(xs) == len(ws), (len(xs), len(ws))
        return functools.reduce(jnp.add, [f(x, *w) for x, w in zip(xs, ws)])
    return jax.jit(g)


def rotations(make: Callable[[int], tuple], bytes_per_set: int, *, l2_bytes: int = 60 << 20, max_sets: int = 8):
    """Input sets to rotate: one if a set is far larger than L2, else enough to exceed 4x L2."""
    k = 1 if bytes_per_set > 4 * l2_bytes else min(max_sets, max(4, math.ceil(4 * l2_bytes / max(bytes_per_set, 1))))
    return [make(i) for i in range(k)]


def copy_bandwidth(ctx: Context, nbytes_total: int = 1 << 30) -> float:
    """Device copy bandwidth (bytes read + written per second) of a float32 array."""
    n = nbytes_total // 4 if not ctx.quick else (16 << 20) // 4
    x = jnp.arange(n, dtype=jnp.float32)
    # A device copy (XLA emits a copy for a returned non-donated input) and a negate (one read, one
    # write per element); the faster one is the copy bandwidth.
    t = min(timeit(jax.jit(lambda a: a.copy()), [(x,)], repeats=ctx.repeats),
            timeit(jax.jit(lambda a: -a), [(x,)], repeats=ctx.repeats))
    return 2 * x.size * 4 / t / 1e9


def make_context(quick: bool) -> Context:
    d = jax.devices()[0]
    return Context(quick=quick, device=getattr(d, "device_kind", str(d)), platform=d.platform)


def metadata(ctx: Context, extra: dict | None = None) -> dict:
    import jaxlib
    meta = {
        "device": ctx.device,
        "platform": ctx.platform,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": ctx.copy_gbps,
        "quick": ctx.quick,
        "method": ("median of >=5 repeats of n back-to-back calls + one block_until_ready"
                   " (docs/performance.md)"),
    }
    meta.update(extra or {})
    return meta


def results_path(path_dir: str, ctx: Context) -> str:
    """``path_dir/bench-<device>-<UTC time>.json``."""
    dev = "".join(c if c.isalnum() else "-" for c in ctx.device).strip("-").lower()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join(path_dir, f"bench-{dev}-{stamp}.json")


def write_results(path_dir: str, ctx: Context, rows: list[dict], extra: dict | None = None,
                  path: str | None = None) -> str:
    """Write ``{"meta", "rows"}`` to ``path`` (default: a new ``results_path``); returns the path."""
    os.makedirs(path_dir, exist_ok=True)
    path = path or results_path(path_dir, ctx)
    with open(path, "w") as f:
        json.dump({"meta": metadata(ctx, extra), "rows": rows}, f, indent=1, default=str)
    return path
