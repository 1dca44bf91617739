"""``quantize_weight`` / ``dequantize_weight``: float weights <-> ``QuantizedWeight``.

The layout (int4 nibble order, scale shapes) and the formulas are ``jaxquant.core.weights``'s
module docstring; the parameters and codes come from ``choose_qparams`` and ``quantize``, so they
are the library's numerics bit for bit.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core import validation as V
from jaxquant.core.weights import (QuantizedWeight, BITS, check_group_size, check_quantized_weight, code_range,
                                   pack_int4, unpack_int4)
from jaxquant.primitives.affine import reference as affine_ref
from jaxquant.primitives.affine.api import quantize_with_computed_params
from jaxquant.primitives.dynamic.api import choose_qparams

__all__ = ["quantize_weight", "dequantize_weight", "dequantize_weight_raw"]


def quantize_weight(w, *, bits: int = 8, group_size: int | None = None, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a float weight ``w [N, K]`` (``y = x @ w^T``) to int4 or int8 codes.

    Args:
      w: float16 / bfloat16 / float32 array of shape ``[N, K]``.
      bits: 4 (two codes per byte, nibble order in the module docstring) or 8.
      group_size: None for one scale per output row, or a power of two >= 16 dividing K for
        one scale per ``group_size`` consecutive k of each row.
      symmetric: zero point 0 (signed codes) or a per-(row, group) int32 zero point.

    Returns a ``QuantizedWeight``; formulas in the module docstring (docs/numerics.md, dynamic
    parameters). Not differentiable (the codes are integers); works under ``jax.jit``.
    """
    w = V.float_array("w", w)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-d weight [N, K] (y = x @ w^T), got shape {tuple(w.shape)}")
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    n, k = w.shape
    group_size = check_group_size(group_size, k, shape=w.shape)
    if bits == 4 and k % 2:
        raise ValueError(f"w: bits=4 packs two codes per byte and needs an even K, got shape {tuple(w.shape)}")
    symmetric = bool(symmetric)
    qmin, qmax = code_range(bits, symmetric)
    g = gran.PerChannel(0) if group_size is None else gran.PerGroup(group_size)
    w = jax.lax.stop_gradient(w)
    scale, zp = choose_qparams(w, granularity=g, qmin=qmin, qmax=qmax, symmetric=symmetric)
    cdt = jnp.uint8 if (bits == 4 and not symmetric) else jnp.int8
    q = quantize_with_computed_params(w, scale, None if symmetric else zp, granularity=g, qmin=qmin, qmax=qmax,
                                      dtype=cdt)
    codes = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(codes, scale.astype(jnp.float32), None if symmetric else zp.astype(jnp.int32),
                           bits=bits, group_size=group_size, symmetric=symmetric, shape=(n, k))


def dequantize_weight(qw: QuantizedWeight, dtype=jnp.float32):
    """The float weight ``[N, K]``: ``(q - zp) * scale`` in float32, cast to ``dtype``.

    Plain jnp (XLA fuses the unpacking). Exact inverse of the codes: ``quantize_weight`` of the
    result gives the same codes back only up to the usual re-quantization rules, but
    ``dequantize_weight(qw)`` equals ``jaxquant.dequantize`` of the unpacked codes bit for bit.
    """
    qw = check_quantized_weight("qw", qw)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected a float dtype, got {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype: expected a float dtype, got {dt.name}")
    return dequantize_weight_raw(qw.codes, qw.scale, qw.zero_point, bits=qw.bits, group_size=qw.group_size,
                                 symmetric=qw.symmetric, dtype=dt)


def dequantize_weight_raw(codes, scale, zero_point, *, bits, group_size, symmetric, dtype=jnp.float32):
    """``dequantize_weight`` on the raw fields (no validation): the reference used by the primitives."""
    q = unpack_int4(codes, signed=symmetric) if bits == 4 else codes
    g = gran.PerChannel(0) if group_size is None else gran.PerGroup(group_size)
    return affine_ref.dequantize(q, scale, zero_point, granularity=g, dtype=dtype)
