"""An independent oracle: PyTorch CPU's fake-quantize (forward and gradient) equals ours bit for bit.

``torch.fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` compute
``(clamp(nearbyint(x * (1/scale)) + zp, qmin, qmax) - zp) * scale`` in float32 with the STE
gradient ``dy * (qmin <= nearbyint(x/scale) + zp <= qmax)`` — docs/numerics.md. Checked on the
reference and on the kernels (interpret mode; real kernels on a GPU). PyTorch's per-channel
kernel sends +Inf to qmin through an undefined float->int cast (we saturate to qmax), so
+Inf is left out of the per-channel comparison.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch")

import jaxquant as jq
from conftest import make_x, run_impl

RANGES = [(-128, 127), (0, 255), (-8, 7), (0, 15)]


def _torch_fq(x, scale, zp, axis, qmin, qmax):
    xt = torch.tensor(np.asarray(x, np.float32), requires_grad=True)
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(xt, float(scale), int(zp), qmin, qmax)
    else:
        y = torch.fake_quantize_per_channel_affine(
            xt, torch.tensor(np.asarray(scale)), torch.tensor(np.asarray(zp), dtype=torch.int32), axis, qmin, qmax)
    dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.backward(dy)
    return y.detach().numpy(), xt.grad.numpy(), dy.numpy()


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("shape,axis", [((37, 96), None), ((64, 33), 0), ((5, 7, 24), 1), ((19, 40), 1)])
def test_fake_quantize_equals_torch(rng, tier, impl, shape, axis, qmin, qmax):
    impl = tier if impl == "kernel" else impl
    if axis is None:
        pshape, g = (), jq.PerTensor()
        scale = np.float32(2.0 ** rng.integers(-5, 0)) if rng.integers(0, 2) else np.float32(rng.uniform(0.01, 0.1))
        zp = np.int32(rng.integers(qmin, qmax + 1))
        sb, zb = np.float64(scale), zp
    else:
        pshape, g = (shape[axis],), jq.PerChannel(axis)
        scale = np.asarray(rng.uniform(0.01, 0.1, pshape), np.float32)
        scale[::2] = 2.0 ** rng.integers(-5, 0, scale[::2].shape)  # exact ties for half the channels
        zp = np.asarray(rng.integers(qmin, qmax + 1, pshape), np.int32)
        bshape = [1] * len(shape)
        bshape[axis] = shape[axis]
        sb, zb = scale.reshape(bshape).astype(np.float64), zp.reshape(bshape)
    x = np.array(make_x(rng, shape, jnp.float32, sb, zb, qmin=qmin, qmax=qmax))
    if axis is not None:
        x[np.isposinf(x)] = 1e6  # see the module docstring (finite, castable to int64)
    y_t, g_t, dy = _torch_fq(x, scale, zp, axis, qmin, qmax)

    def f(x, s, z, dy):
        y, vjp = jax.vjp(lambda x: jq.fake_quantize(x, s, z, granularity=g, qmin=qmin, qmax=qmax), x)
        return y, vjp(dy)[0]

    y, gx = run_impl(impl, f, jnp.asarray(x), jnp.asarray(scale), jnp.asarray(zp), jnp.asarray(dy))
    np.testing.assert_array_equal(np.asarray(y).view(np.uint32), y_t.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(gx).view(np.uint32), g_t.view(np.uint32))


def test_bfloat16_equals_torch(rng):
    x = np.asarray(rng.standard_normal((16, 64)) * 4, np.float32)
    xb = torch.tensor(x).to(torch.bfloat16)
    y_t = torch.fake_quantize_per_tensor_affine(xb, 0.0625, 3, -8, 7).to(torch.float32).numpy()
    y = jq.fake_quantize(jnp.asarray(x, jnp.bfloat16), jnp.float32(0.0625), jnp.int32(3), granularity=jq.PerTensor(),
                         qmin=-8, qmax=7)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)), y_t)
