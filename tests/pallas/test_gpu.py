"""GPU only: the real kernels on the GPU equal the reference run on the CPU backend, bit for bit,
on 2**24 random elements per op (ties, clamp edges, NaN/Inf included)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import granularity as G
from conftest import HAS_GPU, assert_same_bits, make_params, make_x

pytestmark = pytest.mark.gpu

SHAPE = (4096, 4096)  # 2**24 elements


def _on(device, tree):
    return jax.device_put(tree, device)


@pytest.mark.parametrize("g", [jq.PerToken(), jq.PerChannel(-1), jq.PerChannel(0), jq.PerGroup(128), jq.PerTensor()],
                         ids=str)
@pytest.mark.parametrize("xdt", [jnp.bfloat16, jnp.float32, jnp.float16], ids=lambda d: np.dtype(d).name)
def test_gpu_equals_cpu_reference(rng, g, xdt):
    if not HAS_GPU:
        pytest.skip("needs a GPU")
    qmin, qmax = -128, 127
    pshape = G.param_shape(g, SHAPE)
    scale, zp = make_params(rng, pshape, qmin=qmin, qmax=qmax, asymmetric=True, pow2=bool(rng.integers(0, 2)))
    xb_shape = G.to_broadcast_form(jnp.zeros(SHAPE), jnp.zeros(pshape), g)[0].shape
    sb = G.to_broadcast_form(jnp.zeros(SHAPE), jnp.asarray(scale), g)[1]
    zb = np.reshape(zp, sb.shape)
    x = make_x(rng, xb_shape, xdt, np.asarray(sb, np.float64), zb, qmin=qmin, qmax=qmax).reshape(SHAPE)
    dy = jnp.asarray(rng.standard_normal(SHAPE), xdt)
    q = jnp.asarray(rng.integers(qmin, qmax + 1, SHAPE), jnp.int8)
    args = (x, dy, jnp.asarray(scale), jnp.asarray(zp), q)

    def ops(x, dy, s, z, q):
        return (jq.quantize(x, s, z, granularity=g),
                jq.dequantize(q, s, z, granularity=g, dtype=xdt),
                jq.fake_quantize(x, s, z, granularity=g, qmin=qmin, qmax=qmax),
                jq.fake_quantize_backward(dy, x, s, z, granularity=g, qmin=qmin, qmax=qmax),
                jq.quantize_backward(dy, x, s, z, granularity=g, qmin=qmin, qmax=qmax),
                *jq.dynamic_quantize(x, granularity=g if isinstance(g, (jq.PerToken, jq.PerGroup)) else jq.PerToken()),
                *jq.dynamic_quantize(x, symmetric=False, dtype=jnp.uint8,
                                     granularity=g if isinstance(g, (jq.PerToken, jq.PerGroup)) else jq.PerToken()))

    gpu = jax.devices("gpu")[0]
    cpu = jax.devices("cpu")[0]
    hlo = jax.jit(ops).trace(*args).lower().as_text()
    assert hlo.count('name = "jaxquant_') >= 7  # really the Pallas kernels
    got = jax.jit(lambda *a: ops(*a))(*_on(gpu, args))
    want = jax.jit(lambda *a: ops(*a))(*_on(cpu, args))
    names = ["quantize", "dequantize", "fake_quantize", "fake_quantize_backward", "quantize_backward",
             "dyn q", "dyn scale", "dyn zp", "dyn-asym q", "dyn-asym scale", "dyn-asym zp"]
    for name, a, b in zip(names, got, want):
        assert_same_bits(np.asarray(a), np.asarray(b), f"{name} GPU vs CPU reference ({g}, {np.dtype(xdt).name})")
