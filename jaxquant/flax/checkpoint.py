"""Checkpoints that know their quantization: ``save_checkpoint`` / ``restore_checkpoint`` (orbax).

A checkpoint is a directory holding the model state (``state/``, orbax ``StandardCheckpointer``)
and ``jaxquant.json``: for every quantizable layer, its path, kind, state (float / qat / served)
and ``QuantConfig``. Restoring compares that record with the target model's layers first, so a
W8A8 checkpoint never loads into a W8A16 model (same array shapes, different math): the error
names each layer that differs.

The target need not hold real weights: build it abstractly and restore into it, so the float
weights are never materialised::

    abstract = nnx.eval_shape(lambda: quantize(Model(rngs=nnx.Rngs(0)), rules))
    model = restore_checkpoint(path, abstract)

Sharded: ``restore_checkpoint(path, abstract, mesh=mesh)`` places each array by the model's
partition specs (the float kernels' annotations, carried onto codes and scales by ``quantize``).
"""

from __future__ import annotations

import json
import pathlib

import jax
from jax.sharding import NamedSharding
import orbax.checkpoint as ocp
from flax import nnx

from jaxquant.flax.config import QuantConfig
from jaxquant.flax.summary import summary

__all__ = ["save_checkpoint", "restore_checkpoint", "layer_records", "METADATA"]

#: Name of the per-layer record inside a checkpoint directory.
METADATA = "jaxquant.json"


def layer_records(model: nnx.Module) -> dict[str, dict]:
    """``{path: {"kind", "state", "config"}}`` of every quantizable layer (``config`` None: float)."""
    return {r.path: {"kind": r.kind, "state": r.state, "config": None if r.config is None else r.config.to_dict()}
            for r in summary(model).rows}


def save_checkpoint(path, model: nnx.Module) -> pathlib.Path:
    """Save ``nnx.state(model)`` and its layer record to the new directory ``path``; returns it."""
    path = pathlib.Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"save_checkpoint: {path} exists; pick a new directory")
    path.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path / "state", nnx.state(model))
    (path / METADATA).write_text(json.dumps({"layers": layer_records(model)}, indent=1, sort_keys=True))
    return path


def _describe(rec) -> str:
    if rec is None:
        return "no such layer"
    cfg = rec["config"]
    return f"{rec['kind']} {rec['state']}" + ("" if cfg is None else " " + _config_name(cfg))


def _config_name(cfg: dict) -> str:
    return str(QuantConfig(**cfg))


def _normalised(rec: dict) -> dict:
    """A saved layer record with its config rebuilt: fields added to ``QuantConfig`` after the
    checkpoint was written get their defaults, so older checkpoints compare equal."""
    cfg = rec.get("config")
    return rec if cfg is None else {**rec, "config": QuantConfig(**cfg).to_dict()}


def _concrete_sharding(a):
    """The sharding of an array (or an abstract one's, on a concrete mesh), else None."""
    sharding = getattr(a, "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh):
        return None
    return sharding


def restore_checkpoint(path, model: nnx.Module, *, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """Restore a ``save_checkpoint`` directory into ``model`` (in place; it may be abstract, from
    ``nnx.eval_shape``) and return it. Raises ``ValueError`` naming every layer whose kind, state
    or config differs from the checkpoint's.

    ``mesh``: restore each array sharded on it by the model's partition specs
    (``nnx.get_partition_spec``: the sharding annotations, carried onto the quantized variables by
    ``quantize``). Without it, an array of ``model`` placed on a mesh is restored with its sharding,
    others on the default device."""
    path = pathlib.Path(path).absolute()
    meta = path / METADATA
    if not meta.exists():
        raise FileNotFoundError(f"restore_checkpoint: {meta} not found (not a jaxquant checkpoint directory)")
    saved = {p: _normalised(rec) for p, rec in json.loads(meta.read_text())["layers"].items()}
    have = layer_records(model)
    diffs = [f"  {p!r}: checkpoint {_describe(saved.get(p))}, model {_describe(have.get(p))}"
             for p in sorted(set(saved) | set(have)) if saved.get(p) != have.get(p)]
    if diffs:
        raise ValueError(f"restore_checkpoint: {len(diffs)} layer(s) of {path} do not match the model:\n"
                         + "\n".join(diffs))
    state = nnx.state(model)
    if mesh is not None:
        shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), nnx.get_partition_spec(state))
    else:
        shardings = jax.tree_util.tree_map(_concrete_sharding, state)
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(path / "state", target)
    nnx.update(model, restored)
    return model
