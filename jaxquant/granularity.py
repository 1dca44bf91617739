"""Quantization granularities and the canonical view every kernel works on.

A granularity says which elements of ``x`` share one ``(scale, zero_point)`` pair:

=====================  ==========================================  ===============================
granularity            scale / zero-point shape                    one pair per
=====================  ==========================================  ===============================
``PerTensor()``        ``()``                                      tensor
``PerChannel(axis)``   ``(x.shape[axis],)``                        index along ``axis``
``PerToken()``         ``x.shape[:-1]``                            row of the last axis
``PerGroup(g)``        ``x.shape[:-1] + (D // g,)``                ``g`` consecutive elements of a row
``PerBlock((r, c))``   ``x.shape[:-2] + (R // r, C // c)``         ``r x c`` block of the last two
                                                                   axes ``[..., R, C]``
=====================  ==========================================  ===============================

``PerBlock((128, 128))`` is the block scaling of fp8 weights ``[N, K]`` (DeepSeek-V3's format; the
activations' ``1 x 128`` groups are ``PerGroup(128)``); it serves integer codes too.

Canonical view
--------------
Internally each granularity becomes a *broadcast form*: ``x`` (possibly reshaped, for
``PerGroup`` to ``[..., D // g, g]``) together with parameters of the same rank whose every
dimension is either 1 (shared) or equal to x's (one value per index). ``vmap`` keeps this form:
a batched parameter gains a full leading dimension, an unbatched one a dimension of 1.

The kernels then see a 3-d view ``x3 = [B, R, C]`` with parameters ``[PB, PR, PC]``
(each ``P*`` either 1 or the full size), obtained by merging neighbouring dimensions that are
broadcast the same way. After merging the pattern alternates (full / shared), so a 3-d view
covers every granularity and its vmaps:

* ``PerToken`` / ``PerGroup`` / ``PerChannel(0)``: ``[1, rows, cols]``, params ``[1, rows, 1]``
  (for ``PerGroup`` a row is one group of ``g`` elements);
* ``PerChannel(-1)``: ``[1, rows, C]``, params ``[1, 1, C]``;
* ``PerChannel(k)`` in the middle: ``[A, C, B]``, params ``[1, C, 1]``;
* ``PerTensor``: ``[1, 1, N]``, params ``[1, 1, 1]``;
* ``PerBlock((r, c))``: the broadcast form ``[..., R/r, r, C/c, c]`` with params
  ``[..., R/r, 1, C/c, 1]`` alternates four times (full, shared, full, shared), so the parameters
  are broadcast along ``r`` (``x.size / c`` values) and the view is ``PerGroup(c)``'s:
  ``[1, rows, c]``, params ``[1, rows, 1]``.

A longer pattern (only reachable through vmap of a middle-axis ``PerChannel``) is reduced by
broadcasting the parameters along the leading shared dimensions, which costs parameter-sized
memory, never x-sized.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import jax.numpy as jnp

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
    "PerBlock",
    "Granularity",
    "param_shape",
    "to_broadcast_form",
    "from_broadcast_form",
    "canonical_view",
    "CanonicalView",
]


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One (scale, zero_point) for the whole tensor: scale shape ``()``."""


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One (scale, zero_point) per index of ``axis``: scale shape ``(x.shape[axis],)``.

    ``axis`` may be negative. PyTorch's ``fake_quantize_per_channel_affine(x, s, zp, axis, ...)``
    is ``PerChannel(axis)``.
    """

    axis: int = 0

    def __post_init__(self):
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise TypeError(f"PerChannel(axis): expected an int, got {self.axis!r}")


@dataclasses.dataclass(frozen=True)
class PerToken:
    """One (scale, zero_point) per row of ``[..., D]``: scale shape ``x.shape[:-1]``."""


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """One (scale, zero_point) per ``group_size`` consecutive elements of the last axis.

    Scale shape ``x.shape[:-1] + (D // group_size,)``; ``D % group_size`` must be 0.
    """

    group_size: int

    def __post_init__(self):
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise ValueError(f"PerGroup(group_size): expected a positive int, got {g!r}")


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """One (scale, zero_point) per ``rows x cols`` block of the last two axes of ``[..., R, C]``.

    ``block_shape = (rows, cols)``; scale shape ``x.shape[:-2] + (R // rows, C // cols)``;
    ``R % rows == 0`` and ``C % cols == 0``. ``PerBlock((128, 128))`` on a weight ``[N, K]`` is
    the 128 x 128 block scaling of fp8 checkpoints.
    """

    block_shape: tuple[int, int]

    def __post_init__(self):
        b = self.block_shape
        ok = isinstance(b, (tuple, list)) and len(b) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in b)
        if not ok:
            raise ValueError(f"PerBlock(block_shape): expected a pair of positive ints (rows, cols), got {b!r}")
        object.__setattr__(self, "block_shape", (int(b[0]), int(b[1])))


Granularity = Union[PerTensor, PerChannel, PerToken, PerGroup, PerBlock]
_GRANULARITIES = (PerTensor, PerChannel, PerToken, PerGroup, PerBlock)


def check_granularity(granularity, shape: Sequence[int], *, arg: str = "x") -> None:
    """Raise a clear error if ``granularity`` does not fit an array of ``shape``."""
    if not isinstance(granularity, _GRANULARITIES):
        raise TypeError(
            "granularity: expected one of PerTensor(), PerChannel(axis), PerToken(), "
            f"PerGroup(group_size), PerBlock((rows, cols)); got {granularity!r}"
        )
    ndim = len(shape)
    if isinstance(granularity, PerChannel):
        if ndim == 0:
            raise ValueError(f"PerChannel(axis={granularity.axis}) needs {arg} of rank >= 1, got a scalar")
        if not -ndim <= granularity.axis < ndim:
            raise ValueError(
                f"PerChannel(axis={granularity.axis}): axis out of range for {arg} of rank {ndim} "
                f"(shape {tuple(shape)}); expected -{ndim} <= axis < {ndim}"
            )
    if isinstance(granularity, (PerToken, PerGroup)) and ndim == 0:
        raise ValueError(f"{granularity!r} needs {arg} of rank >= 1, got a scalar")
    if isinstance(granularity, PerGroup):
        d = shape[-1]
        if d % granularity.group_size:
            raise ValueError(
                f"PerGroup(group_size={granularity.group_size}): the last axis of {arg} "
                f"(size {d}, shape {tuple(shape)}) must be a multiple of group_size"
            )
    if isinstance(granularity, PerBlock):
        if ndim < 2:
            raise ValueError(f"{granularity!r} needs {arg} of rank >= 2 (blocks of the last two axes), "
                             f"got shape {tuple(shape)}")
        (r, c), (rr, cc) = granularity.block_shape, shape[-2:]
        if rr % r or cc % c:
            raise ValueError(
                f"PerBlock(block_shape=({r}, {c})): the last two axes of {arg} (shape {tuple(shape)}) "
                f"must be multiples of the block: {rr} % {r} = {rr % r}, {cc} % {c} = {cc % c}")


def param_shape(granularity: Granularity, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the scale / zero point for ``granularity`` on an array of ``shape``."""
    shape = tuple(shape)
    check_granularity(granularity, shape)
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerChannel):
        return (shape[granularity.axis],)
    if isinstance(granularity, PerToken):
        return shape[:-1]
    if isinstance(granularity, PerBlock):
        r, c = granularity.block_shape
        return shape[:-2] + (shape[-2] // r, shape[-1] // c)
    return shape[:-1] + (shape[-1] // granularity.group_size,)


def to_broadcast_form(x, param, granularity: Granularity):
    """Reshape ``x`` and a parameter array of ``param_shape`` into the broadcast form.

    Returns ``(xb, pb)``: ``pb`` has ``xb``'s rank and each of its dimensions is 1 or equal
    to ``xb``'s. ``from_broadcast_form`` undoes the reshape of an x-shaped result.
    """
    shape = x.shape
    ndim = len(shape)
    if isinstance(granularity, PerTensor):
        return x, jnp.reshape(param, (1,) * ndim)
    if isinstance(granularity, PerChannel):
        axis = granularity.axis % ndim
        pshape = [1] * ndim
        pshape[axis] = shape[axis]
        return x, jnp.reshape(param, pshape)
    if isinstance(granularity, PerToken):
        return x, jnp.reshape(param, shape[:-1] + (1,))
    if isinstance(granularity, PerBlock):
        r, c = granularity.block_shape
        lead, (rr, cc) = shape[:-2], shape[-2:]
        xb = jnp.reshape(x, lead + (rr // r, r, cc // c, c))
        return xb, jnp.reshape(param, lead + (rr // r, 1, cc // c, 1))
    g = granularity.group_size
    xb = jnp.reshape(x, shape[:-1] + (shape[-1] // g, g))
    return xb, jnp.reshape(param, shape[:-1] + (shape[-1] // g, 1))


def from_broadcast_form(y, shape: Sequence[int]):
    """Undo ``to_broadcast_form``'s reshape of x (a free reshape)."""
    return jnp.reshape(y, tuple(shape))


@dataclasses.dataclass(frozen=True)
class CanonicalView:
    """How an x of broadcast form maps onto the kernels' ``[B, R, C]`` view.

    ``x_shape3`` is ``(B, R, C)``; ``param_full`` says which of the three dims carry one
    parameter per index (``True``) rather than one shared value (``False``);
    ``param_shape3`` is the resulting parameter shape; ``expand`` is the broadcast-form
    parameter shape the parameters must first be broadcast to (longer patterns only).
    """

    x_shape3: tuple[int, int, int]
    param_full: tuple[bool, bool, bool]
    expand: tuple[int, ...] | None

    @property
    def param_shape3(self) -> tuple[int, int, int]:
        return tuple(n if f else 1 for n, f in zip(self.x_shape3, self.param_full))


def canonical_view(x_shape: Sequence[int], p_shape: Sequence[int]) -> CanonicalView:
    """Compute the ``[B, R, C]`` view of an x / parameter pair in broadcast form.

    Size-1 dimensions of x are dropped; neighbouring dimensions broadcast the same way are
    merged. If more than three runs remain, the parameters are broadcast along the leading
    shared runs until three are left (see the module docstring).
    """
    x_shape, p_shape = tuple(x_shape), tuple(p_shape)
    assert len(x_shape) == len(p_shape), (x_shape, p_shape)
    dims = [(n, p == n) for n, p in zip(x_shape, p_shape) if n != 1]
    expand = None
    # Merge leading shared runs into full ones until at most 3 runs are left.
    runs = _runs(dims)
    if len(runs) > 3:
        expand = list(p_shape)
        k = 0
        while len(_runs(dims)) > 3:
            # the first shared dim becomes a full one
            idx = next(i for i, (_, full) in enumerate(dims) if not full)
            dims[idx] = (dims[idx][0], True)
            k += 1
        # record which x dims became full
        it = iter(dims)
        for i, n in enumerate(x_shape):
            if n == 1:
                continue
            _, full = next(it)
            if full:
                expand[i] = n
        expand = tuple(expand)
        runs = _runs(dims)
    sizes = [math.prod(n for n, _ in run) for run in runs]
    fulls = [run[0][1] for run in runs]
    while len(sizes) < 3:
        sizes.insert(0, 1)
        fulls.insert(0, False)
    return CanonicalView(tuple(sizes), tuple(fulls), expand)


def _runs(dims):
    runs: list[list[tuple[int, bool]]] = []
    for d in dims:
        if runs and runs[-1][0][1] == d[1]:
            runs[-1].append(d)
        else:
            runs.append([d])
    return runs
