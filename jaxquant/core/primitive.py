"""The primitive factory: every jaxquant op is one ``Op``.

An ``Op`` is a named JAX primitive built from four functions the op family writes::

    abstract_eval(**avals, **params)             -> ShapedArray(s)     shapes and dtypes out
    reference(**arrays, **params)                -> array(s)           the plain-jnp spec
    dispatch(avals, params, *, device_kind,      -> Choice             which kernel and config,
             interpret)                                                 decided once per call
    kernel(choice, **arrays, **params)           -> array(s)           runs the chosen kernel(s)

and a declaration of its operands (``Operand(name, role, optional)``). Written once here:

* registration, the eager implementation (one cached ``jax.jit`` per set of params) and
  abstract evaluation;
* the lowering on each platform: ``backend.resolve`` picks the reference, the kernels or the
  kernels in Pallas interpret mode, ``dispatch`` picks the kernel and its config (a
  ``Choice``), and ``jax.interpreters.mlir.lower_fun`` lowers the chosen function;
* batching by operand role (``vmap``): ``MAIN`` operands move their batch axis to the front
  (an unbatched one is broadcast), ``PARAM`` operands too (an unbatched one gets a size-1
  axis, so it broadcasts), and when a ``WEIGHT`` operand is batched the op maps over the batch
  (``lax.map``). The batched op is the same op on operands with one more leading axis, so the
  op's functions must accept any number of leading axes on ``MAIN`` operands;
* sharding: ``sharding(avals, params) -> jaxquant.core.sharding.Rule`` (the op's factors, per
  call) makes the op partition under a multi-device ``jax.jit`` like the jnp op it replaces:
  the lowering wraps the chosen implementation in ``custom_partitioning`` with that rule, and
  each device runs the primitive on its shards (``jaxquant.core.sharding``). The rule is applied
  at lowering, after ``vmap`` / ``grad`` have acted on the primitive itself, so every transform
  sees an ordinary primitive.

Operands are passed by name; an optional operand may be None (it is then not an operand of
the bound primitive, and the functions receive None). Params must be hashable; ``impl``
(``jaxquant.implementation``) and ``config`` (an explicit kernel config or None) are params of
every op.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jaxquant.core import backend, device, sharding as sharding_lib

__all__ = ["MAIN", "PARAM", "WEIGHT", "Operand", "Choice", "Op", "REGISTRY", "platform_of"]

MAIN, PARAM, WEIGHT = "main", "param", "weight"
PLATFORMS = ("cpu", "cuda")
REGISTRY: dict[str, "Op"] = {}  # primitive name -> Op (jaxquant.describe looks ops up here)


@dataclasses.dataclass(frozen=True)
class Operand:
    name: str
    role: str = MAIN
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs for one call: ``implementation`` is ``"reference"`` (XLA), ``"triton"`` (Pallas
    Triton) or ``"mosaic_gpu"``; ``kernels`` the ``pallas_call`` names in launch order; ``config``
    the kernel config(s); ``workspace_bytes`` the device memory the kernels allocate besides the
    operands and results (e.g. split-K partial sums)."""

    implementation: str
    config: Any = None
    kernels: tuple[str, ...] = ()
    interpret: bool = False
    workspace_bytes: int = 0
    variant: str = ""  # a family-specific variant (W8A8: "fused" quantizes x inside the GEMM)


REFERENCE = Choice("reference")


def platform_of(device_kind) -> str:
    return "cuda" if device_kind else "cpu"


class Op:
    """One primitive (see the module docstring)."""

    def __init__(self, name: str, operands, *, abstract_eval: Callable, reference: Callable, kernel: Callable,
                 dispatch: Callable, precision: str, multiple_results: bool = False, sharding=None):
        self.name = name
        self.operands = tuple(operands)
        self.abstract_eval = abstract_eval
        self.reference = reference
        self.kernel = kernel
        self.dispatch = dispatch
        self.precision = precision
        self.sharding = sharding
        self.p = Primitive(name)
        self.p.multiple_results = multiple_results
        self._register()
        REGISTRY[name] = self

    # -- binding -----------------------------------------------------------------------------
    def __call__(self, *arrays, **params):
        """Bind on ``arrays`` (one per declared operand, None for an absent optional one)."""
        if len(arrays) != len(self.operands):
            raise TypeError(f"{self.name}: expected {len(self.operands)} operands, got {len(arrays)}")
        present = tuple(a is not None for a in arrays)
        for spec, a in zip(self.operands, arrays):
            if a is None and not spec.optional:
                raise TypeError(f"{self.name}: operand {spec.name} is required")
        args = [a for a in arrays if a is not None]
        return self.p.bind(*args, **dict(params, present=present))

    def named(self, args, present):
        """``{operand name: array or None}`` from the bound operands."""
        it = iter(args)
        return {spec.name: (next(it) if here else None) for spec, here in zip(self.operands, present)}

    def _split(self, params):
        params = dict(params)
        return params.pop("present"), params

    # -- what runs ---------------------------------------------------------------------------
    def choose(self, avals, params, *, platform: str, device_kind) -> Choice:
        """The ``Choice`` for named ``avals`` and ``params`` lowered for ``platform``."""
        flat = [a for a in avals.values() if a is not None]
        outs = self.abstract_eval(**avals, **params)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        use = backend.resolve(params["impl"], platform, (*flat, *outs))
        if use == "reference":
            return REFERENCE
        return self.dispatch(avals, params, device_kind=None if use == "interpret" else device_kind,
                             interpret=use == "interpret")

    def run(self, choice: Choice, arrays, params):
        """The function a ``Choice`` lowers to, applied to named ``arrays``."""
        if choice.implementation == "reference":
            return self.reference(**arrays, **params)
        return self.kernel(choice, **arrays, **params)

    # -- registration ------------------------------------------------------------------------
    def _register(self):
        p = self.p

        @functools.lru_cache(maxsize=None)
        def jitted(**params):
            return jax.jit(lambda *a: p.bind(*a, **params))

        p.def_impl(lambda *args, **params: jitted(**params)(*args))
        p.def_abstract_eval(self._abstract)
        for platform in PLATFORMS:
            mlir.register_lowering(p, self._lowering(platform), platform=platform)
        batching.primitive_batchers[p] = self._batch
        if self.sharding is not None:
            sharding_lib.register(p)

    def _abstract(self, *avals, **params):
        present, params = self._split(params)
        return self.abstract_eval(**self.named(avals, present), **params)

    def _lowering(self, platform):
        def rule(ctx, *args, **params):
            present, op_params = self._split(params)
            avals = self.named(ctx.avals_in, present)
            kind = device.device_kind() if platform == "cuda" else None
            choice = self.choose(avals, op_params, platform=platform, device_kind=kind)

            def fn(*a):
                return self.run(choice, self.named(a, present), op_params)

            # Under a mesh with Explicit axes the avals carry shardings, which pallas_call refuses;
            # the op's operands are whole arrays here (custom_partitioning splits them).
            ctx = ctx.replace(avals_in=[sharding_lib.unsharded(a) for a in ctx.avals_in],
                              avals_out=[sharding_lib.unsharded(a) for a in ctx.avals_out])
            if self.sharding is not None and sharding_lib.may_partition(ctx.module_context.axis_context):
                fn = sharding_lib.partitioned(self, params, tuple(ctx.avals_in), fn, platform, choice)
                if self.p.multiple_results:
                    return mlir.lower_fun(lambda *a: list(fn(*a)), multiple_results=True)(ctx, *args)
            return mlir.lower_fun(fn, multiple_results=self.p.multiple_results)(ctx, *args)

        return rule

    def _batch(self, args, dims, **params):
        present = params["present"]
        specs = [s for s, here in zip(self.operands, present) if here]
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if any(s.role == WEIGHT and d is not None for s, d in zip(specs, dims)):
            moved = [jnp.broadcast_to(a[None], (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
                     for a, d in zip(args, dims)]
            out = jax.lax.map(lambda t: self.p.bind(*t, **params), tuple(moved))
        else:
            new = []
            for s, a, d in zip(specs, args, dims):
                if d is not None:
                    a = jnp.moveaxis(a, d, 0)
                elif s.role == MAIN:  # every batch element sees the same operand
                    a = jnp.broadcast_to(a[None], (size,) + a.shape)
                elif s.role == PARAM:  # shared along the new axis: a size-1 axis broadcasts
                    a = a[None]
                new.append(a)
            out = self.p.bind(*new, **params)
        return out, ((0,) * len(out) if self.p.multiple_results else 0)
