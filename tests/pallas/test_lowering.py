"""Every kernel lowers for CUDA on a machine without a GPU (docs/pallas_pitfalls.md), and each op is
exactly one kernel launch under jit / vmap / grad / remat (counted by ``name=`` in the HLO)."""

import re

import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
from conftest import skip_without_cuda_lowering

pytestmark = pytest.mark.lowering


def cuda_hlo(f, *args):
    try:
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # pragma: no cover - a machine without jax-cuda12-plugin
        skip_without_cuda_lowering(e)
        raise


def kernels(hlo):
    return re.findall(r'name = "(jaxquant_\w+)"', hlo)


X = jnp.ones((6, 40, 96), jnp.bfloat16)
S_TOK = jnp.ones((6, 40), jnp.float32)
Z_TOK = jnp.zeros((6, 40), jnp.int32)
GRANS = {
    "tensor": (jq.PerTensor(), jnp.float32(1)),
    "token": (jq.PerToken(), S_TOK),
    "channel0": (jq.PerChannel(0), jnp.ones((6,))),
    "channel1": (jq.PerChannel(1), jnp.ones((40,))),
    "channel-1": (jq.PerChannel(-1), jnp.ones((96,))),
    "group32": (jq.PerGroup(32), jnp.ones((6, 40, 3))),
}


@pytest.mark.parametrize("gname", list(GRANS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_every_op_lowers(gname, dtype):
    g, s = GRANS[gname]
    x = X.astype(dtype)
    z = jnp.zeros(s.shape, jnp.int32)
    q = jnp.ones(x.shape, jnp.int8)

    def f(x, s, z, q):
        return (jq.quantize(x, s, z, granularity=g),
                jq.quantize(x, s, z, granularity=g, dtype=jnp.uint8, qmin=0, qmax=15),
                jq.quantize(x, s, z, granularity=g, dtype=jnp.float32, qmin=-8, qmax=7),
                jq.dequantize(q, s, z, granularity=g, dtype=dtype),
                jq.fake_quantize(x, s, z, granularity=g, qmin=-128, qmax=127),
                jq.fake_quantize_backward(x, x, s, z, granularity=g, qmin=-128, qmax=127),
                jq.quantize_backward(x, x, s, z, granularity=g, qmin=-128, qmax=127))

    names = kernels(cuda_hlo(f, x, s, z, q))
    ops = [n for n in names if n != "jaxquant_reciprocal"]
    assert ops == ["jaxquant_quantize"] * 3 + ["jaxquant_dequantize", "jaxquant_fake_quantize",
                                                 "jaxquant_fake_quantize_backward", "jaxquant_quantize_backward"]
    # Parameters along the last axis get 1/scale once per column from a tiny kernel (all ops but
    # dequantize); every other granularity computes it in-kernel per row or per tile.
    assert names.count("jaxquant_reciprocal") == (6 if gname == "channel-1" else 0)


@pytest.mark.parametrize("sym,dtype", [(True, jnp.int8), (False, jnp.uint8), (False, jnp.int8)])
@pytest.mark.parametrize("shape", [(6, 40, 96), (3, 40000), (5, 130)])
def test_dynamic_lowers_one_kernel(shape, sym, dtype):
    x = jnp.ones(shape, jnp.bfloat16)
    names = kernels(cuda_hlo(lambda x: jq.dynamic_quantize(x, symmetric=sym, dtype=dtype), x))
    assert names == ["jaxquant_dynamic_quantize"]
    names = kernels(cuda_hlo(lambda x: jq.dynamic_quantize(x, granularity=jq.PerGroup(shape[-1] // 2), symmetric=sym,
                                                           dtype=dtype), x))
    assert names == ["jaxquant_dynamic_quantize"]


def test_one_kernel_under_transformations():
    g, s = GRANS["token"]
    fq = lambda x, s: jq.fake_quantize(x, s, granularity=g, qmin=-8, qmax=7)
    # vmap folds the batch into rows: still one launch, no extra grid axis
    assert kernels(cuda_hlo(jax.vmap(fq), X, S_TOK)) == ["jaxquant_fake_quantize"]
    assert kernels(cuda_hlo(jax.vmap(fq, in_axes=(1, 1)), X, S_TOK)) == ["jaxquant_fake_quantize"]
    # grad: the forward value is dead code, only the STE backward kernel runs
    loss = lambda x, s: fq(x, s).astype(jnp.float32).sum()
    assert kernels(cuda_hlo(jax.grad(loss), X, S_TOK)) == ["jaxquant_fake_quantize_backward"]
    # value_and_grad: forward + backward, one launch each
    both = ["jaxquant_fake_quantize", "jaxquant_fake_quantize_backward"]
    assert sorted(kernels(cuda_hlo(jax.value_and_grad(loss), X, S_TOK))) == both
    # vmap of value_and_grad: still one launch each
    assert sorted(kernels(cuda_hlo(jax.vmap(jax.value_and_grad(loss)), X, S_TOK))) == both
    # remat recomputes the forward in the backward pass
    names = kernels(cuda_hlo(jax.value_and_grad(jax.checkpoint(loss)), X, S_TOK))
    assert sorted(set(names)) == both


def test_large_view_lowers_with_64bit_offsets():
    """A bf16 array over 2**32 bytes is addressed with 64-bit offsets; its int8 codes are chunked."""
    x = jax.ShapeDtypeStruct((65536, 40000), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((65536,), jnp.float32)
    hlo = cuda_hlo(lambda x, s: jq.quantize(x, s, granularity=jq.PerToken()), x, s)
    assert len(kernels(hlo)) == 2  # 2.6e9 int8 codes: two chunks of < 2**31 elements
    hlo = cuda_hlo(lambda x: jq.dynamic_quantize(x), x)
    assert len(kernels(hlo)) == 2
