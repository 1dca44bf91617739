"""jaxquant.describe: which implementation, kernels, config, precision and workspace a call gets,
without running it, for every public op, on the CPU and for a given device kind."""

import jax
import jax.numpy as jnp
import pytest

import jaxquant as jq
from jaxquant.core.primitive import REGISTRY
from jaxquant.pallas.int8_matmul import mosaic as mg_k
from jaxquant.pallas.weight_only import mosaic as wm_k
from jaxquant.pallas.weight_only import triton as wo_k

H200 = "NVIDIA H200"
X = jax.ShapeDtypeStruct((8, 256), jnp.bfloat16)
S_TOK = jax.ShapeDtypeStruct((8,), jnp.float32)


def _w(n, k, **kw):
    return jq.quantize_weight(jnp.ones((n, k), jnp.float32), **kw)


PUBLIC = {  # name -> (fn, args): every public op, abstract arguments where the op allows
    "quantize": (lambda x, s: jq.quantize(x, s, granularity=jq.PerToken()), (X, S_TOK)),
    "dequantize": (lambda q, s: jq.dequantize(q, s, granularity=jq.PerToken()),
                   (jax.ShapeDtypeStruct((8, 256), jnp.int8), S_TOK)),
    "fake_quantize": (lambda x, s: jq.fake_quantize(x, s, granularity=jq.PerToken(), qmin=-8, qmax=7), (X, S_TOK)),
    "fake_quantize_backward": (lambda x, s: jq.fake_quantize_backward(x, x, s, granularity=jq.PerToken(), qmin=-8,
                                                                      qmax=7), (X, S_TOK)),
    "quantize_backward": (lambda x, s: jq.quantize_backward(x, x, s, granularity=jq.PerToken(), qmin=-8, qmax=7),
                          (X, S_TOK)),
    "dynamic_quantize": (lambda x: jq.dynamic_quantize(x), (X,)),
    "fake_quantize_learnable": (lambda x: jax.grad(lambda x: jnp.sum(jq.fake_quantize_learnable(
        x, jnp.float32(0.1), granularity=jq.PerTensor(), qmin=-8, qmax=7).astype(jnp.float32)))(x), (X,)),
    "quantized_linear": (lambda x, qw=_w(512, 256): jq.quantized_linear(x, qw), (X,)),
    "int8_matmul": (lambda a: jq.int8_matmul(a, jnp.ones((512, 256), jnp.int8)), (jax.ShapeDtypeStruct((8, 256), jnp.int8),)),
    "weight_only_linear": (lambda x, qw=_w(512, 256, bits=4, group_size=128): jq.weight_only_linear(x, qw), (X,)),
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_op_on_cpu_and_h200(name):
    fn, args = PUBLIC[name]
    cpu = jq.describe(fn, *args)
    assert cpu.platform == "cpu" and cpu.ops
    assert all(op.implementation == "reference (XLA)" and op.kernels == () for op in cpu.ops), str(cpu)
    gpu = jq.describe(fn, *args, device_kind=H200)
    assert gpu.platform == "cuda" and gpu.device_kind == H200
    assert all(op.implementation in ("triton", "mosaic_gpu") for op in gpu.ops), str(gpu)
    assert all(k.startswith("jaxquant_") for k in gpu.kernels) and gpu.kernels
    assert all(op.precision and op.config is not None for op in gpu.ops)
    assert name in str(gpu) or gpu.ops[0].op.startswith("jaxquant_")


def test_registry_names_every_primitive():
    assert {"jaxquant_quantize", "jaxquant_dequantize", "jaxquant_fake_quantize", "jaxquant_fake_quantize_backward",
            "jaxquant_quantize_backward", "jaxquant_dynamic_quantize", "jaxquant_lsq_backward",
            "jaxquant_quantized_linear", "jaxquant_int8_matmul", "jaxquant_weight_only_linear"} <= set(REGISTRY)


def test_w8a8_prefill_on_h200_is_the_mosaic_gemm():
    x = jax.ShapeDtypeStruct((2048, 4096), jnp.bfloat16)
    qw = _w(8192, 4096)
    d = jq.describe(lambda x: jq.quantized_linear(x, qw), x, device_kind=H200)
    (op,) = d.ops
    assert op.implementation == "mosaic_gpu" and op.kernels == ("jaxquant_dynamic_quantize", "jaxquant_w8a8_gemm_mgpu")
    assert op.config == mg_k.heuristics(2048, 8192, 4096)
    assert op.workspace_bytes == 2048 * 4096 + 4 * 2048  # the activation codes and scales
    # with a bias: the Triton GEMM (bit-exact epilogue)
    (op,) = jq.describe(lambda x: jq.quantized_linear(x, qw, jnp.ones(8192)), x, device_kind=H200).ops
    assert op.implementation == "triton" and op.kernels[-1] == "jaxquant_int8_matmul_int8"


def test_weight_only_decode_splits_k_with_a_workspace():
    x = jax.ShapeDtypeStruct((1, 8192), jnp.bfloat16)
    qw = _w(8192, 8192, bits=4, group_size=128)
    (op,) = jq.describe(lambda x: jq.weight_only_linear(x, qw), x, device_kind=H200).ops
    assert op.implementation == "triton" and op.kernels == ("jaxquant_weight_only_w4",)
    assert op.config == wo_k.heuristics(1, 8192, 8192, 4, 128, device_kind=H200)
    assert op.config.split_k > 1 and op.workspace_bytes == 4 * op.config.split_k * 1 * 8192
    x = jax.ShapeDtypeStruct((4096, 8192), jnp.bfloat16)
    (op,) = jq.describe(lambda x: jq.weight_only_linear(x, qw), x, device_kind=H200).ops
    assert op.implementation == "mosaic_gpu" and isinstance(op.config, wm_k.Config)


def test_implementation_context_and_errors():
    fn, args = PUBLIC["quantize"]
    with jq.implementation("interpret"):
        (op,) = jq.describe(fn, *args).ops
    assert op.implementation == "triton (interpret mode)" and op.kernels == ("jaxquant_quantize",)
    with pytest.raises(ValueError, match="scale"):  # the op's own error
        jq.describe(lambda x: jq.quantize(x, jnp.ones((3,)), granularity=jq.PerToken()), X)
    cfg = mg_k.Config()  # an explicit Mosaic GPU tile that does not fit: the dispatch's error
    with pytest.raises(ValueError, match="config"):
        jq.describe(lambda x: jq.quantized_linear(x, _w(512, 256), config=cfg), X, device_kind=H200)
