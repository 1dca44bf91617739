"""Sharding rules: every jaxquant op partitions under ``jax.jit`` like the jnp op it replaces.

A ``pallas_call`` (a custom call on the GPU) is opaque to XLA's partitioner: on sharded operands
XLA would gather them and run the kernel on whole arrays on every device. Each op therefore
declares, per call, a ``Rule`` in a small vocabulary of *factors* (a name per operand and result
dimension, built from the operand shapes), and the factory (``jaxquant.core.primitive``) lowers
the op through ``jax.experimental.custom_partitioning`` with it:

* the rule is handed to Shardy (``SdyShardingRule``) so sharding propagates through the op like
  through an einsum;
* at partitioning time ``partition`` reads the operand shardings XLA chose, assigns mesh axes to
  factors (largest operand first: where two operands want one mesh axis for different factors,
  the larger keeps its layout and the smaller moves; a factor whose dimensions do not divide by
  its mesh axes, or that the rule keeps ``replicated``, stays whole on every device and XLA moves
  its data), and returns the per-shard function;
* the per-shard function binds the same primitive on the local shapes (so the same kernel runs per
  shard, chosen by ``dispatch`` for the shard's shape), or the rule's ``per_shard`` function when a
  sharded factor needs a collective (a row statistic, an int32 / float32 partial sum).

Vocabulary (``Rule``):

============  ====================================================================================
operands      ``{operand name: factor per dimension}`` (absent optional operands are skipped)
results       a factor per dimension of each result
reduction     factors summed / reduced by the per-shard function when sharded (a collective
              inside the op; Shardy is told they are reduction factors)
replicated    factors the op cannot split (kept whole; Shardy: need-replication factors)
per_shard     ``per_shard(shard, arrays, params)``: the local computation when the default (bind
              the primitive on the shards) is not enough; ``shard`` (``Shard``) names the mesh axes
              of each factor and offers ``psum`` / ``pmax`` over them
check         ``check(uneven, mesh)``: raises for a layout the op cannot serve (``uneven``: the
              factors whose requested mesh axes do not divide their dimensions)
pin           ``pin(choice, local_avals) -> config or None``: the kernel config the shards run when
              the caller gave none (the one-device choice, for an op whose float summation order
              depends on the config: the shards then sum in the one-device order)
============  ====================================================================================

A factor may label dimensions of different sizes (e.g. ``K`` of x, ``K // 2`` of packed int4
codes, ``K // group`` of the scales): splitting it over ``n`` devices splits each of them into
``n`` equal blocks, which keeps codes, scales and activations aligned iff every size divides by
``n``. A dimension of size 1 that broadcasts (a per-tensor scale) gets a factor of its own.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from typing import Any, Callable

import numpy as np
import jax
from jax._src import dispatch as _dispatch  # prim_requires_devices_during_lowering: not exported publicly
from jax.experimental.custom_partitioning import ArrayMapping, CompoundFactor, SdyShardingRule, custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["Rule", "Shard", "Partition", "broadcast_factors", "leading", "may_partition", "partitioned",
           "shardy_rule", "register", "recording"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one call of an op partitions (see the module docstring)."""

    operands: dict[str, tuple[str, ...]]
    results: tuple[tuple[str, ...], ...]
    reduction: tuple[str, ...] = ()
    replicated: tuple[str, ...] = ()
    per_shard: Callable | None = None
    check: Callable | None = None
    pin: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Shard:
    """The layout one per-shard function runs under: ``axes[factor]`` is the tuple of mesh axis
    names the factor is split over (``()``: whole on every device)."""

    mesh: Any
    axes: dict[str, tuple[str, ...]]

    def split(self, *factors) -> tuple[str, ...]:
        """The mesh axes the ``factors`` are split over (empty when none is)."""
        return tuple(a for f in factors for a in self.axes.get(f, ()))

    def psum(self, v, *factors):
        axes = self.split(*factors)
        return jax.lax.psum(v, axes) if axes else v

    def pmax(self, v, *factors):
        axes = self.split(*factors)
        return jax.lax.pmax(v, axes) if axes else v


@dataclasses.dataclass(frozen=True)
class Partition:
    """How XLA partitioned one op (recorded for ``jaxquant.describe``): the operand and result
    layouts, the per-shard operand shapes and the per-shard program (``jaxpr``: the kernels and the
    collectives each device runs)."""

    op: str
    in_specs: tuple
    out_specs: tuple
    local: tuple  # jax.ShapeDtypeStruct per operand, per device
    jaxpr: Any


_RECORDS: list | None = None


@contextlib.contextmanager
def recording():
    """Collect a ``Partition`` for every op partitioned while compiling inside the block."""
    global _RECORDS
    saved, _RECORDS = _RECORDS, []
    try:
        yield _RECORDS
    finally:
        _RECORDS = saved


# ------------------------------------------------------------------------------------------
# Building rules from shapes
# ------------------------------------------------------------------------------------------


def leading(prefix: str, n: int) -> tuple[str, ...]:
    """``n`` factor names ``prefix0 .. prefix{n-1}``."""
    return tuple(f"{prefix}{i}" for i in range(n))


def broadcast_factors(main_factors, main_shape, shape, tag: str) -> tuple[str, ...]:
    """Factors of a broadcast-form operand (every dimension 1 or the main operand's, aligned to
    the right): a dimension equal to the main one shares its factor, a broadcast one (size 1 where
    the main operand's is not) gets a factor of its own (``tag`` + position)."""
    off = len(main_shape) - len(shape)
    out = []
    for i, d in enumerate(shape):
        j = i + off
        out.append(main_factors[j] if j >= 0 and d == main_shape[j] else f"{tag}{i}")
    return tuple(out)


def _sizes(rule: Rule, avals, outs) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    for name, dims in rule.operands.items():
        for f, d in zip(dims, avals[name].shape):
            sizes.setdefault(f, []).append(int(d))
    for dims, o in zip(rule.results, outs):
        for f, d in zip(dims, o.shape):
            sizes.setdefault(f, []).append(int(d))
    return sizes


def shardy_rule(rule: Rule, avals, outs) -> SdyShardingRule:
    """The ``SdyShardingRule`` of ``rule`` for operands ``avals`` and results ``outs``.

    A factor labelling dimensions of different sizes is written as the smallest of them; a larger
    dimension becomes the compound factor ``(factor, factor_r<size ratio>)`` whose minor part stays
    whole (a need-replication factor): Shardy then splits codes, scales and activations together.
    (Where the smallest is 1, e.g. one group per row, the larger dimension is the minor factor alone.)
    """
    sizes = _sizes(rule, avals, outs)
    base = {f: min(s) for f, s in sizes.items()}
    extra: dict[str, int] = {}  # compound factors' minor parts: their sizes
    minor: list[str] = []

    def mapping(dims, shape):
        out = []
        for f, d in zip(dims, shape):
            if d == base[f] or base[f] == 0:
                out.append(f)
            else:
                inner = f"{f}_r{d // base[f]}"
                minor.append(inner)
                if base[f] == 1:  # Shardy refuses a size-1 factor in a compound one (it splits
                    out.append(inner)  # nothing): the dimension is the whole minor factor alone
                else:
                    extra[inner] = d // base[f]
                    out.append(CompoundFactor(f, inner))
        return ArrayMapping(*out)

    operands = tuple(mapping(dims, avals[n].shape) for n, dims in rule.operands.items())
    results = tuple(mapping(dims, o.shape) for dims, o in zip(rule.results, outs))
    in_results = {f for dims in rule.results for f in dims}
    reduction = tuple(f for f in rule.reduction if f not in in_results)  # Shardy: absent from results
    singles = tuple(f for f, b in base.items() if b == 1 and f not in rule.reduction)
    replicated = tuple(dict.fromkeys(rule.replicated + tuple(minor) + singles))
    replicated = tuple(f for f in replicated if f not in rule.reduction)
    # Shardy numbers factors in order of appearance and wants each special set sorted by number
    order = {}
    for m in operands + results:
        for d in m:
            for f in (d if isinstance(d, CompoundFactor) else (d,)):
                order.setdefault(f, len(order))
    reduction, replicated = (tuple(sorted(fs, key=order.__getitem__)) for fs in (reduction, replicated))
    return SdyShardingRule(operands, results, reduction_factors=reduction, need_replication_factors=replicated,
                           **extra)


# ------------------------------------------------------------------------------------------
# Partitioning
# ------------------------------------------------------------------------------------------


def _spec_axes(spec, ndim) -> list[tuple[str, ...]]:
    entries = list(spec) + [None] * (ndim - len(spec))
    return [() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in entries[:ndim]]


def assign(rule: Rule, mesh, arg_specs, result_specs, sizes, operand_bytes=None):
    """Mesh axes per factor from the operand (then result) shardings XLA proposes.

    Operands are read largest first (``operand_bytes``: the bytes of all operands of the same role,
    e.g. a weight's codes and scales together; ties: declaration order): where two
    operands split different factors over the same mesh axis (FSDP: tokens and the weight's rows
    over one axis), the larger one keeps its layout and the smaller one is moved, as XLA does for
    a dot: at decode the activations move and the weight stays; at prefill the weight's codes and
    scales move (never dequantized floats).

    Returns ``(axes, uneven)``: ``axes[factor]`` the mesh axes it is split over; ``uneven`` the
    factors whose proposed axes do not divide every dimension they label (kept whole).
    """
    axes: dict[str, tuple[str, ...]] = {}
    uneven: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    ops = list(zip(rule.operands.values(), arg_specs))
    if operand_bytes is not None:
        order = sorted(range(len(ops)), key=lambda i: -operand_bytes[i])
        ops = [ops[i] for i in order]
    for dims, spec in ops + list(zip(rule.results, result_specs)):
        for f, names in zip(dims, _spec_axes(spec, len(dims))):
            if not names or f in axes or f in rule.replicated or used & set(names):
                continue
            n = math.prod(mesh.shape[a] for a in names)
            if any(s % n for s in sizes[f]):
                uneven.setdefault(f, names)
                continue
            axes[f] = names
            used |= set(names)
    return axes, {f: a for f, a in uneven.items() if f not in axes}


def _named(mesh, dims, axes) -> NamedSharding:
    entries = []
    for f in dims:
        a = axes.get(f, ())
        entries.append(None if not a else (a[0] if len(a) == 1 else a))
    return NamedSharding(mesh, P(*entries))


def _mesh_of(arg_shapes, mesh):
    """The mesh the shardings name; a one-axis mesh over the devices when they name none."""
    for a in arg_shapes:
        if isinstance(a.sharding, NamedSharding):
            return a.sharding.mesh, True
    if mesh is not None and not getattr(mesh, "empty", True):
        return mesh, True
    devices = sorted(arg_shapes[0].sharding.device_set, key=lambda d: d.id)
    return Mesh(np.array(devices), ("_jaxquant",)), False


def unsharded(aval):
    """``aval`` without a sharding in its type (Explicit mesh axes put one there)."""
    return jax.core.ShapedArray(aval.shape, aval.dtype, weak_type=aval.weak_type)


def may_partition(axis_context) -> bool:
    """Whether a lowering under ``axis_context`` can be partitioned (more than one device, not
    inside a fully manual ``shard_map``); else the op lowers as on one device."""
    n = getattr(axis_context, "num_devices", None)
    if n is not None:
        return n > 1
    mesh = getattr(axis_context, "mesh", None)
    manual = getattr(axis_context, "manual_axes", None)
    if mesh is None or manual is None:
        return False
    return set(manual) != set(mesh.axis_names) and mesh.size > 1


def partitioned(op, params: dict, avals: tuple, whole: Callable, platform: str, choice=None):
    """The function the op lowers to under a multi-device ``jax.jit``: ``whole`` (the op's lowering
    on whole arrays, ``choice`` its kernel choice) wrapped in ``custom_partitioning`` with the op's
    rule for these ``avals``.

    Cached per (op, params, operand shapes and dtypes, platform); ``whole`` must be determined by them.
    """
    key = (op.name, tuple(sorted(params.items())), tuple((a.shape, a.dtype) for a in avals), platform)
    return _build(key, op, whole, choice)


_CACHE: collections.OrderedDict = collections.OrderedDict()  # key of ``partitioned`` -> function
_CACHE_SIZE = 1024


def _role_bytes(op, rule, named) -> list[int]:
    """Per operand, the bytes of all operands of its role (a weight: codes + scales + ...)."""
    roles = {spec.name: spec.role for spec in op.operands}
    total: dict[str, int] = {}
    for n in rule.operands:
        total[roles[n]] = total.get(roles[n], 0) + math.prod(named[n].shape) * named[n].dtype.itemsize
    return [total[roles[n]] for n in rule.operands]


def _build(key, op, whole, choice):
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    _, items, shapes, _ = key
    params = dict(items)
    present = params["present"]
    op_params = {k: v for k, v in params.items() if k != "present"}
    avals_list = [jax.core.ShapedArray(s, d) for s, d in shapes]
    named = op.named(avals_list, present)
    outs = op.abstract_eval(**named, **op_params)
    outs = tuple(outs) if op.p.multiple_results else (outs,)
    rule = op.sharding(named, op_params)
    present_names = [n for n, a in named.items() if a is not None]
    if list(rule.operands) != present_names:
        raise AssertionError(f"{op.name}: sharding rule names {list(rule.operands)}, operands are {present_names}")
    sizes = _sizes(rule, named, outs)
    operand_bytes = _role_bytes(op, rule, named)
    multiple = op.p.multiple_results

    @custom_partitioning
    def fn(*args):
        out = whole(*args)
        return tuple(out) if multiple else out

    def partition(mesh, arg_shapes, result_shape):
        mesh, has_names = _mesh_of(arg_shapes, mesh)
        results = tuple(result_shape) if multiple else (result_shape,)
        arg_specs = [a.sharding.spec if has_names and isinstance(a.sharding, NamedSharding) else P()
                     for a in arg_shapes]
        res_specs = [r.sharding.spec if has_names and isinstance(r.sharding, NamedSharding) else P()
                     for r in results]
        axes, uneven = assign(rule, mesh, arg_specs, res_specs, sizes, operand_bytes)
        if uneven and rule.check is not None:
            rule.check(uneven, mesh)
        shard = Shard(mesh, axes)
        in_sh = tuple(_named(mesh, dims, axes) for dims in rule.operands.values())
        out_sh = tuple(_named(mesh, dims, axes) for dims in rule.results)

        def local(*args):
            arrays = op.named(args, present)
            if rule.per_shard is not None and any(axes.get(f) for f in rule.reduction):
                out = rule.per_shard(shard, arrays, op_params)
            else:
                p = params
                if rule.pin is not None and params["config"] is None and choice is not None:
                    p = dict(params, config=rule.pin(choice, {k: None if a is None else jax.typeof(a)
                                                              for k, a in arrays.items()}))
                out = op.p.bind(*args, **p)
            return tuple(out) if multiple else out

        if _RECORDS is not None:
            shapes = [jax.ShapeDtypeStruct(sh.shard_shape(a.shape), a.dtype) for sh, a in zip(in_sh, arg_shapes)]
            jaxpr = jax.make_jaxpr(local, axis_env=list(mesh.shape.items()))(*shapes)
            _RECORDS.append(Partition(op.name, tuple(s.spec for s in in_sh), tuple(s.spec for s in out_sh),
                                      tuple(shapes), jaxpr))
        return mesh, local, (out_sh if multiple else out_sh[0]), in_sh

    fn.def_partition(partition=partition, sharding_rule=shardy_rule(rule, named, outs))
    _CACHE[key] = fn
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fn


def register(primitive):
    """Let ``primitive``'s lowering see the devices (``custom_partitioning`` needs them to build the
    mesh); jax's registry of such primitives is shared by jax 0.10 and 0.11."""
    _dispatch.prim_requires_devices_during_lowering.add(primitive)
