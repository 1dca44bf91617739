"""How a Flax layer's kernel and input map onto the library's 2-D linear layer ``y = x @ W^T``.

Every layer kind ``jaxquant.flax.quantize`` handles contracts some axes of its input ``x`` with
some axes of its kernel and keeps the others. ``Geometry`` records which, so one set of ops
(``jaxquant.quantized_linear``, ``jaxquant.weight_only_linear``, ``jaxquant.fake_quantize``) serves
all of them:

=================================  ========================  ================  ==================
layer                              kernel                    contracted         W ``[N, K]``
=================================  ========================  ================  ==================
``nnx.Linear`` / ``nn.Dense``      ``[K, N]``                last axis of x     ``kernel.T``
``nnx.LinearGeneral`` /            ``in_features +           ``axis`` of x      ``kernel`` reshaped
``nn.DenseGeneral``                out_features``                               to ``[K, N]``, ``.T``
``nnx.Einsum`` / ``nn.Einsum``     any                       indices of the     kernel permuted to
                                                             kernel not in the  (contracted, kept),
                                                             output             reshaped, ``.T``
=================================  ========================  ================  ==================

``K`` is the product of the contracted kernel axes, ``N`` the product of the kept ones, in kernel
order. The forward moves the contracted axes of ``x`` to the end (in kernel order), flattens them
to ``K``, runs the 2-D op on ``[..., K]``, unflattens ``N`` and (einsum) transposes to the output
order. So per-token activation scales are per row of the flattened ``[..., K]`` view, and the
attention output projection (``(heads, head_dim)`` contracted) is one K = heads * head_dim matmul.

An einsum is a matmul when every kernel index is either contracted with the input (in the
input, not in the output) or kept (in the output, not in the input): no batch index shared by
input, kernel and output, no index summed away on one operand, no ellipsis in the kernel.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

__all__ = ["Geometry", "UnsupportedLayer", "linear", "general", "einsum"]


class UnsupportedLayer(ValueError):
    """A layer whose contraction is not a matmul with a 2-D weight (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The contraction of one layer (module docstring). Frozen and hashable: static in a graph.

    Attributes:
      kind: the layer's class name, e.g. ``"Linear"``, ``"LinearGeneral"``, ``"Einsum"``, ``"Dense"``.
      kernel_shape: the float kernel's shape.
      in_dims / out_dims: kernel axes contracted / kept, in kernel order.
      axis: the contracted input axes (negative, matching ``in_dims``) for (Dense|Linear)(General).
      einsum: the equation of an einsum layer (its lhs / output order the axes instead of ``axis``).
      bias_shape: the float bias' shape, or None.
    """

    kind: str
    kernel_shape: tuple[int, ...]
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    axis: tuple[int, ...] | None = None
    einsum: str | None = None
    bias_shape: tuple[int, ...] | None = None

    @property
    def k(self) -> int:
        return math.prod(self.kernel_shape[d] for d in self.in_dims)

    @property
    def n(self) -> int:
        return math.prod(self.kernel_shape[d] for d in self.out_dims)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel_shape[d] for d in self.out_dims)

    @property
    def flat_bias(self) -> bool:
        """The bias has the kept kernel shape (added to ``[..., N]`` inside the op's epilogue);
        otherwise (einsum) it is broadcast onto the output after the op."""
        return self.einsum is None

    # -- weights ------------------------------------------------------------------------------
    def weight(self, kernel):
        """The ``[N, K]`` weight of a float kernel (same dtype)."""
        perm = self.in_dims + self.out_dims
        kt = kernel if perm == tuple(range(len(perm))) else jnp.transpose(kernel, perm)
        return jnp.reshape(kt, (self.k, self.n)).T

    def kernel(self, w):
        """Inverse of ``weight``: the kernel holding ``w [N, K]``."""
        perm = self.in_dims + self.out_dims
        kt = jnp.reshape(w.T, tuple(self.kernel_shape[d] for d in perm))
        inv = tuple(perm.index(d) for d in range(len(perm)))
        return kt if inv == tuple(range(len(perm))) else jnp.transpose(kt, inv)

    # -- forward ------------------------------------------------------------------------------
    def _plan(self, ndim: int):
        """``(x_perm, y_perm or None, bias_shape or None)`` for an input of rank ``ndim``."""
        n_in = len(self.in_dims)
        if self.einsum is None:
            axes = tuple(a % ndim for a in self.axis) if ndim >= n_in else None
            if axes is None or len(set(axes)) != n_in:
                raise ValueError(f"{self.kind}: input of rank {ndim} cannot be contracted on axes {self.axis}")
            free = tuple(a for a in range(ndim) if a not in axes)
            return free + axes, None, None
        lhs, rhs, out = _split(self.einsum)
        lhs_t, out_t = _expand(lhs, ndim, self.kind), _expand(out, ndim + len(self.out_dims) - n_in, self.kind)
        contracted = [rhs[d] for d in self.in_dims]
        kept = [rhs[d] for d in self.out_dims]
        free = [t for t in lhs_t if t not in contracted]
        x_perm = tuple(lhs_t.index(t) for t in free + contracted)
        y_tokens = free + kept
        y_perm = tuple(y_tokens.index(t) for t in out_t)
        bshape = None
        if self.bias_shape is not None:
            bshape = tuple(self.kernel_shape[rhs.index(t)] if t in rhs else 1 for t in out_t)
        return x_perm, (None if y_perm == tuple(range(len(y_perm))) else y_perm), bshape

    def apply(self, x, matmul, bias=None):
        """``matmul([..., K]) -> [..., N]`` applied to ``x`` in this layer's geometry. A flat bias
        (``flat_bias``) is the op's business; an einsum bias is added here (in the output dtype)."""
        x_perm, y_perm, bshape = self._plan(x.ndim)
        xt = x if x_perm == tuple(range(x.ndim)) else jnp.transpose(x, x_perm)
        free = xt.shape[:x.ndim - len(self.in_dims)]
        y = matmul(jnp.reshape(xt, free + (self.k,)))
        y = jnp.reshape(y, free + self.out_shape)
        if y_perm is not None:
            y = jnp.transpose(y, y_perm)
        if bias is not None and not self.flat_bias:
            y = y + jnp.reshape(bias, bshape).astype(y.dtype)
        return y

    def rows(self, x):
        """``x`` as the ``[T, K]`` rows the op sees (calibration statistics) and the free shape."""
        x_perm, _, _ = self._plan(x.ndim)
        xt = x if x_perm == tuple(range(x.ndim)) else jnp.transpose(x, x_perm)
        free = xt.shape[:x.ndim - len(self.in_dims)]
        return jnp.reshape(xt, (-1, self.k)), free


# ------------------------------------------------------------------------------------------
# constructors
# ------------------------------------------------------------------------------------------
def linear(kind: str, kernel_shape, bias_shape=None) -> Geometry:
    """``nnx.Linear`` / ``nn.Dense``: kernel ``[K, N]``, x contracted on its last axis."""
    if len(kernel_shape) != 2:
        raise UnsupportedLayer(f"expected a 2-d kernel [K, N], got shape {tuple(kernel_shape)}")
    return Geometry(kind, tuple(kernel_shape), (0,), (1,), axis=(-1,),
                    bias_shape=None if bias_shape is None else tuple(bias_shape))


def general(kind: str, kernel_shape, axis, n_batch: int = 0, bias_shape=None) -> Geometry:
    """``nnx.LinearGeneral`` / ``nn.DenseGeneral``: kernel ``in_features + out_features``."""
    if n_batch:
        raise UnsupportedLayer("batch axes (batch_axis / batch_dims) make one weight per batch entry, "
                               "not one matmul")
    axis = tuple(int(a) for a in axis)
    n_in = len(axis)
    return Geometry(kind, tuple(kernel_shape), tuple(range(n_in)), tuple(range(n_in, len(kernel_shape))),
                    axis=axis, bias_shape=None if bias_shape is None else tuple(bias_shape))


def _split(spec: str):
    spec = spec.replace(" ", "")
    if spec.count("->") != 1 or spec.count(",") != 1:
        raise UnsupportedLayer(f"einsum {spec!r}: expected 'input,kernel->output'")
    ops, out = spec.split("->")
    lhs, rhs = ops.split(",")
    return lhs, rhs, out


def _expand(term: str, ndim: int, kind: str) -> list[str]:
    """Tokens of one einsum operand, the ellipsis expanded to ``ndim`` minus the named axes."""
    if "..." not in term:
        if len(term) != ndim:
            raise ValueError(f"{kind}: einsum term {term!r} names {len(term)} axes, the array has {ndim}")
        return list(term)
    head, tail = term.split("...")
    n = ndim - len(head) - len(tail)
    if n < 0:
        raise ValueError(f"{kind}: einsum term {term!r} needs rank >= {len(head) + len(tail)}, got {ndim}")
    return list(head) + [f"...{i}" for i in range(n)] + list(tail)


def einsum(kind: str, spec: str, kernel_shape, bias_shape=None) -> Geometry:
    """``nnx.Einsum`` / ``nn.Einsum`` whose equation is a matmul (module docstring)."""
    spec = spec.replace(" ", "")
    lhs, rhs, out = _split(spec)
    if "..." in rhs:
        raise UnsupportedLayer(f"einsum {spec!r}: an ellipsis in the kernel term")
    if ("..." in lhs) != ("..." in out):
        raise UnsupportedLayer(f"einsum {spec!r}: the ellipsis must appear in both the input and the output")
    named_l = lhs.replace("...", "")
    named_o = out.replace("...", "")
    for term in (named_l, rhs, named_o):
        if len(set(term)) != len(term):
            raise UnsupportedLayer(f"einsum {spec!r}: a repeated index (a trace or diagonal) in {term!r}")
    if len(rhs) != len(kernel_shape):
        raise UnsupportedLayer(f"einsum {spec!r}: the kernel term names {len(rhs)} axes, the kernel has shape "
                               f"{tuple(kernel_shape)}")
    for c in rhs:
        if c in named_l and c in named_o:
            raise UnsupportedLayer(f"einsum {spec!r}: index {c!r} is a batch index (in the input, the kernel and "
                                   "the output), so the contraction is not one matmul")
        if c not in named_l and c not in named_o:
            raise UnsupportedLayer(f"einsum {spec!r}: kernel index {c!r} is summed away")
    for c in named_l:
        if c not in rhs and c not in named_o:
            raise UnsupportedLayer(f"einsum {spec!r}: input index {c!r} is summed away")
    for c in named_o:
        if c not in rhs and c not in named_l:
            raise UnsupportedLayer(f"einsum {spec!r}: output index {c!r} comes from no operand")
    in_dims = tuple(i for i, c in enumerate(rhs) if c in named_l)
    out_dims = tuple(i for i, c in enumerate(rhs) if c not in named_l)
    if not in_dims or not out_dims:
        raise UnsupportedLayer(f"einsum {spec!r}: the kernel must have contracted and kept axes")
    return Geometry(kind, tuple(kernel_shape), in_dims, out_dims, einsum=spec,
                    bias_shape=None if bias_shape is None else tuple(bias_shape))
