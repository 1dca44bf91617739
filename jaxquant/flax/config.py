"""``QuantConfig``: what a QAT / serving linear layer quantizes and how (frozen, hashable).

=====================  ==========================================================================
field                  meaning
=====================  ==========================================================================
``weight_bits``        8 or 4 (int4 codes: -8..7 symmetric, 0..15 asymmetric; int8: -128..127)
``group_size``         None: one scale per output channel; g: one per (output channel, g inputs)
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

The numerics are the library's (DESIGN.md §1): the weight quantizer of a QAT layer with
``learnable_scales=False`` and ``calibration="absmax"`` is exactly ``jaxquant.quantize_weight``, so a
converted serving layer holds the codes the QAT layer simulated (``jaxquant.flax.convert``).
"""

from __future__ import annotations

import dataclasses

from jaxquant.core import weights as W

__all__ = ["QuantConfig", "W8A8", "W8A16", "W4A16", "W4A8", "ACTIVATIONS", "CALIBRATIONS"]

ACTIVATIONS = (None, "dynamic", "static")
CALIBRATIONS = ("absmax", "percentile", "mse")


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
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 1):
            raise ValueError(f"QuantConfig.group_size: expected None or a positive int, got {self.group_size!r}")
        if self.weight_bits == 4 and self.group_size is not None and self.group_size % 2:
            raise ValueError(f"QuantConfig.group_size: int4 weights need an even group size, got {self.group_size}")
        if not isinstance(self.weight_symmetric, bool):
            raise TypeError(f"QuantConfig.weight_symmetric: expected a bool, got {self.weight_symmetric!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"QuantConfig.activations: expected one of {ACTIVATIONS}, got {self.activations!r}")
        if not isinstance(self.learnable_scales, bool):
            raise TypeError(f"QuantConfig.learnable_scales: expected a bool, got {self.learnable_scales!r}")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"QuantConfig.calibration: expected one of {CALIBRATIONS}, got {self.calibration!r}")
        if not (0 < float(self.percentile) <= 100):
            raise ValueError(f"QuantConfig.percentile: expected 0 < p <= 100, got {self.percentile!r}")

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

    def check_features(self, in_features: int) -> None:
        """Raise if ``group_size`` does not divide ``in_features`` (K)."""
        g = self.group_size
        if g is not None and in_features % g:
            raise ValueError(f"QuantConfig.group_size={g} does not divide in_features={in_features}")


#: int8 weights per channel, int8 dynamic per-token activations (``jaxquant.quantized_linear``).
W8A8 = QuantConfig(weight_bits=8, activations="dynamic")
#: int8 weights per channel, float activations (``jaxquant.weight_only_linear``).
W8A16 = QuantConfig(weight_bits=8, activations=None)
#: int4 weights in groups of 128 along K, float activations (``jaxquant.weight_only_linear``).
W4A16 = QuantConfig(weight_bits=4, group_size=128, activations=None)
#: int4 per-channel weights, int8 dynamic activations (simulated: QAT / fake-quant only).
W4A8 = QuantConfig(weight_bits=4, activations="dynamic")
