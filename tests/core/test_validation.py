"""Bad input fails at trace time with an error naming the argument, the expected and the actual."""

import re

import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.pallas.affine import triton as affine
from jaxquant.pallas.dynamic import triton as dynamic

X = jnp.ones((4, 64), jnp.float32)
S = jnp.ones((4,), jnp.float32)


def raises(exc, *fragments):
    pattern = ".*".join(re.escape(f) for f in fragments)
    return pytest.raises(exc, match=re.compile(pattern, re.S))


def test_scale_shape():
    with raises(ValueError, "scale", "expected shape (4,)", "PerToken", "got shape (64,)"):
        jq.quantize(X, jnp.ones((64,)), granularity=jq.PerToken())
    with raises(ValueError, "scale", "expected shape (4, 2)", "got shape (4,)"):
        jq.fake_quantize(X, S, granularity=jq.PerGroup(32), qmin=-8, qmax=7)
    with raises(ValueError, "scale", "expected shape ()", "got shape (4,)"):
        jq.dequantize(jnp.ones((4, 64), jnp.int8), S, granularity=jq.PerTensor())


def test_zero_point_shape_and_dtype():
    with raises(ValueError, "zero_point", "expected shape (4,)", "got shape (3,)"):
        jq.quantize(X, S, jnp.zeros((3,), jnp.int32), granularity=jq.PerToken())
    with raises(TypeError, "zero_point", "integer array", "float32"):
        jq.quantize(X, S, jnp.zeros((4,), jnp.float32), granularity=jq.PerToken())


def test_axis_out_of_range():
    with raises(ValueError, "PerChannel(axis=2)", "out of range", "rank 2", "(4, 64)"):
        jq.quantize(X, S, granularity=jq.PerChannel(2))
    with raises(ValueError, "PerChannel(axis=-3)", "out of range"):
        jq.choose_qparams(X, granularity=jq.PerChannel(-3), qmin=-128, qmax=127)


def test_group_size():
    with raises(ValueError, "PerGroup(group_size=48)", "size 64", "multiple of group_size"):
        jq.quantize(X, jnp.ones((4, 1)), granularity=jq.PerGroup(48))
    with raises(ValueError, "group_size", "positive int", "0"):
        jq.PerGroup(0)
    with raises(ValueError, "PerGroup(group_size=48)"):
        jq.dynamic_quantize(X, granularity=jq.PerGroup(48))


def test_qmin_qmax():
    with raises(ValueError, "qmin <= qmax", "qmin=5", "qmax=2"):
        jq.fake_quantize(X, S, granularity=jq.PerToken(), qmin=5, qmax=2)
    with raises(ValueError, "[-8, 300]", "does not fit", "uint8", "[0, 255]"):
        jq.quantize(X, S, granularity=jq.PerToken(), dtype=jnp.uint8, qmin=-8, qmax=300)
    with raises(ValueError, "[-200, 127]", "int8"):
        jq.quantize(X, S, granularity=jq.PerToken(), qmin=-200)
    with raises(ValueError, "qmin/qmax", "required", "float32"):
        jq.quantize(X, S, granularity=jq.PerToken(), dtype=jnp.float32)
    with raises(ValueError, "does not fit", "bfloat16"):
        jq.quantize(X, S, granularity=jq.PerToken(), dtype=jnp.bfloat16, qmin=-1000, qmax=1000)
    with raises(TypeError, "qmin", "Python int", "1.5"):
        jq.fake_quantize(X, S, granularity=jq.PerToken(), qmin=1.5, qmax=7)
    with raises(ValueError, "symmetric=True", "signed range", "[0, 255]"):
        jq.dynamic_quantize(X, dtype=jnp.uint8)


def test_dtypes():
    with raises(TypeError, "x", "float16, bfloat16, float32 or float64", "int32 array of shape (4, 64)"):
        jq.quantize(jnp.ones((4, 64), jnp.int32), S, granularity=jq.PerToken())
    with raises(TypeError, "dtype", "integer container", "complex64"):
        jq.quantize(X, S, granularity=jq.PerToken(), dtype=jnp.complex64)
    with raises(TypeError, "scale", "float", "int32"):
        jq.quantize(X, jnp.ones((4,), jnp.int32), granularity=jq.PerToken())
    with raises(TypeError, "dtype", "float16, bfloat16, float32 or float64", "int8"):
        jq.dequantize(jnp.ones((4, 64), jnp.int8), S, granularity=jq.PerToken(), dtype=jnp.int8)
    with raises(TypeError, "q", "integer", "complex64"):
        jq.dequantize(jnp.ones((4, 64), jnp.complex64), S, granularity=jq.PerToken())
    with raises(TypeError, "dtype", "integer container", "float32"):
        jq.dynamic_quantize(X, dtype=jnp.float32)


def test_dy_shape_granularity_and_config():
    with raises(ValueError, "dy", "shape of x (4, 64)", "(4, 32)"):
        jq.quantize_backward(jnp.ones((4, 32)), X, S, granularity=jq.PerToken(), qmin=-8, qmax=7)
    with raises(TypeError, "granularity", "PerTensor()", "'token'"):
        jq.quantize(X, S, granularity="token")
    with raises(TypeError, "config", "Config", "None"):
        jq.quantize(X, S, granularity=jq.PerToken(), config=dynamic.Config(1, 64))
    with raises(ValueError, "block_rows", "power of two", "3"):
        affine.Config(3, 64)


def test_errors_raise_under_jit_at_trace_time():
    f = jax.jit(lambda x: jq.quantize(x, S, granularity=jq.PerToken()))
    with raises(ValueError, "scale", "expected shape (5,)"):
        f.trace(jnp.ones((5, 64)))


def test_pallas_impl_on_cpu_is_a_clear_error():
    if jax.devices()[0].platform != "cpu":
        pytest.skip("CPU-only check")
    with jq.implementation("pallas"):
        with raises(NotImplementedError, "'pallas' lowers only for CUDA"):
            jax.jit(lambda x: jq.quantize(x, S, granularity=jq.PerToken()))(X)
    with raises(ValueError, "implementation", "'auto'"):
        with jq.implementation("triton"):
            pass
