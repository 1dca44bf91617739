"""Calibration: initial weight scales (absmax, percentile, MSE clip search) and static activation scales.

Weights use the ``jaxquant.core.weights`` layout ``W [N, K]`` (``nn.Linear``; a flax kernel is its
transpose) with one ``(scale, zero point)`` per output row (``group_size=None``) or per
``(row, group of g consecutive k)``. Every method clips the range ``[lo, hi]`` of each
channel/group and turns it into parameters with the formulas of ``jaxquant.choose_qparams``::

    symmetric:   scale = max(amax * f32(1/qmax), 2**-126),  zp = 0            (amax = max(|lo|, hi))
    asymmetric:  lo = min(lo, 0), hi = max(hi, 0)
                 scale = max((hi - lo) * f32(1/(qmax - qmin)), 2**-126)
                 zp    = clamp(qmin - rne(lo * (1/scale)), qmin, qmax)

* ``"absmax"``: the full range — bit-identical to ``jaxquant.choose_qparams`` / ``quantize_weight``.
* ``"percentile"``: ``amax`` = the p-th percentile of ``|w|`` (asymmetric: the (100-p)-th and p-th
  percentiles of ``w``) per channel/group.
* ``"mse"``: the clip ratio ``r`` in ``ratios`` (default 0.50, 0.52, ..., 1.00) minimising
  ``sum((fake_quantize(w) - w)**2)`` per channel/group; all candidates are evaluated at once
  (one batched ``jaxquant.fake_quantize`` over ``[n_ratios, rows, g]``).

Static activation scales come from the inputs the layers see on calibration batches
(``jaxquant.flax.observe``): ``act_scale = max(amax * f32(1/127), 2**-126)``.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.core import numerics as ref
from jaxquant.core import weights as W

__all__ = ["qparams_from_range", "weight_qparams", "DEFAULT_RATIOS"]

DEFAULT_RATIOS = tuple(float(r) for r in np.linspace(0.5, 1.0, 26))
_TINY = np.float32(2.0**-126)


def qparams_from_range(lo, hi, *, qmin: int, qmax: int, symmetric: bool):
    """``(scale float32, zero_point int32)`` from per-element ranges (module docstring formulas)."""
    lo = jnp.asarray(lo, jnp.float32)
    hi = jnp.asarray(hi, jnp.float32)
    if symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = jnp.maximum(amax * np.float32(1.0 / qmax), _TINY)
        return scale, jnp.zeros(scale.shape, jnp.int32)
    lo = jnp.minimum(lo, 0)
    hi = jnp.maximum(hi, 0)
    scale = jnp.maximum((hi - lo) * np.float32(1.0 / (qmax - qmin)), _TINY)
    zp = jnp.clip(qmin - jnp.round(lo * ref.recip(scale)), qmin, qmax)
    return scale, zp.astype(jnp.int32)


def _rows(w, group_size):
    """``[N, K]`` -> ``[rows, g]`` (rows = N per-channel, N * K/g per-group) and the param shape."""
    n, k = w.shape
    if group_size is None:
        return w, (n,)
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide K={k}")
    return jnp.reshape(w, (n * (k // group_size), group_size)), (n, k // group_size)


def weight_qparams(w, *, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                   method: str = "absmax", percentile: float = 99.9, ratios=DEFAULT_RATIOS):
    """Scale (float32) and zero point (int32) of ``w [N, K]``: shape ``[N]`` or ``[N, K // g]``.

    ``method``: ``"absmax"``, ``"percentile"`` or ``"mse"`` (module docstring). The zero point is
    all zeros when ``symmetric``. Not differentiable (parameters from data are constants).
    """
    w = jax.lax.stop_gradient(jnp.asarray(w)).astype(jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"w: expected a weight [N, K], got shape {tuple(w.shape)}")
    qmin, qmax = W.code_range(bits, symmetric)
    rows, pshape = _rows(w, group_size)
    if method == "absmax":
        lo, hi = jnp.min(rows, axis=1), jnp.max(rows, axis=1)
    elif method == "percentile":
        if symmetric:
            hi = jnp.percentile(jnp.abs(rows), percentile, axis=1)
            lo = -hi
        else:
            lo = jnp.percentile(rows, 100.0 - percentile, axis=1)
            hi = jnp.percentile(rows, percentile, axis=1)
    elif method == "mse":
        return _mse_search(rows, pshape, qmin, qmax, symmetric, ratios)
    else:
        raise ValueError(f"method: expected 'absmax', 'percentile' or 'mse', got {method!r}")
    s, z = qparams_from_range(lo, hi, qmin=qmin, qmax=qmax, symmetric=symmetric)
    return jnp.reshape(s, pshape), jnp.reshape(z, pshape)


def _mse_search(rows, pshape, qmin, qmax, symmetric, ratios):
    r = jnp.asarray(ratios, jnp.float32)[:, None]                       # [C, 1]
    lo, hi = jnp.min(rows, axis=1)[None], jnp.max(rows, axis=1)[None]   # [1, rows]
    s, z = qparams_from_range(lo * r, hi * r, qmin=qmin, qmax=qmax, symmetric=symmetric)  # [C, rows]
    xs = jnp.broadcast_to(rows[None], (r.shape[0],) + rows.shape)      # [C, rows, g]
    fq = jq.fake_quantize(xs, s, None if symmetric else z, granularity=jq.PerToken(), qmin=qmin, qmax=qmax)
    err = jnp.sum(jnp.square(fq - xs), axis=-1)                         # [C, rows]
    best = jnp.argmin(err, axis=0)                                      # first minimum: ties -> smaller r
    pick = lambda a: jnp.take_along_axis(a, best[None], axis=0)[0]
    return jnp.reshape(pick(s), pshape), jnp.reshape(pick(z), pshape)
