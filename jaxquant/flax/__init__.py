"""Flax side of jaxquant: quantize an unmodified nnx or linen model in one call.

::

    from jaxquant.flax import Rule, quantize, summary, W8A8, W4A16
    served = quantize(model, [Rule(r".*attn.*", W8A8), Rule(r".*", W4A16)])   # PTQ: a serving model
    qat    = quantize(model, [Rule(r".*", W8A8)], mode="qat")                  # QAT: same model code
    served = quantize(qat)                                                     # serve what QAT simulated
    print(summary(served))

* ``QuantConfig`` (+ presets ``W8A8``, ``W8A16``, ``W4A16``, ``W4A8``, and fp8: ``FP8`` per channel,
  ``FP8_BLOCK`` in 128 x 128 blocks) — ``jaxquant.flax.config``.
* ``Rule``, ``quantize`` (nnx and linen), ``QuantizationWarning`` — ``jaxquant.flax.rules`` /
  ``jaxquant.flax.quantize``. Layer kinds: ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` (matmul
  equations) and linen ``Dense`` / ``DenseGeneral`` / ``Einsum``; the replaced nnx layers are
  ``QATLayer`` and ``QuantizedLayer`` (``jaxquant.flax.layers``, the math of both).
* linen — ``jaxquant.flax.linen``: ``quantize(linen_model, rules)`` returns a ``LinenQuantized``
  (``init`` / ``apply``); ``quantize_variables`` turns float or QAT variables into its variables.
* Calibration — ``Calibration(run, batches)`` (static activation scales), ``GPTQ(run, batches, ...)``
  (``jaxquant.flax.gptq``), ``calibration_mask``; weight clip search (absmax / percentile / MSE):
  ``QuantConfig.calibration``, ``weight_qparams`` (``jaxquant.flax.calibrate``).
* ``summary(model)`` — ``jaxquant.flax.summary``; ``save_checkpoint`` / ``restore_checkpoint``
  (orbax, with each layer's config) — ``jaxquant.flax.checkpoint``.
* Sharding — ``jaxquant.flax.sharding``: the float kernels' sharding annotations (nnx
  ``out_sharding`` metadata, linen ``nn.Partitioned`` boxes) carried onto QAT scales and serving
  codes / scales / zero points (``W [N, K]``; docs/flax.md, "Sharded models").
* LSQ — ``fake_quantize_learnable`` (``jaxquant.primitives.lsq.api``): learnable-scale fake quantization.

The demo model (the float all-MiniLM-L6-v2 sentence encoder) is ``jaxquant.models.minilm``.
"""

try:
    import flax  # noqa: F401  (the optional dependency of this subpackage)
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"jaxquant.flax needs flax and orbax: pip install 'jaxquant[flax]' ({e})") from e

from jaxquant.flax.calibrate import qparams_from_range, weight_qparams
from jaxquant.flax.checkpoint import restore_checkpoint, save_checkpoint
from jaxquant.flax.config import FP8, FP8_BLOCK, MIN_GROUP_SIZE, W4A8, W4A16, W8A8, W8A16, QuantConfig
from jaxquant.flax.gptq import GPTQ, gptq_quantize_weight, layer_output_error
from jaxquant.flax.layers import QATLayer, QuantizedLayer, QuantStat, fake_quantize_activation, fake_quantize_weight
from jaxquant.flax.linen import LinenQuantized, quantize_variables
from jaxquant.primitives.lsq.api import fake_quantize_learnable
from jaxquant.flax.observe import Calibration, calibration_mask
from jaxquant.flax.quantize import quantize
from jaxquant.flax.rules import QuantizationWarning, Rule
from jaxquant.flax.summary import Summary, summary

__all__ = [
    "QuantConfig", "W8A8", "W8A16", "W4A16", "W4A8", "FP8", "FP8_BLOCK", "MIN_GROUP_SIZE",
    "Rule", "quantize", "QuantizationWarning", "summary", "Summary",
    "QATLayer", "QuantizedLayer", "QuantStat", "LinenQuantized", "quantize_variables",
    "Calibration", "GPTQ", "calibration_mask", "weight_qparams", "qparams_from_range",
    "gptq_quantize_weight", "layer_output_error",
    "save_checkpoint", "restore_checkpoint",
    "fake_quantize_weight", "fake_quantize_activation", "fake_quantize_learnable",
]
