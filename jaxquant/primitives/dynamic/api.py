"""The public dynamic-quantization functions: ``dynamic_quantize`` and ``choose_qparams``.

Formulas: ``jaxquant.primitives.dynamic.reference``. ``PerToken`` / ``PerGroup`` run the fused
kernel (statistics, scale and codes in one pass, ``jaxquant_dynamic_quantize``); ``PerTensor`` /
``PerChannel`` reduce with XLA and then quantize with the affine kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core import backend
from jaxquant.core import validation as V
from jaxquant.pallas.affine.triton import Config as AffineConfig
from jaxquant.pallas.dynamic.triton import Config as DynamicConfig
from jaxquant.primitives.affine.api import check_config as _check_config
from jaxquant.primitives.affine.api import quantize_with_computed_params
from jaxquant.primitives.dynamic import primitive as PD
from jaxquant.primitives.dynamic import reference as ref

__all__ = ["dynamic_quantize", "choose_qparams"]


def _impl():
    return backend.current_implementation()


def _dynamic_range(dt, qmin, qmax, symmetric):
    qmin, qmax = V.code_range(dt, qmin, qmax)
    if symmetric and not (qmin < 0 < qmax):
        raise ValueError(
            f"symmetric=True: expected a signed range qmin < 0 < qmax (zero point 0), got [{qmin}, {qmax}]; "
            "use symmetric=False for unsigned codes")
    if not symmetric and qmin == qmax:
        raise ValueError(f"qmin/qmax: asymmetric quantization needs qmin < qmax, got [{qmin}, {qmax}]")
    return qmin, qmax


def choose_qparams(x, *, granularity, qmin=-128, qmax=127, symmetric=True):
    """Scale (float32) and zero point (int32) from the data, one pair per parameter element.

    symmetric: ``scale = max(amax * f32(1/qmax), 2**-126)``, ``zp = 0``;
    asymmetric: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
    ``scale = max((hi - lo) * f32(1/(qmax - qmin)), 2**-126)``,
    ``zp = clamp(qmin - rne(lo * f32(1/scale)), qmin, qmax)`` (a float32 reciprocal, then a product).
    A NaN makes its scale NaN; infinities are ignored by the statistics.
    Computed with XLA reductions (not differentiable: parameters from data are constants).
    """
    x = V.float_array("x", x)
    gran.check_granularity(granularity, x.shape)
    qmin, qmax = V.free_range(qmin, qmax)
    if symmetric and not (qmin < 0 < qmax):
        raise ValueError(f"symmetric=True: expected qmin < 0 < qmax, got [{qmin}, {qmax}]")
    if qmin == qmax:
        raise ValueError(f"qmin/qmax: expected qmin < qmax, got [{qmin}, {qmax}]")
    scale, zp = ref.choose_qparams(jax.lax.stop_gradient(x), granularity=granularity, qmin=qmin, qmax=qmax,
                                   symmetric=symmetric)
    return scale, zp


def dynamic_quantize(x, *, granularity=gran.PerToken(), dtype=jnp.int8, symmetric=True, qmin=None, qmax=None,
                     config: DynamicConfig | AffineConfig | None = None):
    """Quantize with parameters computed from the data: returns ``(q, scale, zero_point)``.

    ``PerToken()`` and ``PerGroup(g)``: one fused kernel (statistics, scale and codes in one pass
    over x; ``config`` is a ``jaxquant.pallas.dynamic.Config``). ``PerTensor()`` and
    ``PerChannel(axis)``: an XLA reduction (``choose_qparams``; asymmetric: its zero point from
    the rows ``[lo, hi]`` by the dynamic kernel, for a correctly rounded reciprocal on the GPU) then
    the quantize kernel (two reads of x; ``config`` is an affine Config). Formulas: ``choose_qparams``.
    ``scale`` is float32,
    ``zero_point`` int32 (zeros when symmetric), both of the granularity's parameter shape. The
    codes are integers: no gradient flows to x.
    """
    x = V.float_array("x", x)
    dt = V.code_dtype("dtype", dtype)
    if dt not in V.INT_CODE_DTYPES:
        raise TypeError(f"dtype: expected an integer container (int8, uint8, int16, int32), got {dt.name}")
    qmin, qmax = _dynamic_range(dt, qmin, qmax, symmetric)
    gran.check_granularity(granularity, x.shape)
    x = jax.lax.stop_gradient(x)
    if isinstance(granularity, (gran.PerToken, gran.PerGroup)):
        _check_config(config, DynamicConfig)
        shape = x.shape
        xr = x if isinstance(granularity, gran.PerToken) else jnp.reshape(
            x, shape[:-1] + (shape[-1] // granularity.group_size, granularity.group_size))
        q, s, z = PD.bind(xr, qmin=qmin, qmax=qmax, symmetric=symmetric, out_dtype=dt, config=config, impl=_impl())
        pshape = gran.param_shape(granularity, shape)
        return jnp.reshape(q, shape), jnp.reshape(s, pshape), jnp.reshape(z, pshape)
    _check_config(config, AffineConfig)
    if symmetric:  # scale = max(amax * f32(1/qmax), 2**-126): multiplications only, exact in XLA
        scale, zp = ref.choose_qparams(x, granularity=granularity, qmin=qmin, qmax=qmax, symmetric=True)
    else:
        # zp = qmin - rne(lo * (1 / scale)) needs a correctly rounded reciprocal, which XLA:GPU's
        # float32 1 / s is not (an H200 gave zp one off at a .5 tie, hi == -lo). The rows [lo, hi]
        # go through the fused dynamic kernel instead (PTX rcp.rn; on the CPU, the reference):
        # its parameters of such a row are choose_qparams's (``ref.reduce_extrema``).
        lo, hi = ref.reduce_extrema(x, granularity=granularity)
        pshape = lo.shape
        rows = jnp.stack([jnp.reshape(lo, (-1,)), jnp.reshape(hi, (-1,))], axis=-1)
        _, s, z = PD.bind(rows, qmin=qmin, qmax=qmax, symmetric=False, out_dtype=dt, impl=_impl())
        scale, zp = jnp.reshape(s, pshape), jnp.reshape(z, pshape)
    q = quantize_with_computed_params(x, scale, None if symmetric else zp, granularity=granularity, qmin=qmin,
                                      qmax=qmax, dtype=dt, config=config)
    return q, scale, zp
