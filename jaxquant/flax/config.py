"""``QuantConfig``: what a QAT / serving linear layer quantizes and how (frozen, hashable).

=====================  ==========================================================================
field                  meaning
=====================  ==========================================================================
``weight_bits``        8 or 4 (int4 codes: -8..7 symmetric, 0..15 asymmetric; int8: -128..127)
``group_size``         None: one scale per output channel; g: one per (output channel, g inputs):
                       a power of two >= ``MIN_GROUP_SIZE[weight_bits]`` (32 for int4, 16 for int8,
                       the smallest groups the weight-only kernels take)
``weight_symmetric``   zero point 0 (True) or a per-channel/group zero point (False)
``activations``        None (weight-only: W8A16 / W4A16), ``"dynamic"`` (int8, one symmetric scale
                       per token row, computed from the data) or ``"static"`` (int8, one
                       calibrated per-tensor scale held by the layer)
``learnable_scales``   QAT only: the weight scales (and zero points) are trainable parameters with
                       LSQ gradients (``jaxquant.primitives.lsq.api``) instead of being recomputed from the
                       weights at every step (absmax, straight-through)
``calibration``        how ``jaxquant.flax.calibrate`` picks the initial weight scales:
                       ``"absmax"``, ``"percentile"`` or ``"mse"``
``weight_dtype``       None: integer codes (``weight_bits``); ``"float8_e4m3fn"`` (or
                       ``jnp.float8_e4m3fn``): fp8 weight codes with fp8 dynamic activations
``block_size``         fp8 only: None (one weight scale per output channel; activations per token)
                       or 128 (128 x 128 weight blocks; activations in 1 x 128 groups)
``recipe``             fp8 only: the ``jaxquant.fp8_linear`` recipe of ``mode="qat"`` (fp8
                       training): ``"tensorwise"``, ``"rowwise"`` or ``"blockwise"``; None (the
                       default) picks the one whose forward is the served layer's: ``"rowwise"``
                       per channel, ``"blockwise"`` for 128 x 128 blocks
=====================  ==========================================================================

fp8 configs (presets ``FP8`` and ``FP8_BLOCK``): served by ``jaxquant.quantized_linear`` on the
fp8 ``QuantizedWeight`` of ``jaxquant.quantize_weight(w, dtype=jnp.float8_e4m3fn[, block_size=128])``,
trained (``mode="qat"``) by ``jaxquant.fp8_linear(x, w, bias, recipe=...)`` on the float weight.
Their scales are always absmax and dynamic, so an fp8 config takes ``weight_bits=8``,
``group_size=None``, ``weight_symmetric=True``, ``activations="dynamic"``,
``learnable_scales=False`` and ``calibration="absmax"`` (the defaults); anything else is an
error naming the field. ``recipe`` equal to the format's own is stored as None, so two configs
are equal exactly when they compute the same thing.

A config is checked when it is built: impossible combinations (3-bit weights, a group size the
kernels cannot take, an unknown calibration method, fp8 with a group size) raise ``ValueError`` /
``TypeError`` naming the field. Whether a config fits one layer (K a multiple of the group size, a
kernel for serving, N and K multiples of 128 for fp8 blocks) is checked per layer by
``QuantConfig.problem``; ``jaxquant.flax.quantize`` leaves such a layer float with a warning.

The weight quantizer of a QAT layer with ``learnable_scales=False`` is exactly
``jaxquant.quantize_weight``, so a served layer holds the codes its QAT layer simulated.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxquant.core import weights as W
from jaxquant.primitives.fp8_matmul.api import RECIPES     # fp8_linear's recipes

__all__ = ["QuantConfig", "W8A8", "W8A16", "W4A16", "W4A8", "FP8", "FP8_BLOCK", "ACTIVATIONS", "CALIBRATIONS",
           "MIN_GROUP_SIZE", "FP8_WEIGHT_DTYPES", "FP8_BLOCK_SIZES", "RECIPES"]

ACTIVATIONS = (None, "dynamic", "static")
CALIBRATIONS = ("absmax", "percentile", "mse")
#: fp8 weight formats (the forward format of ``jaxquant.fp8_linear``; e5m2 is its gradient format).
FP8_WEIGHT_DTYPES = ("float8_e4m3fn",)
#: fp8 weight scale blocks: per output channel, or the fp8 GEMM's 128 x 128 blocks.
FP8_BLOCK_SIZES = (None, 128)

#: Smallest group size per weight width: the weight-only kernels' minimum (smaller groups would
#: fall back to XLA's dequantize-then-dot and lose the memory saving).
MIN_GROUP_SIZE = {4: 32, 8: 16}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a linear layer is quantized (see the module docstring)."""

    weight_bits: int = 8
    group_size: int | None = None
    weight_symmetric: bool = True
    activations: str | None = "dynamic"
    learnable_scales: bool = False
    calibration: str = "absmax"
    percentile: float = 99.9
    weight_dtype: str | None = None
    block_size: int | None = None
    recipe: str | None = None

    def __post_init__(self):
        if self.weight_bits not in (4, 8) or isinstance(self.weight_bits, bool):
            raise ValueError(f"QuantConfig.weight_bits: expected 4 or 8, got {self.weight_bits!r}")
        g = self.group_size
        if g is not None:
            low = MIN_GROUP_SIZE[self.weight_bits]
            if not isinstance(g, int) or isinstance(g, bool) or g < low or g & (g - 1):
                raise ValueError(f"QuantConfig.group_size: expected None (per channel) or a power of two >= {low} "
                                 f"for {self.weight_bits}-bit weights (e.g. {low}, {2 * low}, 128), got {g!r}")
        if not isinstance(self.weight_symmetric, bool):
            raise TypeError(f"QuantConfig.weight_symmetric: expected a bool, got {self.weight_symmetric!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"QuantConfig.activations: expected one of {ACTIVATIONS}, got {self.activations!r}")
        if not isinstance(self.learnable_scales, bool):
            raise TypeError(f"QuantConfig.learnable_scales: expected a bool, got {self.learnable_scales!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"QuantConfig.calibration: expected one of {CALIBRATIONS}, got {self.calibration!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not (0 < self.percentile <= 100):
            raise ValueError(f"QuantConfig.percentile: expected a number 0 < p <= 100, got {self.percentile!r}")
        if self.weight_dtype is None:
            for name in ("block_size", "recipe"):
                if getattr(self, name) is not None:
                    raise ValueError(f"QuantConfig.{name}: only for fp8 weights (weight_dtype='float8_e4m3fn'); "
                                     f"expected None with integer weights, got {getattr(self, name)!r}"
                                     + (" (integer weights use group_size)" if name == "block_size" else ""))
        else:
            self._check_fp8()

    def _check_fp8(self):
        try:
            name = jnp.dtype(self.weight_dtype).name
        except TypeError:
            name = None
        if name not in FP8_WEIGHT_DTYPES:
            raise ValueError(f"QuantConfig.weight_dtype: expected None (integer weights) or one of {FP8_WEIGHT_DTYPES} "
                             f"(fp8 weights; e5m2 is only a gradient format, jaxquant.fp8_linear's grad_dtype), got "
                             f"{self.weight_dtype!r}")
        object.__setattr__(self, "weight_dtype", name)
        fixed = (("weight_bits", 8, "fp8 codes are 8-bit"),
                 ("group_size", None, "fp8 weights are scaled per output channel or in blocks: use block_size"),
                 ("weight_symmetric", True, "fp8 codes are symmetric (no zero point)"),
                 ("activations", "dynamic", "fp8 weights run with fp8 activations quantized from the data"),
                 ("learnable_scales", False, "fp8 scales are recomputed from the data (absmax) at every call"),
                 ("calibration", "absmax", "fp8 scales are absmax (jaxquant.quantize_weight / fp8_linear)"))
        for field, want, why in fixed:
            got = getattr(self, field)
            if got != want or type(got) is not type(want):
                raise ValueError(f"QuantConfig.{field}: expected {want!r} with weight_dtype={name!r} ({why}), "
                                 f"got {got!r}")
        if self.block_size not in FP8_BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ValueError(f"QuantConfig.block_size: expected one of {FP8_BLOCK_SIZES} for fp8 weights (None: "
                             f"one scale per output channel; 128: the fp8 GEMM's 128 x 128 blocks), got "
                             f"{self.block_size!r}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"QuantConfig.recipe: expected None (the weight format's own) or one of {RECIPES}, got "
                             f"{self.recipe!r}")
        if self.recipe == self._own_recipe():
            object.__setattr__(self, "recipe", None)

    def _own_recipe(self) -> str:
        return "rowwise" if self.block_size is None else "blockwise"

    @property
    def is_fp8(self) -> bool:
        """Whether the weights are fp8 codes (``weight_dtype`` set)."""
        return self.weight_dtype is not None

    @property
    def fp8_recipe(self) -> str | None:
        """The ``jaxquant.fp8_linear`` recipe of fp8 training: ``recipe``, else the weight format's own
        (``"rowwise"`` per channel, ``"blockwise"`` for blocks); None for integer weights."""
        if not self.is_fp8:
            return None
        return self.recipe or self._own_recipe()

    @property
    def weight_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the integer weight codes (``jaxquant.core.weights.code_range``)."""
        if self.is_fp8:
            raise ValueError(f"QuantConfig.weight_range: {self} has fp8 weight codes, which have no integer range")
        return W.code_range(self.weight_bits, self.weight_symmetric)

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        """Shape of the weight scale (and zero point) of ``W [N, K]``: ``[N]`` per channel, ``[N, K // g]``
        per group, ``[N // b, K // b]`` for fp8 ``b x b`` blocks."""
        if self.block_size is not None:
            return (n // self.block_size, k // self.block_size)
        return (n,) if self.group_size is None else (n, k // self.group_size)

    @property
    def act_range(self) -> tuple[int, int]:
        """int8 activation codes: -128..127 (symmetric, zero point 0)."""
        return -128, 127

    @property
    def serving_kind(self) -> str:
        """``"w8a8"`` (``jaxquant.quantized_linear``), ``"fp8"`` (``jaxquant.quantized_linear`` on fp8
        weights), ``"weight_only"`` (``jaxquant.weight_only_linear``) or ``"fake"`` (no kernel
        serves it: e.g. int4 weights with int8 activations)."""
        if self.is_fp8:
            return "fp8"
        if self.activations is None:
            return "weight_only"
        if self.weight_bits == 8 and self.group_size is None and self.weight_symmetric:
            return "w8a8"
        return "fake"

    def problem(self, k: int, *, serve: bool, n: int | None = None) -> str | None:
        """Why this config cannot quantize a layer whose weight ``W [N, K]`` has ``k`` inputs and ``n``
        outputs, or None. ``serve``: the layer must also run on a serving kernel (QAT simulates any
        config). fp8 blocks need N and K multiples of the block in both modes, so a layer trained
        with an fp8 block config can be served with it."""
        b = self.block_size
        if b is not None and (k % b or (n is not None and n % b)):
            return (f"N = {n} and K = {k} must be multiples of block_size = {b} "
                    f"(fp8 {b} x {b} weight blocks)")
        if serve and self.serving_kind == "fake":
            return (f"no integer kernel serves {self} (W8A8 needs 8-bit symmetric per-channel weights, "
                    "weight-only serving needs activations=None); it can only be simulated (mode='qat')")
        g = self.group_size
        if g is not None and k % g:
            return f"K = {k} inputs is not a multiple of group_size = {g}"
        if self.weight_bits == 4 and k % 2:
            return f"int4 weights pack two codes per byte and need an even K, got K = {k}"
        return None

    def check_features(self, in_features: int) -> None:
        """Raise ``ValueError`` if this config cannot quantize a weight with ``in_features`` inputs."""
        why = self.problem(in_features, serve=False)
        if why:
            raise ValueError(f"QuantConfig: {why}")

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict (checkpoint metadata); ``QuantConfig(**d)`` rebuilds it."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        """Short name, e.g. ``W8A8``, ``W4A16-g128``, ``W4A16-g32-asym-mse``, ``W8A8-static-lsq``, ``FP8``,
        ``FP8-block128``, ``FP8-tensorwise`` (an fp8 training recipe other than the format's own)."""
        if self.is_fp8:
            block = f"-block{self.block_size}" if self.block_size else ""
            return f"FP8{block}" + (f"-{self.recipe}" if self.recipe else "")
        name = f"W{self.weight_bits}A{16 if self.activations is None else 8}"
        if self.group_size is not None:
            name += f"-g{self.group_size}"
        if not self.weight_symmetric:
            name += "-asym"
        if self.activations == "static":
            name += "-static"
        if self.calibration != "absmax":
            name += f"-{self.calibration}"
        if self.learnable_scales:
            name += "-lsq"
        return name


#: int8 weights per channel, int8 dynamic per-token activations (``jaxquant.quantized_linear``).
W8A8 = QuantConfig(weight_bits=8, activations="dynamic")
#: int8 weights per channel, float activations (``jaxquant.weight_only_linear``).
W8A16 = QuantConfig(weight_bits=8, activations=None)
#: int4 weights in groups of 128 along K, float activations (``jaxquant.weight_only_linear``).
W4A16 = QuantConfig(weight_bits=4, group_size=128, activations=None)
#: int4 per-channel weights, int8 dynamic activations (simulated: QAT / fake-quant only).
W4A8 = QuantConfig(weight_bits=4, activations="dynamic")
#: fp8 e4m3 weights, one scale per output channel; fp8 e4m3 activations, one dynamic scale per token
#: (``jaxquant.quantized_linear``); trained with ``jaxquant.fp8_linear(recipe="rowwise")``.
FP8 = QuantConfig(weight_dtype="float8_e4m3fn")
#: fp8 e4m3 weights in 128 x 128 blocks; fp8 e4m3 activations in dynamic 1 x 128 groups
#: (``jaxquant.quantized_linear``); trained with ``jaxquant.fp8_linear(recipe="blockwise")``.
FP8_BLOCK = QuantConfig(weight_dtype="float8_e4m3fn", block_size=128)
