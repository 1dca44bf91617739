"""Plain-jnp reference of ``weight_only_linear`` (the spec of the forward)::

    W = (q - zp) * scale                     float32 [N, K] (jaxquant.dequantize_weight)
    y = (dot(x.astype(f32), W^T, precision=HIGHEST, accumulate f32) + bias.astype(f32)).astype(x.dtype)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.primitives.weights import dequantize_weight_raw

__all__ = ["weight_only_linear_reference"]


def weight_only_linear_reference(x, codes, scale, zero_point, bias, *, bits, group_size, symmetric):
    """Dequantize to float32, float32 dot, bias, cast to x's dtype."""
    w = dequantize_weight_raw(codes, scale, zero_point, bits=bits, group_size=group_size, symmetric=symmetric,
                              dtype=jnp.float32)
    y = jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (1,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
