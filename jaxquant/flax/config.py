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
=====================  ==========================================================================

A config is checked when it is built: impossible combinations (3-bit weights, a group size the
kernels cannot take, an unknown calibration method) raise ``ValueError`` / ``TypeError`` naming
the field. Whether a config fits one layer (K a multiple of the group size, an integer kernel
for serving) is checked per layer by ``QuantConfig.problem``; ``jaxquant.flax.quantize`` leaves
such a layer float with a warning.

The weight quantizer of a QAT layer with ``learnable_scales=False`` is exactly
``jaxquant.quantize_weight``, so a served layer holds the codes its QAT layer simulated.
"""

from __future__ import annotations

import dataclasses

from jaxquant.core import weights as W

__all__ = ["QuantConfig", "W8A8", "W8A16", "W4A16", "W4A8", "ACTIVATIONS", "CALIBRATIONS", "MIN_GROUP_SIZE"]

ACTIVATIONS = (None, "dynamic", "static")
CALIBRATIONS = ("absmax", "percentile", "mse")
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

    @property
    def weight_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the weight codes (``jaxquant.core.weights.code_range``)."""
        return W.code_range(self.weight_bits, self.weight_symmetric)

    @property
    def act_range(self) -> tuple[int, int]:
        """int8 activation codes: -128..127 (symmetric, zero point 0)."""
        return -128, 127

    @property
    def serving_kind(self) -> str:
        """``"w8a8"`` (``jaxquant.quantized_linear``), ``"weight_only"`` (``jaxquant.weight_only_linear``)
        or ``"fake"`` (no integer kernel serves it: e.g. int4 weights with int8 activations)."""
        if self.activations is None:
            return "weight_only"
        if self.weight_bits == 8 and self.group_size is None and self.weight_symmetric:
            return "w8a8"
        return "fake"

    def problem(self, k: int, *, serve: bool) -> str | None:
        """Why this config cannot quantize a layer whose weight has ``k`` inputs (K), or None.
        ``serve``: the layer must also run on an integer kernel (QAT simulates any config)."""
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
        """Short name, e.g. ``W8A8``, ``W4A16-g128``, ``W4A16-g32-asym-mse``, ``W8A8-static-lsq``."""
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
