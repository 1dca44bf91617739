"""Plain-jnp reference of the LSQ (learnable scale / zero point) fake-quantize backward.

The spec, the CPU lowering of the ``jaxquant_lsq_backward`` primitive and the test oracle of the
Pallas kernel (``jaxquant.pallas.lsq``). Operands in broadcast form (``jaxquant.granularity``):
``dy``, ``x`` of one shape, ``scale`` and the *rounded* zero point ``zp`` (an integer-valued float
array, or None for 0) whose dimensions are 1 or x's. Per element (float32; float64 for float64 x)::

    inv = 1 / scale                      v = rne(x * inv + zp)   (float32 add, then round)
    m   = qmin <= v <= qmax
    dx      = dy * m
    dscale  = ((dy * ((v - zp) * scale - x)) * inv) * gf     if m        (xfq = (v - zp) * scale)
            = (dy * (qmin - zp)) * gf                        if v < qmin
            = (dy * (qmax - zp)) * gf                        if v > qmax
    dzp     = 0                                              if m
            = ((-dy) * scale) * gf                           otherwise

then ``dscale`` and ``dzp`` are summed over the elements sharing a parameter. These are the
per-element formulas of PyTorch's ``_fake_quantize_learnable_per_{tensor,channel}_affine``
backward (``gf`` = ``grad_factor``), evaluated in the same order, so each term is bit-identical to
torch's; only the order of the final sums differs. Note the rounding: like torch's backward
kernels we round ``x * inv + zp`` (add first), whereas the forward (``jaxquant.fake_quantize``,
and torch's forward) rounds ``x * inv`` and then adds the integer zero point: the two differ only
at .5 ties when zp is odd (and where the float add itself rounds). A NaN ``x`` gives ``dx = dy * 0`` and a NaN
``dscale`` term.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxquant.core import numerics as ref

__all__ = ["lsq_terms", "lsq_backward_bf"]


def lsq_terms(dy, x, scale, zp, *, qmin, qmax, grad_factor):
    """Per-element ``(dx, dscale_term, dzp_term)`` in the compute dtype (dx in x's dtype)."""
    ct = ref.compute_dtype(x.dtype)
    xs, dys = x.astype(ct), dy.astype(ct)
    s = scale.astype(ct)
    z = jnp.zeros((), ct) if zp is None else zp.astype(ct)
    gf = jnp.asarray(grad_factor, ct)
    inv = ref.recip(s)
    v = jnp.round(xs * inv + z)
    m = (v >= qmin) & (v <= qmax)
    below = v < qmin
    above = v > qmax
    dx = jnp.where(m, dys, dys * jnp.zeros((), ct)).astype(x.dtype)
    xfq = ref.plus_zero(v - z) * s
    ds_in = ((dys * (xfq - xs)) * inv) * gf
    ds_lo = (dys * (jnp.asarray(qmin, ct) - z)) * gf
    ds_hi = (dys * (jnp.asarray(qmax, ct) - z)) * gf
    ds = jnp.where(below, ds_lo, jnp.where(above, ds_hi, ds_in))
    dz = jnp.where(below | above, ((-dys) * s) * gf, jnp.zeros((), ct))
    return dx, ds, dz


def _sum_to(t, shape):
    axes = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return jnp.reshape(jnp.sum(t, axis=axes, keepdims=True), shape)


def lsq_backward_bf(dy, x, scale, zp, *, qmin, qmax, grad_factor):
    """``(dx, dscale, dzp)``: dscale/dzp summed to ``scale.shape`` in the compute dtype (dzp None if zp is None)."""
    dx, ds, dz = lsq_terms(dy, x, scale, zp, qmin=qmin, qmax=qmax, grad_factor=grad_factor)
    shape = jnp.broadcast_shapes(scale.shape, (1,) * x.ndim)
    return dx, _sum_to(ds, shape), (None if zp is None else _sum_to(dz, shape))
