"""Quantized weights: the ``QuantizedWeight`` pytree and int4 packing (``jaxquant.quantize_weight``
builds them: ``jaxquant.primitives.weights``).

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

fp8 weights (``quantize_weight(w, dtype=jnp.float8_e4m3fn[, block_size=128])``, served by
``quantized_linear`` through the fp8 GEMM):

================  ==========================================  ===========================
field             per output channel (``block_size=None``)    ``block_size=b`` (e.g. 128)
================  ==========================================  ===========================
``codes``         fp8 ``[N, K]`` (``code_dtype``: float8_e4m3fn or float8_e5m2), one byte each
``scale``         float32 ``[N]``                             float32 ``[N // b, K // b]``
``zero_point``    ``None`` (fp8 codes are symmetric)
codes             ``cast_rne(clamp(w * (1/scale), -fmax, fmax))``, fmax 448 (e4m3fn) / 57344 (e5m2)
================  ==========================================  ===========================

with ``scale = max(amax * f32(1/fmax), 2**-126)`` over each row / ``b x b`` block and
``w_hat = f32(q) * scale``; ``bits = 8``, ``group_size = None``, ``symmetric = True``.

int4 nibble order: byte ``j`` of row ``n`` holds code ``k = 2j`` in its LOW nibble (bits 0-3)
and ``k = 2j + 1`` in its HIGH nibble (bits 4-7)::

    byte = (q[n, 2j] & 0xF) | (q[n, 2j+1] << 4)          (stored as int8: the same 8 bits)
    signed   (symmetric):  q[n, 2j] = (byte << 4) >> 4    q[n, 2j+1] = byte >> 4   (arithmetic shifts)
    unsigned (asymmetric): q[n, 2j] = byte & 0xF          q[n, 2j+1] = (byte >> 4) & 0xF

so device memory holds 0.5 byte per weight plus 4 bytes (8 asymmetric) per group.

Numerics are the library's (docs/numerics.md), computed through ``choose_qparams`` and ``quantize``
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
children (``zero_point=None`` is an empty subtree), ``bits``, ``group_size``, ``symmetric``,
``shape``, ``code_dtype`` (None for integer codes, else the fp8 format) and ``block_size`` are
static. It passes through ``jax.jit``, ``vmap`` (as an unbatched argument) and any
pytree checkpointer (e.g. orbax), and gets no gradient in ``weight_only_linear``.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core.numerics import FP8_DTYPES

__all__ = ["QuantizedWeight", "BITS", "pack_int4", "unpack_int4", "check_group_size", "check_block_size",
           "unpack_codes", "code_range", "check_quantized_weight"]

BITS = (4, 8)


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
      code_dtype: None for integer codes, or the fp8 format of fp8 codes (static).
      block_size: fp8 only: None (one scale per output channel) or ``b`` for ``b x b`` blocks (static).
    """

    __slots__ = ("codes", "scale", "zero_point", "bits", "group_size", "symmetric", "shape", "code_dtype",
                 "block_size")

    def __init__(self, codes, scale, zero_point, *, bits: int, group_size: int | None, symmetric: bool, shape,
                 code_dtype=None, block_size: int | None = None):
        self.codes = codes
        self.scale = scale
        self.zero_point = zero_point
        self.bits = int(bits)
        self.group_size = None if group_size is None else int(group_size)
        self.symmetric = bool(symmetric)
        self.shape = tuple(int(s) for s in shape)
        self.code_dtype = None if code_dtype is None else np.dtype(code_dtype)
        self.block_size = None if block_size is None else int(block_size)

    @property
    def is_fp8(self) -> bool:
        """Whether the codes are fp8 (``code_dtype`` float8_e4m3fn / float8_e5m2)."""
        return self.code_dtype is not None

    # -- pytree --------------------------------------------------------------------------
    def _aux(self):
        return (self.bits, self.group_size, self.symmetric, self.shape, self.code_dtype, self.block_size)

    def tree_flatten_with_keys(self):
        k = jax.tree_util.GetAttrKey
        children = ((k("codes"), self.codes), (k("scale"), self.scale), (k("zero_point"), self.zero_point))
        return children, self._aux()

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero_point), self._aux()

    @classmethod
    def tree_unflatten(cls, aux, children):
        # No validation: transformations rebuild the object with tracers, None or sentinels.
        obj = object.__new__(cls)
        obj.codes, obj.scale, obj.zero_point = children
        obj.bits, obj.group_size, obj.symmetric, obj.shape, obj.code_dtype, obj.block_size = aux
        return obj

    # -- conveniences --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of device memory held by the leaves (codes + scales + zero points)."""
        return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                       for a in jax.tree_util.tree_leaves(self) if hasattr(a, "dtype")))

    @property
    def granularity(self):
        """The granularity of ``scale`` on the ``[N, K]`` weight: ``PerChannel(0)``, ``PerGroup(g)`` or
        (fp8 block weights) ``PerBlock((b, b))``."""
        if self.block_size is not None:
            return gran.PerBlock((self.block_size, self.block_size))
        return gran.PerChannel(0) if self.group_size is None else gran.PerGroup(self.group_size)

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
        if self.is_fp8:
            blk = "per-channel" if self.block_size is None else f"{self.block_size}x{self.block_size}"
            return (f"QuantizedWeight(shape={self.shape}, code_dtype={self.code_dtype.name}, block={blk}, "
                    f"bytes={size}, codes={desc(self.codes)}, scale={desc(self.scale)})")
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


def nibbles(b, *, signed: bool):
    """int8 bytes -> ``(low nibbles, high nibbles)`` as int8: two's-complement -8..7 (``signed``,
    by arithmetic shifts) or unsigned 0..15 (by masks). Plain ``jnp`` ops: kernels use it too."""
    if signed:
        return jnp.right_shift(jnp.left_shift(b, jnp.int8(4)), jnp.int8(4)), jnp.right_shift(b, jnp.int8(4))
    return b & jnp.int8(0xF), jnp.right_shift(b, jnp.int8(4)) & jnp.int8(0xF)


def unpack_int4(packed, *, signed: bool):
    """Inverse of ``pack_int4``: int8 ``[..., K // 2]`` -> int8 codes ``[..., K]``.

    ``signed``: two's-complement nibbles -8..7 (symmetric weights); else unsigned 0..15.
    """
    b = packed.astype(jnp.int8)
    lo, hi = nibbles(b, signed=signed)
    return jnp.reshape(jnp.stack([lo, hi], axis=-1), b.shape[:-1] + (2 * b.shape[-1],))


def unpack_codes(qw: QuantizedWeight):
    """The int8 codes ``[N, K]`` of a QuantizedWeight (unpacked for bits=4)."""
    if qw.bits == 4:
        return unpack_int4(qw.codes, signed=qw.symmetric)
    return qw.codes


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------


def check_group_size(group_size, k, *, arg="w", shape=None):
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


def check_block_size(block_size, shape, *, arg="w"):
    """fp8 block weights: ``block_size`` a power of two >= 16 dividing N and K of ``shape``."""
    if block_size is None:
        return None
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected None (per output channel) or a power of two >= 16 (e.g. 128), "
                         f"got {block_size!r}")
    n, k = shape
    if n % block_size or k % block_size:
        raise ValueError(f"block_size: N = {n} and K = {k} ({arg} of shape {tuple(shape)}) must be multiples of "
                         f"block_size = {block_size}")
    return int(block_size)


def _check_arrays(name: str, fields, layout: str) -> None:
    """Each ``(field, array, dtype, shape)`` of ``fields``: an array of that dtype and shape (the
    error names ``layout``, the weight's format that implies them)."""
    for field, arr, dt, shp in fields:
        if not hasattr(arr, "dtype"):
            raise TypeError(f"{name}.{field}: expected an array, got {type(arr).__name__}")
        if np.dtype(arr.dtype) != np.dtype(dt) or tuple(arr.shape) != shp:
            raise ValueError(f"{name}.{field}: expected {np.dtype(dt).name} of shape {shp} for {layout}; got "
                             f"{np.dtype(arr.dtype).name} of shape {tuple(arr.shape)}")


def _check_fp8_weight(name: str, qw) -> None:
    if np.dtype(qw.code_dtype) not in FP8_DTYPES:
        raise ValueError(f"{name}.code_dtype: expected None, float8_e4m3fn or float8_e5m2, got {qw.code_dtype}")
    if qw.bits != 8 or qw.group_size is not None or not qw.symmetric or qw.zero_point is not None:
        raise ValueError(f"{name}: fp8 weights have bits=8, group_size=None, symmetric=True and no zero point; "
                         f"got bits={qw.bits}, group_size={qw.group_size}, symmetric={qw.symmetric}, zero_point="
                         f"{'None' if qw.zero_point is None else 'an array'}")
    n, kk = qw.shape
    check_block_size(qw.block_size, qw.shape, arg=name)
    b = qw.block_size
    _check_arrays(name, (("codes", qw.codes, qw.code_dtype, (n, kk)),
                         ("scale", qw.scale, np.float32, (n,) if b is None else (n // b, kk // b))),
                  f"code_dtype={np.dtype(qw.code_dtype).name}, block_size={b}, shape={qw.shape}")


def check_quantized_weight(name: str, qw, *, k: int | None = None, fp8: bool = False) -> QuantizedWeight:
    """Raise a clear error unless ``qw`` is a consistent QuantizedWeight (and of inner size ``k``).

    ``fp8``: whether the caller takes fp8 weights (``quantized_linear`` does; the integer kernels
    do not)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{name}: expected a jaxquant.QuantizedWeight (from quantize_weight), got {type(qw).__name__}")
    if len(qw.shape) != 2:
        raise ValueError(f"{name}.shape: expected (N, K), got {qw.shape!r}")
    if qw.code_dtype is not None:
        if not fp8:
            raise ValueError(f"{name}: an fp8 weight (code_dtype={np.dtype(qw.code_dtype).name}) runs in "
                             "jaxquant.quantized_linear, not with integer kernels")
        _check_fp8_weight(name, qw)
        if k is not None and qw.shape[1] != k:
            raise ValueError(f"{name}: expected K = {k} (the last axis of x), got a weight of shape (N, K) = "
                             f"{qw.shape}")
        return qw
    if qw.bits not in BITS:
        raise ValueError(f"{name}.bits: expected 4 or 8, got {qw.bits!r}")
    n, kk = qw.shape
    check_group_size(qw.group_size, kk, arg=f"{name} (shape {qw.shape})")
    if qw.bits == 4 and kk % 2:
        raise ValueError(f"{name}: bits=4 needs an even K, got shape {qw.shape}")
    exp_codes = (n, kk // 2) if qw.bits == 4 else (n, kk)
    _check_arrays(name, (("codes", qw.codes, np.int8, exp_codes),
                         ("scale", qw.scale, np.float32, (n,) if qw.group_size is None else (n, kk // qw.group_size))),
                  f"bits={qw.bits}, group_size={qw.group_size}, shape={qw.shape}")
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
