"""Flax side of jaxquant: QAT layers, learnable scales (LSQ), calibration, conversion to serving layers.

* ``QuantConfig`` (+ presets ``W8A8``, ``W8A16``, ``W4A16``, ``W4A8``) — ``jaxquant.flax.config``.
* QAT — ``jaxquant.flax.qat``: ``qat_dot_general(config)`` for ``nnx.Linear(dot_general=...)`` /
  ``nn.Dense(dot_general=...)`` (stateless options), explicit ``QATLinear`` (nnx) and ``QATDense``
  (linen; every option, static activations calibrated by ``calibrate_linen_activations``).
* LSQ — ``jaxquant.primitives.lsq.api``: ``fake_quantize_learnable`` (torch's learnable fake-quant gradients,
  Pallas backward ``jaxquant_lsq_backward``).
* Calibration — ``jaxquant.flax.calibrate``: ``weight_qparams`` (absmax / percentile / MSE clip
  search), ``calibrate_activations`` (static activation scales).
* Data-aware weight rounding — ``jaxquant.flax.gptq``: ``GPTQ`` (options for
  ``convert(model, config, calibration=GPTQ(run, batches))``), ``collect_input_stats``, ``calibration_mask``,
  ``gptq_quantize_weight``, ``layer_output_error``.
* Serving — ``jaxquant.flax.convert``: ``QuantizedLinear`` (``quantized_linear`` / ``weight_only_linear``),
  ``convert``, ``serving_factory``, ``save_checkpoint`` / ``restore_checkpoint``, ``linear_weight_bytes``;
  linen: ``QuantizedDense`` + ``linen_serving_variables``.
* ``jaxquant.models.minilm`` holds the float all-MiniLM-L6-v2 sentence encoder of the demo, whose
  dense projections all come from one ``linear_factory`` so quantized layers can be swapped in.
"""

from jaxquant.flax.calibrate import calibrate_activations, qparams_from_range, weight_qparams
from jaxquant.flax.config import W4A8, W4A16, W8A8, W8A16, QuantConfig
from jaxquant.flax.convert import (
    QuantizedDense,
    QuantizedLinear,
    convert,
    linear_weight_bytes,
    linen_serving_variables,
    quantize_weight_with,
    restore_checkpoint,
    save_checkpoint,
    serving_factory,
)
from jaxquant.flax.gptq import GPTQ, InputStats, calibration_mask, collect_input_stats, gptq_quantize_weight, layer_output_error
from jaxquant.primitives.lsq.api import fake_quantize_learnable
from jaxquant.models.minilm import (
    MiniLM,
    MiniLMConfig,
    dense_layers,
    embed,
    load_bert_weights,
    load_minilm,
)
from jaxquant.flax.qat import (
    QATDense,
    QATDotGeneral,
    QATLinear,
    QuantStat,
    calibrate_linen_activations,
    fake_quantize_activation,
    fake_quantize_weight,
    qat_dot_general,
)

__all__ = [
    "QuantConfig", "W8A8", "W8A16", "W4A16", "W4A8",
    "qat_dot_general", "QATDotGeneral", "QATLinear", "QATDense", "QuantStat", "calibrate_linen_activations",
    "fake_quantize_weight", "fake_quantize_activation",
    "fake_quantize_learnable",
    "weight_qparams", "qparams_from_range", "calibrate_activations",
    "GPTQ", "InputStats", "calibration_mask", "collect_input_stats", "gptq_quantize_weight", "layer_output_error",
    "QuantizedLinear", "QuantizedDense", "linen_serving_variables", "convert", "serving_factory", "quantize_weight_with", "linear_weight_bytes",
    "save_checkpoint", "restore_checkpoint",
    "MiniLM", "MiniLMConfig", "dense_layers", "embed", "load_bert_weights", "load_minilm",
]
