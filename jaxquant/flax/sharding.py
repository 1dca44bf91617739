"""Sharding annotations through quantization: the float kernel's axis names, mapped onto ``W [N, K]``.

A Flax kernel annotated for sharding (nnx ``nnx.with_partitioning(init, names)`` / the
``out_sharding`` metadata of an ``nnx.Param``; linen ``nn.with_partitioning`` /
``nn.with_logical_partitioning`` boxes) names one mesh (or logical) axis, or None, per kernel axis.
The quantized layers hold ``W [N, K]`` instead (``jaxquant.flax.geometry``), so each name moves to
the axis of ``W`` that kernel axis is flattened into:

=====================================  =================  ===================================
variable                               shape              axis names
=====================================  =================  ===================================
QAT ``kernel`` / ``bias``              unchanged          unchanged (the float layer's own)
``codes`` (int8)                       ``[N, K]``         ``(n, k)``
``codes`` (int4, two per byte along K) ``[N, K // 2]``    ``(n, k)``: byte ``j`` holds codes
                                                          ``2j, 2j + 1``, so a K block of the
                                                          bytes is the same K block of codes
``w_scale`` / ``w_zero_point``         ``[N]``            ``(n,)``
  (per channel; QAT learnable too)
``w_scale`` / ``w_zero_point``         ``[N, K // g]``    ``(n, k)``
  (groups of ``g``)
=====================================  =================  ===================================

with ``n`` / ``k`` the names of the kernel axes kept / contracted: for ``nnx.Linear`` /
``nn.Dense`` (kernel ``[K, N]``) the kernel's ``(k, n)`` names are swapped. Where several kernel
axes flatten into one (``LinearGeneral`` heads ``[E, H, D]`` -> N = H * D), the flat axis takes the
name of the group's one sharded axis when every axis before it in the group has size 1: a block
of ``H / m`` heads is a contiguous block of N. Any other sharding of a flattened group (an axis
sharded under a major axis of size > 1, two sharded axes) is not a block sharding of the flat
axis: that axis of ``W`` is left unsharded, with a ``QuantizationWarning``. Logical names that
the logical axis rules map to no mesh axis count as unsharded.

Names are carried as they are: mesh axis names, or logical names resolved later by the same
rules as the kernel's (nnx ``sharding_rules`` metadata, linen ``LogicallyPartitioned.rules`` /
``nn.logical_axis_rules``). nnx: where the kernel's array is placed on a mesh (a
``NamedSharding``; abstract: a ``ShapeDtypeStruct`` with one; traced under ``jax.set_mesh``), the
new arrays are placed on it with their mapped specs. The conversion itself runs with the
sharding left to XLA on meshes of explicit sharding types (``call_auto_typed``, ``explicit_context``):
grouping ``W`` splits its K axis, which explicit sharding types do not infer.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
from jax.sharding import NamedSharding, PartitionSpec
from flax import nnx
from flax.core import meta as flax_meta
from flax.core import spmd as core_spmd

from jaxquant.flax.config import QuantConfig
from jaxquant.flax.geometry import Geometry
from jaxquant.flax.rules import QuantizationWarning

__all__ = ["weight_axes", "codes_axes", "qparam_axes", "kernel_axes", "annotated", "annotate_layer", "linen_box",
           "call_auto_typed", "explicit_context"]

#: nnx metadata keys copied from the float kernel onto the variables that replace it.
_COPIED = ("sharding_rules", "mesh")


def _resolver(rules, unmapped_replicated: bool):
    """Name -> what it shards over: the identity without logical rules; with ``(logical, mesh)``
    rules the first rule's mesh axes, and for a name no rule maps None (linen: replicated) or the
    name itself (nnx: taken as a mesh axis), as Flax resolves them."""
    if not rules:
        return lambda name: name
    table = {}
    for logical, mesh in rules:
        table.setdefault(logical, mesh)
    if unmapped_replicated:
        return lambda name: table.get(name) if isinstance(name, str) else name
    return lambda name: table.get(name, name) if isinstance(name, str) else name


def _flat_entry(entries, sizes, what: str, path: str, resolve):
    """The name of a flattened group of kernel axes (module docstring), or None with a warning."""
    if len(entries) == 1:
        return entries[0]
    sharded = [i for i, e in enumerate(entries) if e is not None and resolve(e) is not None]
    if not sharded:
        return None
    if len(sharded) == 1 and all(sizes[i] == 1 for i in range(sharded[0])):
        return entries[sharded[0]]
    warnings.warn(f"quantize: layer {path!r}: the kernel axes named {tuple(entries)} (sizes {tuple(sizes)}) "
                  f"flatten into {what} of the quantized weight, and that sharding is not a block sharding of "
                  f"the flat axis (an axis is sharded after a major axis of size > 1; for logical names, pass "
                  f"the logical axis rules so that unsharded names are known): {what} is left unsharded",
                  QuantizationWarning, stacklevel=6)
    return None


def weight_axes(geometry: Geometry, names, path: str = "", rules=None, *, unmapped_replicated=False) -> tuple:
    """``(n, k)``: the names of ``W [N, K]``'s axes from the kernel's per-axis ``names``.
    ``rules``: logical axis rules ``[(logical, mesh axes)]`` the names resolve by, if any
    (``unmapped_replicated``: a name no rule maps is unsharded, as in linen)."""
    names = tuple(names)
    if len(names) != len(geometry.kernel_shape):
        raise ValueError(f"layer {path!r}: the kernel's sharding names {names} do not match its rank "
                         f"{len(geometry.kernel_shape)} (shape {geometry.kernel_shape})")
    resolve = _resolver(rules, unmapped_replicated)
    pick = lambda dims, what: _flat_entry([names[d] for d in dims], [geometry.kernel_shape[d] for d in dims],
                                          what, path, resolve)
    return pick(geometry.out_dims, "N (output channels)"), pick(geometry.in_dims, "K (inputs)")


def codes_axes(config: QuantConfig, n, k) -> tuple:
    """Names of ``codes``: ``[N, K]`` int8 or ``[N, K // 2]`` packed int4 (pairs along K)."""
    del config
    return (n, k)


def qparam_axes(config: QuantConfig, n, k) -> tuple:
    """Names of ``w_scale`` / ``w_zero_point``: ``(n,)`` per channel, ``(n, k)`` per group or fp8 block."""
    return (n,) if config.group_size is None and config.block_size is None else (n, k)


# ------------------------------------------------------------------------------------------
# nnx
# ------------------------------------------------------------------------------------------
def kernel_axes(variable) -> tuple | None:
    """The ``out_sharding`` names of an nnx variable (None when it has none)."""
    if variable is None:
        return None
    names = variable.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


def _mesh_of(value):
    sharding = getattr(value, "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _place(value, like_value, spec: PartitionSpec):
    """``value`` on the kernel's mesh with ``spec``: concrete arrays by ``device_put``, abstract ones
    (``ShapeDtypeStruct``) by their ``sharding``, traced ones (inside ``nnx.eval_shape`` / ``jit``
    under a mesh) by a sharding constraint. Unchanged where the kernel is not on a mesh."""
    if isinstance(value, jax.ShapeDtypeStruct):
        mesh = _mesh_of(like_value)
        return value if mesh is None else jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                               sharding=NamedSharding(mesh, spec))
    if isinstance(value, jax.core.Tracer):
        mesh = flax_meta.get_global_mesh()
        if mesh is None or not mesh.axis_names:
            return value
        if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
            return jax.sharding.reshard(value, NamedSharding(mesh, spec))
        return jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec))
    mesh = _mesh_of(like_value)
    if mesh is None or isinstance(mesh, jax.sharding.AbstractMesh):
        return value
    return jax.device_put(value, NamedSharding(mesh, spec))


def annotated(cls, value, like, names):
    """``cls(value)`` (an ``nnx.Variable`` type) carrying ``names`` as ``out_sharding``, the kernel
    ``like``'s ``sharding_rules`` / ``mesh`` metadata, and placed like it (``_place``). Plain
    ``cls(value)`` when ``like`` has no sharding names.

    The variable is created with ``eager_sharding=False``: its value is placed here, from the
    kernel's own placement, so no mesh context is needed when quantizing."""
    if like is None or kernel_axes(like) is None or names is None:
        return cls(value)
    have = like.get_metadata()
    extra = {k: have[k] for k in _COPIED if k in have}
    var = cls(value, eager_sharding=False, out_sharding=tuple(names), **extra)
    spec = nnx.get_partition_spec(nnx.State({"v": var}))["v"].get_value()
    var.set_value(_place(value, like.get_value(), spec))
    return var


# ------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------
def linen_box(value, like, names):
    """``value`` in a box of the kernel box ``like``'s type (``nn.Partitioned`` /
    ``nn.LogicallyPartitioned``: same mesh and rules) with ``names``; ``value`` itself when ``like``
    is not a partitioning box."""
    if not isinstance(like, flax_meta.Partitioned):
        return value
    return dataclasses.replace(like, value=value, names=tuple(names))


def annotate_layer(layer, kernel, path: str = ""):
    """Give the quantized variables of an nnx ``QATLayer`` / ``QuantizedLayer`` (``codes``,
    ``w_scale``, ``w_zero_point``; a QAT layer's own ``kernel`` and ``bias`` keep theirs) the
    names mapped from the float ``kernel`` variable's (module docstring). Returns ``layer``."""
    names = kernel_axes(kernel)
    if names is None:
        return layer
    rules = core_spmd.composite_rules(core_spmd.get_logical_axis_rules(),
                                      kernel.get_metadata().get("sharding_rules"))
    n, k = weight_axes(layer.geometry, names, path, rules)
    for attr, axes in (("codes", codes_axes), ("w_scale", qparam_axes), ("w_zero_point", qparam_axes)):
        var = getattr(layer, attr, None)
        if isinstance(var, nnx.Variable):
            setattr(layer, attr, annotated(type(var), var.get_value(), kernel, axes(layer.config, n, k)))
    return layer


def _explicit_mesh(a):
    """The concrete mesh of explicit sharding types ``a`` is placed on, or None."""
    sharding = getattr(a, "sharding", None)
    if (isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and isinstance(sharding, NamedSharding)
            and not isinstance(sharding.mesh, jax.sharding.AbstractMesh)
            and any(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)):
        return sharding.mesh
    return None


def call_auto_typed(fn, args):
    """``fn(*args)``; where concrete arrays of ``args`` lie on a mesh of explicit sharding types,
    run with that mesh's axes ``Auto`` (same devices and specs, no copy) and put the results back
    on it with the specs XLA chose.

    Conversion (scales, codes, int4 packing) reshapes ``W [N, K]`` into groups; under explicit
    sharding types a reshape that splits a sharded axis needs its output sharding spelled out, so
    the one-time conversion leaves the sharding to XLA, and ``annotate_layer`` then places the
    results by their mapped specs."""
    meshes = {m for m in map(_explicit_mesh, jax.tree.leaves(args)) if m is not None}
    if not meshes:
        return fn(*args)
    if len(meshes) > 1:
        raise ValueError(f"quantize: the arrays of one layer lie on different meshes: {meshes}")
    mesh = meshes.pop()
    auto = mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    moved = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(auto, a.sharding.spec))
                         if _explicit_mesh(a) is not None else a, args)
    with jax.set_mesh(auto):
        out = fn(*moved)
    back = lambda a: (jax.device_put(a, NamedSharding(mesh, a.sharding.spec))
                      if isinstance(getattr(a, "sharding", None), NamedSharding) else a)
    return jax.tree.map(back, out)


def explicit_context(tree) -> bool:
    """Whether ``tree`` holds tracers under a mesh context of explicit sharding types (inside
    ``nnx.eval_shape`` / ``jit`` under ``jax.set_mesh``): conversion then runs in
    ``jax.sharding.auto_axes`` (replicated results, placed by ``annotate_layer``)."""
    mesh = jax.sharding.get_abstract_mesh()
    return (bool(mesh.axis_names) and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
            and any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree)))
