"""QuantizedWeight: int4 packing (nibble order), exact round trips, numerics, pytree behaviour, memory, errors."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.core import weights as Wt
from jaxquant.core.weights import QuantizedWeight, pack_int4, unpack_int4
from jaxquant.primitives.weights import dequantize_weight, quantize_weight

GROUPS = [None, 32, 64, 128, 256]


def test_nibble_order():
    # byte j = (q[2j] & 0xF) | (q[2j+1] << 4): the even k in the low nibble
    q = jnp.asarray([[1, 2, -1, 3, -8, 7, 0, -1]], jnp.int8)
    packed = np.asarray(pack_int4(q)).view(np.uint8)
    assert packed.tolist() == [[0x21, 0x3F, 0x78, 0xF0]]
    u = jnp.asarray([[15, 0, 3, 12]], jnp.uint8)
    assert np.asarray(pack_int4(u)).view(np.uint8).tolist() == [[0x0F, 0xC3]]


@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_every_code(signed):
    lo, hi = (-8, 7) if signed else (0, 15)
    vals = np.arange(lo, hi + 1)
    q = np.stack(np.meshgrid(vals, vals, indexing="ij"), -1).reshape(1, -1)  # every (even, odd) pair
    q = jnp.asarray(q, jnp.int8)
    back = unpack_int4(pack_int4(q), signed=signed)
    assert back.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(back), np.asarray(q))
    b = jnp.asarray(np.arange(-128, 128, dtype=np.int8)[None])
    np.testing.assert_array_equal(np.asarray(pack_int4(unpack_int4(b, signed=signed))), np.asarray(b))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_weight_round_trip(rng, bits, group_size, symmetric):
    n, k = 6, 512
    w = jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1)), jnp.float32)
    w = w.at[0, :].set(0.0)  # an all-zero row
    qw = quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
    assert isinstance(qw, QuantizedWeight)
    assert (qw.bits, qw.group_size, qw.symmetric, qw.shape) == (bits, group_size, symmetric, (n, k))
    pshape = (n,) if group_size is None else (n, k // group_size)
    assert qw.codes.dtype == jnp.int8 and qw.codes.shape == ((n, k // 2) if bits == 4 else (n, k))
    assert qw.scale.dtype == jnp.float32 and qw.scale.shape == pshape
    if symmetric:
        assert qw.zero_point is None
    else:
        assert qw.zero_point.dtype == jnp.int32 and qw.zero_point.shape == pshape
    q = Wt.unpack_codes(qw)
    qmin, qmax = Wt.code_range(bits, symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    # packing round trip is exact
    if bits == 4:
        np.testing.assert_array_equal(np.asarray(pack_int4(q)), np.asarray(qw.codes))
    # the codes are the library's quantize with the library's choose_qparams
    g = qw.granularity
    scale, zp = jq.choose_qparams(w, granularity=g, qmin=qmin, qmax=qmax, symmetric=symmetric)
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(qw.scale))
    want = jq.quantize(w, scale, None if symmetric else zp, granularity=g, qmin=qmin, qmax=qmax, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(q, np.int32), np.asarray(want))
    # dequantize equals jaxquant.dequantize of the codes bit for bit; error <= scale / 2
    d = dequantize_weight(qw)
    ref = jq.dequantize(q, qw.scale, qw.zero_point, granularity=g)
    np.testing.assert_array_equal(np.asarray(d), np.asarray(ref))
    sb = np.asarray(qw.scale)[:, None] if group_size is None else np.repeat(np.asarray(qw.scale), group_size, 1)
    # |d - w| <= s / 2 up to float32 rounding: x / s (|x / s| <= 2**8) and (q - zp) * s are each
    # rounded once, <= 2**8 * 2**-24 * s each, so at most 2**-15 * s beyond s / 2 (8-bit
    # asymmetric codes sit up to 255 steps from zero; a near-.5 case exceeded s / 2 by ~1e-5 s)
    assert (np.abs(np.asarray(d) - np.asarray(w)) <= sb * (0.5 + 2.0**-15)).all()
    # re-quantizing the dequantized weight with the same parameters gives the same codes
    again = jq.quantize(d, qw.scale, qw.zero_point, granularity=g, qmin=qmin, qmax=qmax, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(q, np.int32))
    assert np.asarray(d[0]).tolist() == [0.0] * k
    assert dequantize_weight(qw, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input(rng, dtype):
    w = jnp.asarray(rng.standard_normal((8, 128)), dtype)
    qw = quantize_weight(w, bits=4, group_size=32)
    assert qw.scale.dtype == jnp.float32
    assert float(jnp.abs(dequantize_weight(qw) - w.astype(jnp.float32)).max()) <= float(qw.scale.max())


def test_pytree_jit_and_repr(rng):
    w = jnp.asarray(rng.standard_normal((16, 256)), jnp.float32)
    qw = jax.jit(lambda w: quantize_weight(w, bits=4, group_size=64, symmetric=False))(w)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(qw)[0]]
    assert paths == [".codes", ".scale", ".zero_point"]
    leaves, tree = jax.tree_util.tree_flatten(qw)
    qw2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert (qw2.bits, qw2.group_size, qw2.symmetric, qw2.shape) == (4, 64, False, (16, 256))
    d = jax.jit(dequantize_weight)(qw)
    np.testing.assert_array_equal(np.asarray(d), np.asarray(dequantize_weight(qw2)))
    r = repr(qw)
    for s in ("shape=(16, 256)", "bits=4", "group_size=64", "symmetric=False", f"bytes={qw.nbytes:,}", "int8[16, 128]"):
        assert s in r, r
    sym = quantize_weight(w, bits=8)
    assert len(jax.tree_util.tree_leaves(sym)) == 2  # zero_point None: no leaf
    assert "group_size=per-channel" in repr(sym)


def test_checkpoint_round_trip(tmp_path, rng):
    ocp = pytest.importorskip("orbax.checkpoint")
    w = jnp.asarray(rng.standard_normal((16, 256)), jnp.float32)
    tree = {"layer": quantize_weight(w, bits=4, group_size=128, symmetric=False)}
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree)
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(path, jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree))
    assert isinstance(back["layer"], QuantizedWeight)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_memory_int4_g128():
    n, k = 4096, 14336
    abstract = jax.eval_shape(lambda w: quantize_weight(w, bits=4, group_size=128),
                              jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
    total = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(abstract))
    assert total <= 0.54 * n * k, total / (n * k)
    # and on real arrays (smaller), via the leaves' nbytes
    qw = quantize_weight(jnp.ones((512, 1024), jnp.bfloat16), bits=4, group_size=128)
    assert qw.nbytes == sum(a.nbytes for a in jax.tree_util.tree_leaves(qw)) == 512 * 512 + 512 * 8 * 4


def test_errors():
    w = jnp.ones((8, 96), jnp.float32)
    with pytest.raises(ValueError, match=r"group_size.*K = 96.*group_size = 64"):
        quantize_weight(w, bits=4, group_size=64)
    with pytest.raises(ValueError, match="bits: expected 4 or 8, got 3"):
        quantize_weight(w, bits=3)
    with pytest.raises(ValueError, match="group_size: expected None"):
        quantize_weight(w, group_size=48)
    with pytest.raises(ValueError, match="w: expected a 2-d weight"):
        quantize_weight(jnp.ones((96,)))
    with pytest.raises(TypeError, match="w: expected a float"):
        quantize_weight(jnp.ones((8, 96), jnp.int32))
    with pytest.raises(ValueError, match="even K"):
        quantize_weight(jnp.ones((8, 95)), bits=4)
    with pytest.raises(TypeError, match="qw: expected a jaxquant.QuantizedWeight"):
        dequantize_weight(w)
    qw = quantize_weight(w, bits=4, group_size=32)
    bad = QuantizedWeight(qw.codes, qw.scale[:, :2], None, bits=4, group_size=32, symmetric=True, shape=(8, 96))
    with pytest.raises(ValueError, match=r"qw.scale: expected float32 of shape \(8, 3\)"):
        dequantize_weight(bad)
    bad = QuantizedWeight(qw.codes, qw.scale, None, bits=4, group_size=32, symmetric=False, shape=(8, 96))
    with pytest.raises(ValueError, match="qw.zero_point: expected int32"):
        dequantize_weight(bad)
