"""jaxquant: quantization kernels for JAX on NVIDIA GPUs (Pallas), with straight-through gradients.

The public API (DESIGN.md §3); everything else lives in submodules.
"""

from jaxquant.backend import implementation
from jaxquant.granularity import PerChannel, PerGroup, PerTensor, PerToken
from jaxquant.primitives.linear import int8_matmul, quantized_linear
from jaxquant.primitives.weight_only import weight_only_linear
from jaxquant.weights import QuantizedWeight, dequantize_weight, quantize_weight
from jaxquant.primitives.api import (
    choose_qparams,
    dequantize,
    dynamic_quantize,
    fake_quantize,
    fake_quantize_backward,
    quantize,
    quantize_backward,
)

__version__ = "0.1.0"

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_backward",
    "fake_quantize_backward",
    "dynamic_quantize",
    "choose_qparams",
    "implementation",
    "quantize_weight",
    "dequantize_weight",
    "QuantizedWeight",
    "quantized_linear",
    "int8_matmul",
    "weight_only_linear",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
]
