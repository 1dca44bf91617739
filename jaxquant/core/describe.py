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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from jaxquant.core import device
from jaxquant.core.primitive import REGISTRY, platform_of

__all__ = ["describe", "Description", "OpReport"]


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
class Description:
    device_kind: str | None
    platform: str
    ops: tuple[OpReport, ...]

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(k for op in self.ops for k in op.kernels)

    @property
    def workspace_bytes(self) -> int:
        return sum(op.workspace_bytes for op in self.ops)

    def __str__(self) -> str:
        head = f"jaxquant on {self.device_kind or 'CPU'} ({self.platform}): {len(self.ops)} op(s)"
        return "\n".join([head] + ["  " + op.line() for op in self.ops])


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
    jaxpr = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr
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
    return Description(kind, platform, tuple(reports))
