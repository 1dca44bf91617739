"""Plain-jnp reference of the affine ops: the specification, the CPU lowering and the test oracle.

Numerics (docs/numerics.md). All arithmetic is float32 (float64 for float64 inputs); ``rne`` is
round-half-to-even (``jnp.round``)::

    inv_scale = 1 / scale                                   # one correctly rounded reciprocal
    v         = rne(x * inv_scale) + zp                     # round first, then add zp
    q         = clamp(v, qmin, qmax)                        # stored in the code dtype
    x_hat     = (q - zp) * scale                            # dequantize
    m         = qmin <= v <= qmax                           # STE mask, on the unclamped v
    fake_quantize(x)            = dequantize(quantize(x))   # in x's dtype
    d fake_quantize / dx        = dy * m
    d quantize / dx  (float q)  = dy * inv_scale * m

fp8 codes (``code`` = ``float8_e4m3fn`` or ``float8_e5m2``, ``fmax`` = 448 / 57344; symmetric,
no qmin / qmax / zero point)::

    v         = x * inv_scale
    q         = cast_rne(clamp(v, -fmax, fmax))             # NaN stays NaN, +-Inf -> +-fmax
    x_hat     = f32(q) * scale                              # dequantize (no -0.0 fix: q's sign kept)
    m         = |v| <= fmax                                 # STE mask (False for NaN, +-Inf)

equal to PyTorch's ``torch.clamp(x * inv, -fmax, fmax).to(torch.float8_e4m3fn)`` bit for bit.

Special values: a NaN ``v`` gives the code ``qmin``; ``+Inf`` saturates to ``qmax`` and ``-Inf``
to ``qmin``; the mask is False for all three (their gradient is 0). This equals PyTorch's CPU
``fake_quantize_per_tensor_affine`` (PyTorch's per-channel kernel maps ``+Inf`` to ``qmin``
through an undefined float->int cast; we saturate). Scales must be finite and > 0; a zero,
negative-zero, Inf or NaN scale follows the rules above (e.g. ``scale = 0`` makes every
code of a non-zero x saturate and 0 * Inf = NaN give ``qmin``).

The functions with a ``_bf`` suffix work on the *broadcast form* (``granularity.py``): the
parameters have x's rank and broadcast against it. They are the CPU lowering of the primitives.
The public-style functions without the suffix take a granularity, like ``jaxquant``'s API.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core.numerics import compute_dtype, fp8_clamp, fp8_max, is_fp8, plus_zero, recip, ste, to_code, to_fp8

__all__ = ["affine_codes", "quantize_bf", "dequantize_bf", "fake_quantize_bf", "fake_quantize_backward_bf",
           "quantize_backward_bf", "quantize", "dequantize", "fake_quantize", "quantize_backward",
           "fake_quantize_backward", "code_range", "fp8_codes", "quantize_fp8_bf", "dequantize_fp8_bf",
           "fake_quantize_fp8_bf", "fake_quantize_backward_fp8_bf", "quantize_backward_fp8_bf"]


def affine_codes(x, scale, zp, qmin, qmax):
    """Returns ``(q, m)``: codes ``clamp(rne(x * (1/scale)) + zp)`` as floats, and the STE mask.

    ``x``, ``scale`` are in the compute dtype, ``zp`` is already converted to it.
    """
    v = jnp.round(x * recip(scale)) + zp
    m = (v >= qmin) & (v <= qmax)
    return to_code(v, qmin, qmax), m


def _params(x_dtype, scale, zp):
    ct = compute_dtype(x_dtype)
    s = scale.astype(ct)
    z = jnp.zeros((), ct) if zp is None else zp.astype(ct)
    return ct, s, z


def quantize_bf(x, scale, zp, *, qmin, qmax, dtype):
    """Codes of x in ``dtype`` (an int container, or a float dtype for real-valued codes)."""
    ct, s, z = _params(x.dtype, scale, zp)
    q, _ = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return q.astype(dtype)


def dequantize_bf(q, scale, zp, *, dtype):
    """``(q - zp) * scale`` in the compute dtype of ``dtype``, cast to ``dtype``."""
    ct, s, z = _params(dtype, scale, zp)
    return (plus_zero(q.astype(ct) - z) * s).astype(dtype)


def fake_quantize_bf(x, scale, zp, *, qmin, qmax):
    """``dequantize(quantize(x))`` in x's dtype."""
    ct, s, z = _params(x.dtype, scale, zp)
    q, _ = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return (plus_zero(q - z) * s).astype(x.dtype)


def fake_quantize_backward_bf(dy, x, scale, zp, *, qmin, qmax):
    """STE of fake_quantize: ``dy * m``, in x's dtype."""
    ct, s, z = _params(x.dtype, scale, zp)
    _, m = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return ste(dy.astype(ct), m).astype(x.dtype)


def quantize_backward_bf(dy, x, scale, zp, *, qmin, qmax):
    """STE of quantize with real-valued codes: ``dy * (1/scale) * m``, in x's dtype."""
    ct, s, z = _params(x.dtype, scale, zp)
    _, m = affine_codes(x.astype(ct), s, z, qmin, qmax)
    return ste(dy.astype(ct) * recip(s), m).astype(x.dtype)


def fp8_codes(x, scale, code):
    """Returns ``(c, m)``: ``clamp(x * (1/scale), -fmax, fmax)`` (not yet cast) and the STE mask."""
    fmax = fp8_max(code)
    v = x * recip(scale)
    return fp8_clamp(v, fmax), jnp.abs(v) <= fmax


def quantize_fp8_bf(x, scale, *, code):
    """fp8 codes of x in the format ``code``."""
    ct = compute_dtype(x.dtype)
    c, _ = fp8_codes(x.astype(ct), scale.astype(ct), code)
    return to_fp8(c, code)


def dequantize_fp8_bf(q, scale, *, dtype):
    """``f32(q) * scale`` cast to ``dtype``."""
    ct = compute_dtype(dtype)
    return (q.astype(ct) * scale.astype(ct)).astype(dtype)


def fake_quantize_fp8_bf(x, scale, *, code):
    """``dequantize(quantize(x))`` through fp8 codes, in x's dtype."""
    ct = compute_dtype(x.dtype)
    s = scale.astype(ct)
    c, _ = fp8_codes(x.astype(ct), s, code)
    return (to_fp8(c, code).astype(ct) * s).astype(x.dtype)


def fake_quantize_backward_fp8_bf(dy, x, scale, *, code):
    """STE of the fp8 fake_quantize: ``dy * (|x * (1/scale)| <= fmax)``, in x's dtype."""
    ct = compute_dtype(x.dtype)
    _, m = fp8_codes(x.astype(ct), scale.astype(ct), code)
    return ste(dy.astype(ct), m).astype(x.dtype)


def quantize_backward_fp8_bf(dy, x, scale, *, code):
    """STE of the fp8 quantize (codes as reals): ``dy * (1/scale) * m``, in x's dtype."""
    ct = compute_dtype(x.dtype)
    s = scale.astype(ct)
    _, m = fp8_codes(x.astype(ct), s, code)
    return ste(dy.astype(ct) * recip(s), m).astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Granularity-level reference API (same meaning as the public jaxquant functions).
# ----------------------------------------------------------------------------------------


def code_range(dtype, qmin, qmax):
    if qmin is None or qmax is None:
        info = jnp.iinfo(dtype)
        qmin = info.min if qmin is None else qmin
        qmax = info.max if qmax is None else qmax
    return int(qmin), int(qmax)


def _bf(x, scale, zero_point, granularity):
    gran.check_granularity(granularity, x.shape)
    xb, sb = gran.to_broadcast_form(x, jnp.asarray(scale), granularity)
    zb = None
    if zero_point is not None:
        _, zb = gran.to_broadcast_form(x, jnp.asarray(zero_point), granularity)
    return xb, sb, zb


def quantize(x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, dtype=jnp.int8):
    if is_fp8(dtype):
        xb, sb, _ = _bf(x, scale, None, granularity)
        return gran.from_broadcast_form(quantize_fp8_bf(xb, sb, code=dtype), x.shape)
    qmin, qmax = code_range(dtype, qmin, qmax)
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    return gran.from_broadcast_form(quantize_bf(xb, sb, zb, qmin=qmin, qmax=qmax, dtype=dtype), x.shape)


def dequantize(q, scale, zero_point=None, *, granularity, dtype=jnp.float32):
    qb, sb, zb = _bf(q, scale, zero_point, granularity)
    if is_fp8(q.dtype):
        return gran.from_broadcast_form(dequantize_fp8_bf(qb, sb, dtype=dtype), q.shape)
    return gran.from_broadcast_form(dequantize_bf(qb, sb, zb, dtype=dtype), q.shape)


def fake_quantize(x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, code_dtype=None):
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    if code_dtype is not None:
        return gran.from_broadcast_form(fake_quantize_fp8_bf(xb, sb, code=code_dtype), x.shape)
    return gran.from_broadcast_form(fake_quantize_bf(xb, sb, zb, qmin=qmin, qmax=qmax), x.shape)


def fake_quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, code_dtype=None):
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    dyb = jnp.reshape(dy, xb.shape)
    if code_dtype is not None:
        out = fake_quantize_backward_fp8_bf(dyb, xb, sb, code=code_dtype)
    else:
        out = fake_quantize_backward_bf(dyb, xb, sb, zb, qmin=qmin, qmax=qmax)
    return gran.from_broadcast_form(out, x.shape)


def quantize_backward(dy, x, scale, zero_point=None, *, granularity, qmin=None, qmax=None, dtype=None):
    xb, sb, zb = _bf(x, scale, zero_point, granularity)
    dyb = jnp.reshape(dy, xb.shape)
    if is_fp8(dtype):
        out = quantize_backward_fp8_bf(dyb, xb, sb, code=dtype)
    else:
        out = quantize_backward_bf(dyb, xb, sb, zb, qmin=qmin, qmax=qmax)
    return gran.from_broadcast_form(out, x.shape)


