"""``jaxquant.describe``: what a call would run, without running it.

``describe(fn, *args, device_kind=None, **kwargs)`` traces ``fn(*args, **kwargs)`` abstractly
(``jax.make_jaxpr``: arguments may be arrays or ``jax.ShapeDtypeStruct``), finds every jaxquant
primitive in the program (inside ``jit``, ``custom_vjp``, ``scan``, ``cond``, ... too) and asks
each op's dispatch function what it would lower to on ``device_kind`` (e.g. ``"NVIDIA H200"``;
default: the visible GPU, or the CPU). Nothing is compiled or executed. Invalid arguments raise
the error the op itself raises.

For each op the report gives the implementation (``reference`` = the plain-jnp reference under
XLA, ``triton``, ``mosaic_gpu``), the kernels (the ``pallas_call`` names, in launch order), the
config, the precision guarantee in words and the extra device memory the kernels allocate
(``workspace_bytes``: e.g. split-K partial sums, the activation codes of W8A8).

Sharded arguments (arrays, or ``jax.ShapeDtypeStruct`` with a ``NamedSharding`` over several
devices): ``fn`` is also compiled (``jax.jit(fn).lower(*args).compile()``, on the devices the
shardings name; nothing runs) and the report adds, per op, the layout XLA chose for its operands
and results, the per-shard operand shapes, the per-shard program (its kernels, described for
``device_kind``, and the collectives the op adds itself: ``psum`` / ``pmax`` over mesh axes), and
for the whole program the collectives of the compiled module (``collectives``: count and bytes per
kind, from ``compile().as_text()``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import numpy as np
import jax

from jaxquant.core import device, sharding
from jaxquant.core.primitive import REGISTRY, platform_of

__all__ = ["describe", "Description", "OpReport", "ShardReport", "collectives", "COLLECTIVES"]

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class OpReport:
    op: str
    implementation: str
    kernels: tuple[str, ...]
    config: Any
    precision: str
    workspace_bytes: int
    operands: tuple[str, ...]

    def line(self) -> str:
        kern = ", ".join(self.kernels) or "-"
        return (f"{self.op}({', '.join(self.operands)}): {self.implementation}; kernels: {kern}; "
                f"config: {self.config}; workspace: {self.workspace_bytes} B; precision: {self.precision}")


@dataclasses.dataclass(frozen=True)
class ShardReport:
    """One op as XLA partitioned it: layouts, per-shard operand shapes, the per-shard kernels
    (``ops``) and the collectives the op itself adds (``reduces``, e.g. ``psum over ('model',)``)."""

    op: str
    in_specs: tuple
    out_specs: tuple
    local: tuple[str, ...]
    ops: tuple[OpReport, ...]
    reduces: tuple[str, ...]

    def line(self) -> str:
        kern = ", ".join(k for o in self.ops for k in o.kernels) or "-"
        impl = ", ".join(dict.fromkeys(o.implementation for o in self.ops)) or "-"
        red = "; ".join(self.reduces) or "none"
        return (f"{self.op}: operands {', '.join(map(str, self.in_specs))} -> {', '.join(map(str, self.out_specs))}; "
                f"per shard: {', '.join(self.local)}; {impl}; kernels: {kern}; collectives in the op: {red}")


@dataclasses.dataclass(frozen=True)
class Description:
    device_kind: str | None
    platform: str
    ops: tuple[OpReport, ...]
    shards: tuple[ShardReport, ...] = ()
    collectives: dict | None = None  # kind -> (count, bytes) of the compiled module; None: not sharded

    @property
    def collective_bytes(self) -> int:
        return sum(b for _, b in (self.collectives or {}).values())

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(k for op in self.ops for k in op.kernels)

    @property
    def workspace_bytes(self) -> int:
        return sum(op.workspace_bytes for op in self.ops)

    def __str__(self) -> str:
        head = f"jaxquant on {self.device_kind or 'CPU'} ({self.platform}): {len(self.ops)} op(s)"
        lines = [head] + ["  " + op.line() for op in self.ops]
        if self.collectives is not None:
            lines.append(f"sharded: {len(self.shards)} partitioned op(s)")
            lines += ["  " + sh.line() for sh in self.shards]
            kinds = ", ".join(f"{k}: {n} ({b} B)" for k, (n, b) in self.collectives.items() if n) or "none"
            lines.append(f"collectives in the compiled module: {kinds}; total {self.collective_bytes} B")
        return "\n".join(lines)


_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
_COLLECTIVE_RE = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _shape_bytes(text) -> list[float]:
    return [_DTYPE_BYTES.get(dt, 0) * math.prod(int(d) for d in dims.split(",") if d)
            for dt, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text)]


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """``{kind: (count, bytes)}`` of the collectives in a compiled module's text
    (``jax.jit(f).lower(*args).compile().as_text()``), kinds ``COLLECTIVES``.

    Bytes are the sizes of the collective's results (per device): an all-gather's gathered
    array, an all-reduce's reduced one. An asynchronous ``-start`` op counts once; of its tuple
    result only the outputs count (an all-gather's or collective-permute's second element).
    """
    out = {k: [0, 0] for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE_RE.search(line)
        if m is None:
            continue
        sizes = _shape_bytes(m.group(1))
        if m.group(3) and m.group(2) in ("all-gather", "collective-permute") and len(sizes) >= 2:
            sizes = [sizes[1]]
        out[m.group(2)][0] += 1
        out[m.group(2)][1] += int(sum(sizes))
    return {k: (n, b) for k, (n, b) in out.items()}


def _subjaxprs(params):
    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn.params):
            yield from _eqns(sub)


def _aval_str(a) -> str:
    return "None" if a is None else f"{a.dtype}{list(a.shape)}"


def describe(fn, *args, device_kind: str | None = None, **kwargs) -> Description:
    """Which implementation, kernels, config, precision and workspace ``fn(*args, **kwargs)`` gets.

    ``device_kind``: a GPU's ``jax.Device.device_kind`` (e.g. ``"NVIDIA H200"``) to describe the
    CUDA lowering there; default: the visible GPU, else the CPU (where the reference runs under
    the default implementation). Returns a ``Description`` (``print`` it for a table).
    """
    kind = device_kind if device_kind is not None else device.device_kind()
    platform = platform_of(kind)
    f = functools.partial(fn, **kwargs)
    jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    reports = _reports(jaxpr, platform, kind)
    if not _sharded(args):
        return Description(kind, platform, reports)
    with sharding.recording() as records:
        text = jax.jit(f).lower(*args).compile().as_text()
    shards = tuple(_shard_report(r, platform, kind) for r in records)
    return Description(kind, platform, reports, shards, collectives(text))


def _reports(jaxpr, platform, kind) -> tuple[OpReport, ...]:
    reports = []
    for eqn in _eqns(jaxpr):
        op = REGISTRY.get(eqn.primitive.name)
        if op is None:
            continue
        present, params = op._split(eqn.params)
        avals = op.named([v.aval for v in eqn.invars], present)
        choice = op.choose(avals, params, platform=platform, device_kind=kind)
        impl = choice.implementation + (" (interpret mode)" if choice.interpret else "")
        if choice.implementation == "reference":
            impl = "reference (XLA)"
        reports.append(OpReport(op.name, impl, choice.kernels, choice.config, op.precision, choice.workspace_bytes,
                                tuple(f"{k}={_aval_str(a)}" for k, a in avals.items() if a is not None)))
    return tuple(reports)


def _sharded(args) -> bool:
    """Whether any argument carries a sharding over more than one device."""
    for leaf in jax.tree.leaves(args):
        sh = getattr(leaf, "sharding", None)
        if sh is not None and len(sh.device_set) > 1:
            return True
    return False


_REDUCTIONS = ("psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute", "reduce_scatter")


def _shard_report(rec: sharding.Partition, platform, kind) -> ShardReport:
    reduces = []
    for eqn in _eqns(rec.jaxpr.jaxpr):
        name = eqn.primitive.name
        if any(name.startswith(r) for r in _REDUCTIONS):
            axes = eqn.params.get("axes", eqn.params.get("axis_name"))
            nbytes = sum(int(np.prod(v.aval.shape)) * np.dtype(v.aval.dtype).itemsize for v in eqn.invars)
            reduces.append(f"{name} over {axes} ({nbytes} B)")
    local = tuple(f"{s.dtype}{list(s.shape)}" for s in rec.local)
    return ShardReport(rec.op, rec.in_specs, rec.out_specs, local, _reports(rec.jaxpr.jaxpr, platform, kind),
                       tuple(reduces))
