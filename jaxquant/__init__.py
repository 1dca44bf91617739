"""jaxquant: quantization kernels for JAX on NVIDIA GPUs (Pallas), with straight-through gradients.

The public API; everything else lives in submodules (docs/architecture.md).
"""

from jaxquant.core.backend import implementation
from jaxquant.core.describe import describe
from jaxquant.core.weights import QuantizedWeight
from jaxquant.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from jaxquant.primitives.affine.api import dequantize, fake_quantize, fake_quantize_backward, quantize, quantize_backward
from jaxquant.primitives.dynamic.api import choose_qparams, dynamic_quantize
from jaxquant.primitives.fp8_matmul.api import fp8_linear, fp8_matmul, quantized_linear
from jaxquant.primitives.int8_matmul.api import int8_matmul
from jaxquant.primitives.lsq.api import fake_quantize_learnable, lsq_backward
from jaxquant.primitives.weight_only.api import weight_only_linear
from jaxquant.primitives.weights import dequantize_weight, quantize_weight

__version__ = "0.2.0"

__all__ = [
    "quantize",
    "dequantize",
    "fake_quantize",
    "quantize_backward",
    "fake_quantize_backward",
    "dynamic_quantize",
    "choose_qparams",
    "fake_quantize_learnable",
    "lsq_backward",
    "implementation",
    "describe",
    "quantize_weight",
    "dequantize_weight",
    "QuantizedWeight",
    "quantized_linear",
    "int8_matmul",
    "fp8_matmul",
    "fp8_linear",
    "weight_only_linear",
    "PerTensor",
    "PerChannel",
    "PerToken",
    "PerGroup",
    "PerBlock",
]
