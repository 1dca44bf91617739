"""Calibration data: what the layers of a model see on sample batches.

``Calibration(run, batches)`` is passed to ``jaxquant.flax.quantize(model, rules,
calibration=...)``: ``run(model, batch)`` runs the float model's forward pass on one batch (its
result is ignored). Every row of a layer's input (the ``[..., K]`` rows of its geometry) is one
sample, except rows that ``calibration_mask(mask)`` masks out inside ``run`` (e.g. padding).

The statistics are gathered by ``InputObserver`` modules installed in front of the layers for the
duration of the passes (``observing``), accumulated on the device (under ``nnx.jit`` unless
``jit=False``) and removed afterwards; the model is unchanged. Per layer (``InputStats``):
``hessian = X^T X / T`` (float32 ``[K, K]``, used by GPTQ), ``amax = max |X|`` (the static
activation scale ``max(amax * f32(1/127), 2**-126)``) and the row count ``T``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from jaxquant.flax.geometry import Geometry, UnsupportedLayer
from jaxquant.flax.layers import QATLayer, QuantizedLayer, geometry_of

__all__ = ["Calibration", "InputStats", "CalibrationStat", "calibration_mask", "InputObserver", "observing",
           "collect_input_stats", "path_str"]


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """Calibration data for ``quantize(model, rules, calibration=Calibration(run, batches))``.

    Sets the ``act_scale`` of layers whose config has ``activations="static"`` from the inputs
    they see. (Weight scales come from the weights: ``QuantConfig.calibration`` picks absmax,
    percentile or the MSE clip search; ``jaxquant.flax.GPTQ`` also rounds the weights with the
    inputs' statistics.)

    Attributes:
      run: ``run(model, batch)`` runs the forward pass on one batch.
      batches: the calibration batches (use data that is not your evaluation data).
      jit: run ``run`` under ``nnx.jit`` (one compilation per batch shape); False: eagerly.
    """

    run: Callable[[nnx.Module, Any], Any]
    batches: Sequence[Any]
    jit: bool = True

    def __post_init__(self):
        if not callable(self.run):
            raise TypeError(f"{type(self).__name__}.run: expected a callable run(model, batch), got {self.run!r}")
        if len(self.batches) == 0:
            raise ValueError(f"{type(self).__name__}.batches: expected at least one calibration batch")


@dataclasses.dataclass(frozen=True)
class InputStats:
    """What a layer saw in calibration: ``hessian = X^T X / rows`` (float32 ``[K, K]``), ``amax =
    max |X|`` and the number of rows ``T`` of ``X [T, K]``."""

    hessian: jax.Array
    amax: jax.Array
    rows: int


def path_str(path) -> str:
    """``("layers", 0, "attn", "query")`` -> ``"layers/0/attn/query"`` (the path rules match)."""
    return "/".join(str(p) for p in path)


class CalibrationStat(nnx.Variable):
    """Input statistics accumulated by a calibration observer (not a trainable parameter)."""


class _Recorder:
    """Call order of the observers in the first calibration pass, and which share an input."""

    def __init__(self):
        self.calls: list[tuple[int, Any]] = []

    def record(self, index, x):
        if all(i != index for i, _ in self.calls):
            self.calls.append((index, x))

    def groups(self) -> list[list[int]]:
        out: list[list[int]] = []
        prev = None
        for index, x in self.calls:
            if out and x is prev:
                out[-1].append(index)
            else:
                out.append([index])
            prev = x
        return out


_RECORDER: list[_Recorder | None] = [None]
_MASK: list[Any] = [None]


@contextlib.contextmanager
def calibration_mask(mask):
    """Inside ``run``: observe only the rows of each layer input where ``mask`` (the shape of the
    input's rows, e.g. a ``[batch, length]`` attention mask) is nonzero, so padded positions do
    not count as calibration samples::

        def run(model, batch):
            ids, mask, types = batch
            with calibration_mask(mask):
                model(ids, mask, types)

    Inputs of another shape raise ``ValueError``. Works eagerly and under ``jit`` (the mask is
    read while tracing).
    """
    prev = _MASK[0]
    _MASK[0] = mask
    try:
        yield
    finally:
        _MASK[0] = prev


class InputObserver(nnx.Module):
    """Wraps a layer: accumulates ``X^T X``, ``max |X|`` and the row count of its input rows
    (when ``active``), then calls the layer. Installed by ``observing``."""

    def __init__(self, layer: nnx.Module, geometry: Geometry, index: int):
        self.layer = layer
        self.geometry = geometry
        self.index = index
        k = geometry.k
        self.xtx = CalibrationStat(jnp.zeros((k, k), jnp.float32))
        self.amax = CalibrationStat(jnp.zeros((), jnp.float32))
        self.rows = CalibrationStat(jnp.zeros((), jnp.int32))
        self.active = CalibrationStat(jnp.ones((), jnp.bool_))

    def reset(self, active: bool = True):
        self.xtx.set_value(jnp.zeros_like(self.xtx.get_value()))
        self.amax.set_value(jnp.zeros((), jnp.float32))
        self.rows.set_value(jnp.zeros((), jnp.int32))
        self.active.set_value(jnp.asarray(active))

    def __call__(self, x, *args, **kwargs):
        rec = _RECORDER[0]
        if rec is not None:
            rec.record(self.index, x)
        x2, free = self.geometry.rows(lax.stop_gradient(x))
        x2 = x2.astype(jnp.float32)
        mask = _MASK[0]
        if mask is None:
            keep = jnp.ones((x2.shape[0],), jnp.bool_)
        else:
            mask = jnp.asarray(mask)
            if tuple(mask.shape) != tuple(free):
                raise ValueError(f"calibration_mask: mask of shape {tuple(mask.shape)} does not match the rows "
                                 f"{tuple(free)} of a layer input {tuple(x.shape)}")
            keep = jnp.reshape(mask != 0, (-1,))
        x2 = jnp.where(keep[:, None], x2, 0.0)

        def acc(state):
            xtx, amax, rows = state
            xtx = xtx + jnp.matmul(x2.T, x2, precision=lax.Precision.HIGHEST)
            return xtx, jnp.maximum(amax, jnp.max(jnp.abs(x2))), rows + jnp.sum(keep, dtype=jnp.int32)

        state = (self.xtx.get_value(), self.amax.get_value(), self.rows.get_value())
        xtx, amax, rows = lax.cond(self.active.get_value(), acc, lambda s: s, state)
        self.xtx.set_value(xtx)
        self.amax.set_value(amax)
        self.rows.set_value(rows)
        return self.layer(x, *args, **kwargs)

    def stats(self) -> InputStats:
        rows = int(self.rows.get_value())
        h = self.xtx.get_value() / np.float32(max(rows, 1))
        return InputStats(h, self.amax.get_value(), rows)


def _geometry(node):
    try:
        return geometry_of(node)
    except UnsupportedLayer:
        return None


def get_child(parent, key):
    return parent[key] if isinstance(key, int) or isinstance(parent, (dict, nnx.Dict)) else getattr(parent, key)


def set_child(parent, key, value):
    if isinstance(key, int) or isinstance(parent, (dict, nnx.Dict)):
        parent[key] = value
    else:
        setattr(parent, key, value)


def resolve(model, path):
    """``(parent, key)`` of the node at ``path``."""
    parent = model
    for key in path[:-1]:
        parent = get_child(parent, key)
    return parent, path[-1]


@contextlib.contextmanager
def observing(model: nnx.Module, layers: Sequence[tuple[tuple, Geometry]]):
    """Install an ``InputObserver`` in front of each ``(path, geometry)`` layer (in place) for the
    duration of the ``with`` block; yields the observers (in order) and restores the layers."""
    observers = []
    if any(not path for path, _ in layers):
        raise ValueError("calibration observes the layers of a model; this model is a single layer: wrap it in a "
                         "module (e.g. nnx.Sequential(layer)) to calibrate it")
    try:
        for i, (path, geometry) in enumerate(layers):
            parent, key = resolve(model, path)
            obs = InputObserver(get_child(parent, key), geometry, i)
            set_child(parent, key, obs)
            observers.append(obs)
        yield observers
    finally:
        for (path, _), obs in zip(layers, observers):
            parent, key = resolve(model, path)
            set_child(parent, key, obs.layer)


def runner(run, jit):
    """``run`` itself, or a jitted step calling it (``nnx.jit`` propagates the observers' updates)."""
    if not jit:
        return run

    @nnx.jit
    def step(model, batch):
        run(model, batch)

    return step


def calibration_pass(model, step, batches, record=False) -> _Recorder | None:
    """Run ``step(model, batch)`` on every batch; with ``record``, return which observers shared an input."""
    rec = _Recorder() if record else None
    _RECORDER[0] = rec
    try:
        for b in batches:
            step(model, b)
    finally:
        _RECORDER[0] = None
    return rec


def collect_input_stats(model: nnx.Module, calibration: Calibration,
                        layers: Sequence[tuple[tuple, Geometry]] | None = None) -> dict[tuple, InputStats]:
    """Run the calibration batches with an observer in front of each ``(path, geometry)`` layer
    (default: every float layer ``quantize`` handles); return ``{path: InputStats}``. The model is
    left unchanged; layers never called get ``rows == 0``."""
    if layers is None:
        layers = [(path, g) for path, node in nnx.iter_graph(model)
                  if isinstance(node, nnx.Module) and not isinstance(node, (QATLayer, QuantizedLayer))
                  and (g := _geometry(node)) is not None]
    with observing(model, layers) as observers:
        calibration_pass(model, runner(calibration.run, calibration.jit), calibration.batches)
        return {path: o.stats() for (path, _), o in zip(layers, observers)}
