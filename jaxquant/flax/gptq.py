"""Data-aware weight quantization: GPTQ (error-compensating rounding with the inputs' Hessian).

Plain post-training quantization rounds every weight to its nearest code (RTN). GPTQ (Frantar et al.,
2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers") rounds
the input columns of ``W [N, K]`` one at a time and spreads each column's rounding error over the
columns not yet rounded, so that the layer *output* error on calibration inputs ``X [T, K]`` is
small rather than the weight error::

    minimise  || X W^T - X W_hat^T ||^2 = tr((W - W_hat) H (W - W_hat)^T),   H = X^T X

With ``U`` the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` and columns visited in
order ``j = 0 .. K-1`` (``act_order``: by decreasing ``diag(H)``, the most active inputs first)::

    q_j   = clamp(rne(w_j * (1/s_j)) + z_j, qmin, qmax)      the library's quantizer (DESIGN.md §1)
    e_j   = (w_j - (q_j - z_j) * s_j) / U_jj
    w_l  -= e_j * U_jl        for every column l after j      (U is upper triangular)

computed in blocks of ``block_size`` columns (lazy batch updates), in float32 under ``jax.jit``.

Scales and zero points are *static*: they are chosen from the original weight before the
rounding starts, by ``config.calibration`` (``"absmax"``, ``"percentile"`` or ``"mse"`` clip
search; ``jaxquant.flax.calibrate.weight_qparams``), per channel or per ``(channel, group)``
exactly as plain quantization would choose them. GPTQ only changes which code each weight gets,
so the result is an ordinary ``QuantizedWeight`` (same layout, same scales, contiguous groups)
served by ``jaxquant.weight_only_linear`` / ``jaxquant.quantized_linear`` unchanged. Activation
order with static groups needs no group index: groups stay contiguous in K.

Entry points:

* ``GPTQ(run, batches, ...)`` — the options, passed as ``convert(model, config, calibration=GPTQ(...))``
  (``jaxquant.flax.convert``). ``run(model, batch)`` runs the forward pass on one calibration
  batch; use data that is NOT your evaluation data.
* ``collect_input_stats(model, run, batches)`` — runs the model with an observer in front of every
  ``nnx.Linear``; returns ``{path: InputStats}`` (``hessian = X^T X / T``, ``amax``, ``rows``).
* ``gptq_quantize_weight(w, hessian, config)`` — one weight; returns a ``QuantizedWeight``.

Every row of ``x [..., K]`` a layer sees in calibration is one sample of ``X``, except rows
masked out by ``calibration_mask(mask)`` inside ``run`` (e.g. padded token positions).
``sequential=True`` recomputes the statistics after each group of layers is quantized (their
float kernels temporarily replaced by the dequantized GPTQ weights), so later layers see and
compensate for the quantized earlier ones; layers called on the same input array (e.g. query, key,
value) form one group. The statistics are accumulated on the device by ``InputObserver`` modules
installed in front of the layers (``observing``) and removed afterwards; the model is unchanged.

Only float ``nnx.Linear`` layers are calibrated this way; ``QATLinear`` layers keep the quantizer
they were trained with (``convert``). The cost is one ``[K, K]`` Hessian per layer and, per layer,
``O(N K^2)`` flops: all-MiniLM-L6-v2 (36 layers, 200 sentences) takes ~6 s on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

import jaxquant as jq
from jaxquant.primitives.affine import reference as ref
from jaxquant.core import weights as W
from jaxquant.flax import calibrate as C
from jaxquant.flax.config import QuantConfig

__all__ = ["GPTQ", "InputStats", "collect_input_stats", "calibration_mask", "gptq_quantize_weight", "gptq_codes",
           "layer_output_error", "InputObserver", "observing", "linear_paths"]


@dataclasses.dataclass(frozen=True, eq=False)
class GPTQ:
    """GPTQ calibration for ``convert(model, config, calibration=GPTQ(...))``.

    Attributes:
      run: ``run(model, batch)`` runs the model's forward pass on one calibration batch (its
        result is ignored).
      batches: the calibration batches (e.g. tuples of arrays). Use data that is not your
        evaluation data; every row of every linear layer's input is one sample, except rows that
        ``calibration_mask`` masks out inside ``run`` (padding).
      damp: ridge added to ``H``'s diagonal, as a fraction of its mean (``H`` is rank-deficient
        when there are fewer samples than inputs); retried x10 if the Cholesky fails.
      act_order: visit columns by decreasing ``diag(H)`` (scales stay static, so groups stay
        contiguous and serving is unchanged).
      block_size: columns per lazy-batch block (speed only; the result does not depend on it up
        to float32 rounding).
      sequential: recompute the input statistics after each group of layers is quantized (one
        calibration pass per group) instead of taking all of them from the float model (one pass).
      jit: run ``run`` under ``nnx.jit`` (one compilation per distinct batch shape); False runs it
        eagerly.
    """

    run: Callable[[nnx.Module, Any], Any]
    batches: Sequence[Any]
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    sequential: bool = False
    jit: bool = True

    def __post_init__(self):
        if not callable(self.run):
            raise TypeError(f"GPTQ.run: expected a callable run(model, batch), got {self.run!r}")
        if len(self.batches) == 0:
            raise ValueError("GPTQ.batches: expected at least one calibration batch")
        if not float(self.damp) > 0:
            raise ValueError(f"GPTQ.damp: expected > 0, got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQ.block_size: expected a positive int, got {self.block_size!r}")


@dataclasses.dataclass(frozen=True)
class InputStats:
    """What a layer saw in calibration: ``hessian = X^T X / rows`` (float32 ``[K, K]``), ``amax =
    max |X|`` and the number of rows ``T`` of ``X [T, K]``."""

    hessian: jax.Array
    amax: jax.Array
    rows: int


# ------------------------------------------------------------------------------------------
# GPTQ on one weight
# ------------------------------------------------------------------------------------------
def _cholesky_inverse_upper(h):
    """Upper Cholesky factor of ``h^-1`` (float32; NaN when ``h`` is not positive definite)."""
    k = h.shape[0]
    lo = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((lo, True), jnp.eye(k, dtype=h.dtype))
    return jnp.linalg.cholesky(hinv).T


def _gptq_core(w, u, s_cols, z_cols, *, qmin, qmax, block):
    """Codes (float, ``[N, Kp]``) of ``w`` (already permuted and padded to a multiple of ``block``)."""
    n, kp = w.shape
    nblocks = kp // block
    cols = jnp.arange(kp)

    def block_step(b, carry):
        w, q = carry
        b0 = b * block
        w1 = lax.dynamic_slice(w, (0, b0), (n, block))
        u11 = lax.dynamic_slice(u, (b0, b0), (block, block))
        s1 = lax.dynamic_slice(s_cols, (0, b0), (n, block))
        z1 = lax.dynamic_slice(z_cols, (0, b0), (n, block))

        def col_step(i, c):
            w1, q1, e1 = c
            wi, si, zi = w1[:, i], s1[:, i], z1[:, i]
            qi, _ = ref.affine_codes(wi, si, zi, qmin, qmax)
            err = (wi - (qi - zi) * si) / u11[i, i]
            w1 = w1 - err[:, None] * u11[i][None, :]        # u11[i, :i] = 0: only columns >= i move
            return w1, q1.at[:, i].set(qi), e1.at[:, i].set(err)

        zeros = jnp.zeros((n, block), w.dtype)
        _, q1, e1 = lax.fori_loop(0, block, col_step, (w1, zeros, zeros))
        urows = lax.dynamic_slice(u, (b0, 0), (block, kp))
        urows = jnp.where(cols[None, :] >= b0 + block, urows, 0)
        w = w - jnp.matmul(e1, urows, precision=lax.Precision.HIGHEST)
        return w, lax.dynamic_update_slice(q, q1, (0, b0))

    _, q = lax.fori_loop(0, nblocks, block_step, (w, jnp.zeros_like(w)))
    return q


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "group", "act_order", "block"))
def _gptq(w, h, scale, zp, damp, *, qmin, qmax, group, act_order, block):
    """``(codes float [N, K], ok)``: GPTQ codes of ``w`` and whether the damped Cholesky succeeded."""
    n, k = w.shape
    s_cols, z_cols = jnp.repeat(scale, group, axis=1), jnp.repeat(zp, group, axis=1)
    dead = jnp.diag(h) <= 0
    h = jnp.where(jnp.diag(dead), 1.0, h)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
    h = h[perm][:, perm]
    h = h + (damp * jnp.mean(jnp.diag(h))) * jnp.eye(k, dtype=h.dtype)
    kp = -(-k // block) * block
    pad = kp - k
    # padded columns: weight 0, identity Hessian (U = I there), scale 1, zero point 0 -> code 0, no error
    hp = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(kp) >= k).astype(h.dtype)
    u = _cholesky_inverse_upper(hp)
    ok = jnp.all(jnp.isfinite(u))
    u = jnp.where(ok, u, jnp.eye(kp, dtype=h.dtype))
    pcols = lambda a, fill: jnp.pad(a[:, perm], ((0, 0), (0, pad)), constant_values=fill)
    q = _gptq_core(pcols(w, 0.0), u, pcols(s_cols, 1.0), pcols(z_cols, 0.0), qmin=qmin, qmax=qmax, block=block)
    return q[:, :k][:, jnp.argsort(perm)], ok


def gptq_codes(w, hessian, scale, zero_point, config: QuantConfig, *, damp: float = 0.01,
               act_order: bool = True, block_size: int = 128):
    """int8 codes ``[N, K]`` (unpacked) of ``w [N, K]`` rounded by GPTQ with the given static
    ``scale`` / ``zero_point`` (shape ``[N]`` or ``[N, K // g]``; ``zero_point`` None when symmetric).

    ``hessian`` is ``X^T X`` up to a positive factor (``[K, K]``). Columns whose input was always
    zero (``H_jj = 0``) get ``H_jj = 1``: they are rounded to nearest and pass no error on. When
    the damped Hessian is not positive definite in float32, ``damp`` is retried x10, x100, x1000.
    """
    w = jnp.asarray(w, jnp.float32)
    n, k = w.shape
    config.check_features(k)
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (k, k):
        raise ValueError(f"hessian: expected shape {(k, k)}, got {tuple(h.shape)}")
    qmin, qmax = config.weight_range
    g = k if config.group_size is None else config.group_size
    scale = jnp.reshape(jnp.asarray(scale, jnp.float32), (n, k // g))
    zp = jnp.zeros_like(scale) if zero_point is None else jnp.reshape(jnp.asarray(zero_point, jnp.float32), (n, k // g))
    for attempt in range(4):
        q, ok = _gptq(w, h, scale, zp, jnp.float32(damp * 10.0**attempt), qmin=qmin, qmax=qmax, group=g,
                      act_order=bool(act_order), block=min(int(block_size), k))
        if bool(ok):
            return q.astype(jnp.int8)
    raise FloatingPointError(f"GPTQ: the damped Hessian is not positive definite (damp up to {damp * 1e3})")


def gptq_quantize_weight(w, hessian, config: QuantConfig, *, scale=None, zero_point=None, damp: float = 0.01,
                         act_order: bool = True, block_size: int = 128) -> W.QuantizedWeight:
    """``QuantizedWeight`` of ``w [N, K]`` (``nn.Linear`` layout) rounded by GPTQ (module docstring).

    ``scale`` / ``zero_point`` default to ``weight_qparams(w, method=config.calibration)``, the
    parameters plain quantization would use. The codes are packed as ``jaxquant.quantize_weight``
    packs them (int4: two per byte), so ``dequantize_weight`` of the result is GPTQ's ``W_hat``.
    """
    w = jnp.asarray(w, jnp.float32)
    if scale is None:
        scale, zero_point = C.weight_qparams(w, bits=config.weight_bits, group_size=config.group_size,
                                             symmetric=config.weight_symmetric, method=config.calibration,
                                             percentile=config.percentile)
    zp = None if config.weight_symmetric else jnp.asarray(zero_point, jnp.int32)
    codes = gptq_codes(w, hessian, scale, zp, config, damp=damp, act_order=act_order, block_size=block_size)
    if config.weight_bits == 4:
        codes = W.pack_int4(codes)
    qw = W.QuantizedWeight(codes, jnp.asarray(scale, jnp.float32), zp, bits=config.weight_bits,
                           group_size=config.group_size, symmetric=config.weight_symmetric, shape=w.shape)
    return W.check_quantized_weight("qweight", qw)


def layer_output_error(w, w_hat, hessian):
    """``tr((W - W_hat) H (W - W_hat)^T)``: the summed squared output error of ``x @ W^T`` over the
    calibration rows when ``hessian = X^T X`` (divide by the rows for the mean)."""
    d = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
    return jnp.sum(jnp.matmul(d, jnp.asarray(hessian, jnp.float32), precision=lax.Precision.HIGHEST) * d)


# ------------------------------------------------------------------------------------------
# Observing the inputs of every linear layer
# ------------------------------------------------------------------------------------------
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
    """Inside ``run``: observe only the rows of each layer input ``x [..., K]`` where ``mask`` (shape
    ``x.shape[:-1]``, e.g. a ``[batch, length]`` attention mask) is nonzero, so padded positions
    do not count as calibration samples::

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
    """Wraps a linear layer: accumulates ``X^T X``, ``max |X|`` and the row count of its inputs
    (when ``active``), then calls the layer. Installed by ``collect_input_stats``."""

    def __init__(self, layer: nnx.Module, in_features: int, index: int):
        self.layer = layer
        self.index = index
        k = in_features
        self.xtx = CalibrationStat(jnp.zeros((k, k), jnp.float32))
        self.amax = CalibrationStat(jnp.zeros((), jnp.float32))
        self.rows = CalibrationStat(jnp.zeros((), jnp.int32))
        self.active = CalibrationStat(jnp.ones((), jnp.bool_))

    def reset(self, active: bool = True):
        self.xtx.set_value(jnp.zeros_like(self.xtx.get_value()))
        self.amax.set_value(jnp.zeros((), jnp.float32))
        self.rows.set_value(jnp.zeros((), jnp.int32))
        self.active.set_value(jnp.asarray(active))

    def __call__(self, x):
        rec = _RECORDER[0]
        if rec is not None:
            rec.record(self.index, x)
        k = self.xtx.get_value().shape[0]
        x2 = lax.stop_gradient(jnp.reshape(x, (-1, k))).astype(jnp.float32)
        mask = _MASK[0]
        if mask is None:
            keep = jnp.ones((x2.shape[0],), jnp.bool_)
        else:
            mask = jnp.asarray(mask)
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"calibration_mask: mask of shape {tuple(mask.shape)} does not match the rows "
                                 f"{tuple(x.shape[:-1])} of a layer input {tuple(x.shape)}")
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
        return self.layer(x)

    def stats(self) -> InputStats:
        rows = int(self.rows.get_value())
        h = self.xtx.get_value() / np.float32(max(rows, 1))
        return InputStats(h, self.amax.get_value(), rows)


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, value):
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _resolve(model, path):
    parent = model
    for key in path[:-1]:
        parent = _get(parent, key)
    return parent, path[-1]


def _default_filter(node) -> bool:
    return isinstance(node, nnx.Linear)


def linear_paths(model: nnx.Module, include: Callable[[Any], bool] = _default_filter) -> list[tuple]:
    """Paths (tuples of attribute names / indices) of the layers ``include`` selects (default: every
    ``nnx.Linear``), in graph order."""
    return [path for path, node in nnx.iter_graph(model) if path and include(node)]


def _in_features(layer) -> int:
    if hasattr(layer, "in_features"):
        return int(layer.in_features)
    return int(layer.kernel.get_value().shape[0])


@contextlib.contextmanager
def observing(model: nnx.Module, paths: Sequence[tuple]):
    """Install an ``InputObserver`` in front of each layer at ``paths`` (in place) for the duration
    of the ``with`` block; yields the observers (in ``paths`` order) and restores the layers."""
    observers = []
    for i, path in enumerate(paths):
        parent, key = _resolve(model, path)
        layer = _get(parent, key)
        obs = InputObserver(layer, _in_features(layer), i)
        _set(parent, key, obs)
        observers.append(obs)
    try:
        yield observers
    finally:
        for path, obs in zip(paths, observers):
            parent, key = _resolve(model, path)
            _set(parent, key, obs.layer)


def _runner(run, jit):
    if not jit:
        return run

    @nnx.jit
    def step(model, batch):
        run(model, batch)

    return step


def _calibration_pass(model, runner, batches, record=False):
    rec = _Recorder() if record else None
    _RECORDER[0] = rec
    try:
        for b in batches:
            runner(model, b)
    finally:
        _RECORDER[0] = None
    return rec


def collect_input_stats(model: nnx.Module, run, batches, *, paths: Sequence[tuple] | None = None,
                        jit: bool = True) -> dict[tuple, InputStats]:
    """Run ``run(model, batch)`` for every batch with an observer in front of each layer in
    ``paths`` (default: every ``nnx.Linear``); return ``{path: InputStats}``. The model is left
    unchanged. Layers never called get ``rows == 0``."""
    paths = linear_paths(model) if paths is None else [tuple(p) for p in paths]
    with observing(model, paths) as observers:
        _calibration_pass(model, _runner(run, jit), batches)
        return {p: o.stats() for p, o in zip(paths, observers)}


def gptq_calibrate(model: nnx.Module, config: QuantConfig, options: GPTQ, paths: Sequence[tuple]):
    """GPTQ weights for the float layers at ``paths`` of ``model``.

    Returns ``{path: (QuantizedWeight, InputStats)}``. With ``options.sequential`` the float
    kernels of already-quantized groups are temporarily replaced by their dequantized GPTQ weights
    while the next group's statistics are collected (restored before returning).
    """
    paths = [tuple(p) for p in paths]
    runner = _runner(options.run, options.jit)
    results: dict[tuple, tuple[W.QuantizedWeight, InputStats]] = {}

    def quantize(path, obs):
        stats = obs.stats()
        layer = obs.layer
        w = jnp.asarray(layer.kernel.get_value(), jnp.float32).T
        if stats.rows == 0:
            raise ValueError(f"GPTQ: layer {'.'.join(map(str, path))} was not called by run() on the calibration batches")
        qw = gptq_quantize_weight(w, stats.hessian, config, damp=options.damp, act_order=options.act_order,
                                  block_size=options.block_size)
        results[path] = (qw, stats)
        return qw

    saved = {}
    with observing(model, paths) as observers:
        rec = _calibration_pass(model, runner, options.batches, record=True)
        if not options.sequential:
            for path, obs in zip(paths, observers):
                quantize(path, obs)
            return results
        groups = rec.groups()
        called = {i for g in groups for i in g}
        groups += [[i] for i in range(len(paths)) if i not in called]    # never called: an error below
        try:
            for gi, group in enumerate(groups):
                if gi:
                    for o in observers:
                        o.reset(active=o.index in group)
                    _calibration_pass(model, runner, options.batches)
                for i in group:
                    obs = observers[i]
                    qw = quantize(paths[i], obs)
                    kernel = obs.layer.kernel
                    saved[i] = kernel.get_value()
                    kernel.set_value(jq.dequantize_weight(qw).T.astype(saved[i].dtype))
        finally:
            for i, value in saved.items():
                observers[i].layer.kernel.set_value(value)
    return results
