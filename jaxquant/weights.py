"""Quantized weights: the ``QuantizedWeight`` pytree, int4 packing, ``quantize_weight`` / ``dequantize_weight``.

Layout. A linear layer's weight is ``W [N, K]`` (``nn.Linear`` layout, ``y = x @ W^T``). It is
quantized per output row ``n``: one (scale, zero point) per ``(n, group)`` for group-wise
quantization (``group_size=g``: K is cut into ``K // g`` groups of ``g`` consecutive k), or one
per row for per-channel quantization (``group_size=None``).

================  ==========================================  ===========================
field             bits=8                                      bits=4
================  ==========================================  ===========================
``codes``         int8 ``[N, K]``, one code per byte          int8 ``[N, K // 2]``, packed
``scale``         float32 ``[N, K // g]`` (or ``[N]`` per-channel)
``zero_point``    int32, same shape as ``scale``; ``None`` when ``symmetric=True``
code range        symmetric -128..127 (zp = 0);               symmetric -8..7 (zp = 0);
                  asymmetric -128..127 with zp in -128..127   asymmetric 0..15, zp in 0..15
================  ==========================================  ===========================

int4 nibble order: byte ``j`` of row ``n`` holds code ``k = 2j`` in its LOW nibble (bits 0-3)
and ``k = 2j + 1`` in its HIGH nibble (bits 4-7)::

    byte = (q[n, 2j] & 0xF) | (q[n, 2j+1] << 4)          (stored as int8: the same 8 bits)
    signed   (symmetric):  q[n, 2j] = (byte << 4) >> 4    q[n, 2j+1] = byte >> 4   (arithmetic shifts)
    unsigned (asymmetric): q[n, 2j] = byte & 0xF          q[n, 2j+1] = (byte >> 4) & 0xF

so device memory holds 0.5 byte per weight plus 4 bytes (8 asymmetric) per group.

Numerics are the library's (DESIGN.md §1), computed through ``choose_qparams`` and ``quantize``
with ``qmin/qmax`` = -8/7 (int4 symmetric), 0/15 (int4 asymmetric), -128/127 (int8)::

    symmetric:   scale = max(amax * f32(1/qmax), 2**-126)        zp = 0
    asymmetric:  lo = min(min w, 0), hi = max(max w, 0)
                 scale = max((hi - lo) * f32(1/(qmax - qmin)), 2**-126)
                 zp    = clamp(qmin - rne(lo * (1/scale)), qmin, qmax)
    q = clamp(rne(w * (1/scale)) + zp, qmin, qmax)
    dequantize:  w_hat = (q - zp) * scale      (float32, then cast)

The statistics are taken over each (row, group) or each row. Symmetric int4 uses amax/7, so the
code -8 only appears when rounding pushes below -7 (never for finite weights). A row/group with
NaN gets a NaN scale and dequantizes to NaN; scales are > 0 otherwise.

``QuantizedWeight`` is a registered pytree: ``codes``, ``scale``, ``zero_point`` are its
children (``zero_point=None`` is an empty subtree), ``bits``, ``group_size``, ``symmetric`` and
``shape`` are static. It passes through ``jax.jit``, ``vmap`` (as an unbatched argument) and any
pytree checkpointer (e.g. orbax), and gets no gradient in ``weight_only_linear``.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant import reference as ref

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "pack_int4", "unpack_int4",
           "unpack_codes", "code_range", "check_quantized_weight"]

_BITS = (4, 8)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of the codes for ``bits`` and ``symmetric`` (see the module table)."""
    if bits == 4:
        return (-8, 7) if symmetric else (0, 15)
    return -128, 127


@jax.tree_util.register_pytree_with_keys_class
class QuantizedWeight:
    """A weight ``W [N, K]`` quantized to 4 or 8 bits (layout and math: the module docstring).

    Attributes:
      codes: int8 ``[N, K]`` (bits=8) or int8 ``[N, K // 2]`` (bits=4, two codes per byte).
      scale: float32 ``[N, K // group_size]``, or ``[N]`` when ``group_size is None``.
      zero_point: int32 of ``scale``'s shape, or ``None`` (symmetric).
      bits: 4 or 8 (static).
      group_size: int or None for per-channel (static).
      symmetric: bool (static).
      shape: ``(N, K)`` of the float weight (static).
    """

    __slots__ = ("codes", "scale", "zero_point", "bits", "group_size", "symmetric", "shape")

    def __init__(self, codes, scale, zero_point, *, bits: int, group_size: int | None, symmetric: bool, shape):
        self.codes = codes
        self.scale = scale
        self.zero_point = zero_point
        self.bits = int(bits)
        self.group_size = None if group_size is None else int(group_size)
        self.symmetric = bool(symmetric)
        self.shape = tuple(int(s) for s in shape)

    # -- pytree --------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        k = jax.tree_util.GetAttrKey
        children = ((k("codes"), self.codes), (k("scale"), self.scale), (k("zero_point"), self.zero_point))
        return children, (self.bits, self.group_size, self.symmetric, self.shape)

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero_point), (self.bits, self.group_size, self.symmetric, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation: transformations rebuild the object with tracers, None or sentinels.
        obj = object.__new__(cls)
        obj.codes, obj.scale, obj.zero_point = children
        obj.bits, obj.group_size, obj.symmetric, obj.shape = aux
        return obj

    # -- conveniences --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of device memory held by the leaves (codes + scales + zero points)."""
        return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                       for a in jax.tree_util.tree_leaves(self) if hasattr(a, "dtype")))

    @property
    def granularity(self):
        """The granularity of ``scale`` on the ``[N, K]`` weight: ``PerChannel(0)`` or ``PerGroup(g)``."""
        return gran.PerChannel(0) if self.group_size is None else gran.PerGroup(self.group_size)

    def dequantize(self, dtype=jnp.float32):
        return dequantize_weight(self, dtype)

    def __repr__(self):
        def desc(a):
            if a is None:
                return "None"
            if hasattr(a, "dtype") and hasattr(a, "shape"):
                return f"{np.dtype(a.dtype).name}{list(a.shape)}"
            return type(a).__name__
        try:
            size = f"{self.nbytes:,}"
        except Exception:  # leaves replaced by non-arrays inside a transformation
            size = "?"
        g = "per-channel" if self.group_size is None else self.group_size
        return (f"QuantizedWeight(shape={self.shape}, bits={self.bits}, group_size={g}, "
                f"symmetric={self.symmetric}, bytes={size}, codes={desc(self.codes)}, "
                f"scale={desc(self.scale)}, zero_point={desc(self.zero_point)})")


# ----------------------------------------------------------------------------------------
# int4 packing (plain jnp: runs under jit on any backend)
# ----------------------------------------------------------------------------------------


def pack_int4(q):
    """Pack int4 codes ``[..., K]`` (K even; values in -8..7 or 0..15, any int dtype) into int8 ``[..., K // 2]``.

    Byte ``j`` = ``(q[2j] & 0xF) | (q[2j+1] << 4)``: element ``2j`` in the low nibble.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"q: expected an even last axis to pack two int4 codes per byte, got shape {tuple(q.shape)}")
    q = q.astype(jnp.int32)
    pairs = jnp.reshape(q, q.shape[:-1] + (q.shape[-1] // 2, 2))
    byte = (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)
    # 0..255 -> the int8 with the same bits.
    return jnp.where(byte > 127, byte - 256, byte).astype(jnp.int8)


def unpack_int4(packed, *, signed: bool):
    """Inverse of ``pack_int4``: int8 ``[..., K // 2]`` -> int8 codes ``[..., K]``.

    ``signed``: two's-complement nibbles -8..7 (symmetric weights); else unsigned 0..15.
    """
    b = packed.astype(jnp.int8)
    if signed:
        lo = jnp.right_shift(jnp.left_shift(b, jnp.int8(4)), jnp.int8(4))
        hi = jnp.right_shift(b, jnp.int8(4))
    else:
        lo = b & jnp.int8(0xF)
        hi = jnp.right_shift(b, jnp.int8(4)) & jnp.int8(0xF)
    return jnp.reshape(jnp.stack([lo, hi], axis=-1), b.shape[:-1] + (2 * b.shape[-1],))


def unpack_codes(qw: QuantizedWeight):
    """The int8 codes ``[N, K]`` of a QuantizedWeight (unpacked for bits=4)."""
    if qw.bits == 4:
        return unpack_int4(qw.codes, signed=qw.symmetric)
    return qw.codes


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def _check_group_size(group_size, k, *, arg="w", shape=None):
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1 \
            or group_size & (group_size - 1) or group_size < 16:
        raise ValueError(
            f"group_size: expected None (per-channel) or a power of two >= 16 (e.g. 32, 64, 128, 256), "
            f"got {group_size!r}")
    if k % group_size:
        raise ValueError(
            f"group_size: K = {k} (the last axis of {arg}{'' if shape is None else ' of shape ' + str(tuple(shape))}) "
            f"must be a multiple of group_size = {group_size}")
    return int(group_size)


def check_quantized_weight(name: str, qw, *, k: int | None = None) -> QuantizedWeight:
    """Raise a clear error unless ``qw`` is a consistent QuantizedWeight (and of inner size ``k``)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{name}: expected a jaxquant.QuantizedWeight (from quantize_weight), got {type(qw).__name__}")
    if qw.bits not in _BITS:
        raise ValueError(f"{name}.bits: expected 4 or 8, got {qw.bits!r}")
    if len(qw.shape) != 2:
        raise ValueError(f"{name}.shape: expected (N, K), got {qw.shape!r}")
    n, kk = qw.shape
    _check_group_size(qw.group_size, kk, arg=f"{name} (shape {qw.shape})")
    if qw.bits == 4 and kk % 2:
        raise ValueError(f"{name}: bits=4 needs an even K, got shape {qw.shape}")
    exp_codes = (n, kk // 2) if qw.bits == 4 else (n, kk)
    for field, arr, dt, shp in (("codes", qw.codes, np.int8, exp_codes),
                                ("scale", qw.scale, np.float32,
                                 (n,) if qw.group_size is None else (n, kk // qw.group_size))):
        if not hasattr(arr, "dtype"):
            raise TypeError(f"{name}.{field}: expected an array, got {type(arr).__name__}")
        if np.dtype(arr.dtype) != np.dtype(dt) or tuple(arr.shape) != shp:
            raise ValueError(f"{name}.{field}: expected {np.dtype(dt).name} of shape {shp} for bits={qw.bits}, "
                             f"group_size={qw.group_size}, shape={qw.shape}; got {np.dtype(arr.dtype).name} of "
                             f"shape {tuple(arr.shape)}")
    if qw.symmetric:
        if qw.zero_point is not None:
            raise ValueError(f"{name}.zero_point: expected None for a symmetric weight, got an array")
    else:
        zp = qw.zero_point
        if zp is None or not hasattr(zp, "dtype") or np.dtype(zp.dtype) != np.int32 \
                or tuple(zp.shape) != tuple(qw.scale.shape):
            got = "None" if zp is None else f"{getattr(zp, 'dtype', type(zp).__name__)} {getattr(zp, 'shape', '')}"
            raise ValueError(f"{name}.zero_point: expected int32 of shape {tuple(qw.scale.shape)} for an "
                             f"asymmetric weight, got {got}")
    if k is not None and kk != k:
        raise ValueError(f"{name}: expected K = {k} (the last axis of x), got a weight of shape (N, K) = {qw.shape}")
    return qw


# ----------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------


def quantize_weight(w, *, bits: int = 8, group_size: int | None = None, symmetric: bool = True) -> QuantizedWeight:
    """Quantize a float weight ``w [N, K]`` (``y = x @ w^T``) to int4 or int8 codes.

    Args:
      w: float16 / bfloat16 / float32 array of shape ``[N, K]``.
      bits: 4 (two codes per byte, nibble order in the module docstring) or 8.
      group_size: None for one scale per output row, or a power of two >= 16 dividing K for
        one scale per ``group_size`` consecutive k of each row.
      symmetric: zero point 0 (signed codes) or a per-(row, group) int32 zero point.

    Returns a ``QuantizedWeight``; formulas in the module docstring (DESIGN.md §1 dynamic
    parameters). Not differentiable (the codes are integers); works under ``jax.jit``.
    """
    from jaxquant import _validation as V
    from jaxquant.primitives import api

    w = V.float_array("w", w)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-d weight [N, K] (y = x @ w^T), got shape {tuple(w.shape)}")
    if isinstance(bits, bool) or bits not in _BITS:
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    n, k = w.shape
    group_size = _check_group_size(group_size, k, shape=w.shape)
    if bits == 4 and k % 2:
        raise ValueError(f"w: bits=4 packs two codes per byte and needs an even K, got shape {tuple(w.shape)}")
    symmetric = bool(symmetric)
    qmin, qmax = code_range(bits, symmetric)
    g = gran.PerChannel(0) if group_size is None else gran.PerGroup(group_size)
    w = jax.lax.stop_gradient(w)
    scale, zp = api.choose_qparams(w, granularity=g, qmin=qmin, qmax=qmax, symmetric=symmetric)
    cdt = jnp.uint8 if (bits == 4 and not symmetric) else jnp.int8
    q = api.quantize(w, scale, None if symmetric else zp, granularity=g, qmin=qmin, qmax=qmax, dtype=cdt)
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
    return ref.dequantize(q, scale, zero_point, granularity=g, dtype=dtype)
