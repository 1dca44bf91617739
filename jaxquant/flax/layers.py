"""The math of a quantized layer (QAT and serving), shared by nnx and linen, and the nnx layers.

One layer, in its ``Geometry`` (``jaxquant.flax.geometry``: the kernel seen as ``W [N, K]``, the
input as rows ``x [..., K]``)::

    W_hat = fake_quantize(W, s_w, z_w, PerChannel(0) | PerGroup(g), qmin_w, qmax_w)
            s_w, z_w = absmax of W (recomputed every step; constants under the STE)
                       or learned (``learnable_scales``: LSQ gradients, ``jaxquant.fake_quantize_learnable``)
    x_hat = x                                                  activations=None
          = fake_quantize(x, s_x, PerToken(), -128, 127)        "dynamic": s_x from each row of x
          = fake_quantize(x, act_scale, PerTensor(), -128, 127) "static": calibrated act_scale
    y     = x_hat @ W_hat^T (+ bias)                            (QAT, ``QATLayer``)
    y     = quantized_linear(x, Q) | weight_only_linear(x, Q)   (serving, ``QuantizedLayer``)

with ``Q`` the ``QuantizedWeight`` holding exactly the codes and scales of ``W_hat``. Gradients of
QAT: straight-through (``dx = dy_hat * m_x``, ``dW = dW_hat * m_w``, ``m`` the in-range masks);
scales from data get none; learnable scales get LSQ gradients.

fp8 configs (``config.is_fp8``: ``FP8``, ``FP8_BLOCK``)::

    y     = fp8_linear(x, W, bias, recipe=config.fp8_recipe)    (QAT = fp8 training, ``QATLayer``)
    y     = quantized_linear(x, Q)                               (serving, ``QuantizedLayer``)

``fp8_linear`` quantizes x and the float ``W`` afresh at every call (forward, dgrad and wgrad GEMMs
in fp8). Its rowwise forward (x per token, W per row) and blockwise forward (x in 1 x 128 groups, W
in 128 x 128 blocks) quantize exactly as ``quantize_weight(W, dtype=float8_e4m3fn[, block_size=128])``
and ``quantized_linear`` do and run the same GEMM, so the served layer computes what fp8 training
computed: the same bits in the compute dtype float32, one rounding of the output apart in
bfloat16 / float16 (training adds the bias after rounding the product to that dtype, serving
before). A ``recipe`` other than the format's own (``"tensorwise"``, or a per-channel format
trained ``"blockwise"``) trains with other scales than the served layer's.
``fake_quantize_weight`` / ``fake_quantize_activation`` with an fp8 config are the float
simulation of those quantizers (``fake_quantize(..., code_dtype=float8_e4m3fn)``, absmax scales).

Equivalence of serving with QAT. QAT computes ``fl(x_hat @ W_hat^T) + b`` with float32 products of
the same integer codes the served layer holds. Weight-only serving computes ``fl(x @ W_hat^T)``
with the same ``W_hat`` (only the summation order differs); W8A8 serving computes the integer dot
exactly and scales once: ``y = (f32(sum_k q_x q_w) * s_x) * s_w + b``. Both are within the float32
error of a length-K dot product::

    |y_serving - y_qat| <= (K + 2) * u * sum_k |x_hat_k| |W_hat_nk| + u * |y| (+ u |b|),   u = 2**-24

Compute dtype: as Flax's layers, ``dtype`` if the layer has one, else the promotion of the
input's and the float kernel's dtypes; the input is cast to it and the output has it (a bfloat16
layer given float32 inputs returns bfloat16 whether float, QAT or served).
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx
from flax.nnx.nn import dtypes

import jaxquant as jq
from jaxquant.core import weights as W
from jaxquant.flax import calibrate as C
from jaxquant.flax.config import QuantConfig
from jaxquant.flax import geometry as G
from jaxquant.flax.geometry import Geometry
from jaxquant.flax import sharding as S

__all__ = ["fake_quantize_weight", "fake_quantize_activation", "lsq_grad_factor", "weight_params",
           "serving_weight", "qweight_of", "codes_spec", "qat_matmul", "fp8_train_matmul", "serve_matmul",
           "compute_dtype", "act_scale_from_amax", "QuantStat",
           "Quantized", "QATLayer", "QuantizedLayer", "maybe_abstract", "geometry_of"]

_TINY = np.float32(2.0**-126)


def _weight_gran(config: QuantConfig):
    if config.block_size is not None:
        return jq.PerBlock((config.block_size, config.block_size))
    return jq.PerChannel(0) if config.group_size is None else jq.PerGroup(config.group_size)


def _fp8_act_gran(config: QuantConfig):
    """The activations' granularity of fp8 serving: per token, or 1 x 128 groups for block weights."""
    return jq.PerToken() if config.block_size is None else jq.PerGroup(config.block_size)


def lsq_grad_factor(config: QuantConfig, k: int) -> float:
    """LSQ's gradient scale for a weight quantizer: ``1 / sqrt(elements per scale * qmax)``."""
    per_scale = k if config.group_size is None else config.group_size
    return 1.0 / math.sqrt(per_scale * config.weight_range[1])


def param_shape(config: QuantConfig, n: int, k: int) -> tuple[int, ...]:
    """Shape of the weight scale (and zero point): ``[N]``, ``[N, K // g]`` or (fp8 blocks) ``[N // b, K // b]``."""
    return config.scale_shape(n, k)


def fake_quantize_weight(w, config: QuantConfig, scale=None, zero_point=None, *, learnable: bool = False):
    """Fake-quantized ``W [N, K]`` (STE). ``scale``/``zero_point`` of shape ``[N]`` or ``[N, K // g]``.

    ``scale=None``: absmax parameters from ``w`` (``jaxquant.choose_qparams``, constants).
    ``learnable=True``: ``scale`` and a FLOAT ``zero_point`` (or None when symmetric) get LSQ
    gradients (``jaxquant.fake_quantize_learnable``; groups are channels of the
    ``[N * K/g, g]`` view).
    """
    if S.explicit_context((w,)):
        # grouping W splits / merges its sharded axes, which explicit sharding types do not infer:
        # leave the sharding to XLA inside, and give W_hat the sharding of W
        fq = lambda w, s, z: _fake_quantize_weight(w, config, s, z, learnable)
        return jax.sharding.auto_axes(fq, out_sharding=jax.typeof(w).sharding.spec)(w, scale, zero_point)
    return _fake_quantize_weight(w, config, scale, zero_point, learnable)


def _fake_quantize_weight(w, config: QuantConfig, scale, zero_point, learnable: bool):
    n, k = w.shape
    if config.is_fp8:
        return _fake_quantize_weight_fp8(w, config, scale, learnable)
    qmin, qmax = config.weight_range
    config.check_features(k)
    if learnable:
        g = k if config.group_size is None else config.group_size
        rows = jnp.reshape(w, (n * (k // g), g))
        zp = None if zero_point is None else jnp.reshape(zero_point, (-1,))
        out = jq.fake_quantize_learnable(rows, jnp.reshape(scale, (-1,)), zp, granularity=jq.PerChannel(0),
                                      qmin=qmin, qmax=qmax, grad_factor=lsq_grad_factor(config, k))
        return jnp.reshape(out, (n, k))
    if scale is None:
        scale, zero_point = C.weight_qparams(w, bits=config.weight_bits, group_size=config.group_size,
                                             symmetric=config.weight_symmetric, method="absmax")
    zp = None if config.weight_symmetric else zero_point
    return jq.fake_quantize(w, scale, zp, granularity=_weight_gran(config), qmin=qmin, qmax=qmax)


def _fake_quantize_weight_fp8(w, config: QuantConfig, scale, learnable: bool):
    if learnable:
        raise ValueError(f"fake_quantize_weight: learnable=True is for integer configs; {config} has fp8 weights, "
                         "whose scales come from the data")
    why = config.problem(w.shape[1], n=w.shape[0], serve=True)
    if why:
        raise ValueError(f"fake_quantize_weight: {config} cannot quantize a weight of shape {tuple(w.shape)}: {why}")
    if scale is None:
        scale = weight_params(w, config)[0]
    return jq.fake_quantize(w, jax.lax.stop_gradient(scale), granularity=_weight_gran(config),
                            code_dtype=config.weight_dtype)


def fake_quantize_activation(x, config: QuantConfig, act_scale=None):
    """Fake-quantized activation rows ``x [..., K]`` (``config.activations``: int8, or fp8 e4m3 for an
    fp8 config, per token or in 1 x 128 groups), or ``x`` when None."""
    if config.activations is None:
        return x
    if config.is_fp8:
        g = _fp8_act_gran(config)
        _, s, _ = jq.dynamic_quantize(jax.lax.stop_gradient(x), granularity=g, dtype=config.weight_dtype)
        return jq.fake_quantize(x, s, granularity=g, code_dtype=config.weight_dtype)
    if config.activations == "dynamic":
        s, _ = jq.choose_qparams(x, granularity=jq.PerToken(), qmin=-128, qmax=127)
        return jq.fake_quantize(x, s, granularity=jq.PerToken(), qmin=-128, qmax=127)
    if act_scale is None:
        raise ValueError("activations='static' needs a calibrated act_scale: quantize(..., calibration=Calibration(...))")
    return jq.fake_quantize(x, jnp.reshape(act_scale, ()), granularity=jq.PerTensor(), qmin=-128, qmax=127)


def act_scale_from_amax(amax):
    """Static per-tensor int8 scale of inputs with ``max |x| = amax``: ``max(amax * f32(1/127), 2**-126)``."""
    return jnp.maximum(jnp.asarray(amax, jnp.float32) * np.float32(1.0 / 127), _TINY)


def weight_params(w, config: QuantConfig, method: str | None = None):
    """``(scale, zero_point int32 or None)`` of ``w [N, K]`` by ``method`` (default ``config.calibration``).
    fp8: the scales of ``jaxquant.quantize_weight(w, dtype=float8_e4m3fn[, block_size])`` (absmax), no
    zero point."""
    if config.is_fp8:
        qw = jq.quantize_weight(jax.lax.stop_gradient(w), dtype=config.weight_dtype, block_size=config.block_size)
        return qw.scale, None
    s, z = C.weight_qparams(w, bits=config.weight_bits, group_size=config.group_size,
                            symmetric=config.weight_symmetric, method=method or config.calibration,
                            percentile=config.percentile)
    return s, (None if config.weight_symmetric else z)


def rounded_zero_point(zero_point, config: QuantConfig):
    """The int32 zero point a learnable (float) zero point stands for: rounded, clamped to the codes."""
    if zero_point is None:
        return None
    qmin, qmax = config.weight_range
    return jnp.clip(jnp.round(zero_point), qmin, qmax).astype(jnp.int32)


def serving_weight(w, scale, zero_point, config: QuantConfig) -> W.QuantizedWeight:
    """``QuantizedWeight`` of ``w [N, K]`` with the given parameters (``zero_point`` int32 or None).
    With absmax parameters this is ``jaxquant.quantize_weight(w, ...)`` (fp8: ``dtype=float8_e4m3fn``)."""
    if config.is_fp8:
        scale = jnp.asarray(scale, jnp.float32)
        codes = jq.quantize(jnp.asarray(w, jnp.float32), scale, granularity=_weight_gran(config),
                            dtype=config.weight_dtype)
        return qweight_of(codes, scale, None, config, w.shape)
    qmin, qmax = config.weight_range
    zp = None if config.weight_symmetric else jnp.asarray(zero_point, jnp.int32)
    scale = jnp.asarray(scale, jnp.float32)
    codes = jq.quantize(jnp.asarray(w, jnp.float32), scale, zp, granularity=_weight_gran(config), qmin=qmin,
                        qmax=qmax, dtype=jnp.int8)
    if config.weight_bits == 4:
        codes = W.pack_int4(codes)
    return qweight_of(codes, scale, zp, config, w.shape)


def qweight_of(codes, scale, zero_point, config: QuantConfig, shape) -> W.QuantizedWeight:
    """The ``QuantizedWeight`` of ``config`` holding these arrays (``shape``: the float ``(N, K)``)."""
    return W.QuantizedWeight(codes, scale, zero_point, bits=config.weight_bits, group_size=config.group_size,
                             symmetric=config.weight_symmetric, shape=shape,
                             code_dtype=None if not config.is_fp8 else config.weight_dtype,
                             block_size=config.block_size)


def codes_spec(config: QuantConfig, n: int, k: int) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` of a served layer's codes: int8 ``[N, K]``, packed int4 ``[N, K // 2]`` or fp8 ``[N, K]``."""
    if config.is_fp8:
        return (n, k), np.dtype(config.weight_dtype)
    return ((n, k // 2) if config.weight_bits == 4 else (n, k)), np.dtype(np.int8)


def compute_dtype(x, dtype, kernel_dtype):
    """Flax's promotion: ``dtype`` when set, else the result type of the input and the kernel."""
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(x.dtype, kernel_dtype)


def qat_matmul(x2, w_hat, bias, config: QuantConfig, act_scale=None, precision=None):
    """The QAT forward on rows: ``fake_quant(x2) @ w_hat^T (+ bias)`` in ``x2``'s dtype."""
    x_hat = fake_quantize_activation(x2, config, act_scale)
    y = lax.dot_general(x_hat, w_hat.astype(x2.dtype), (((x2.ndim - 1,), (1,)), ((), ())), precision=precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (-1,)).astype(y.dtype)
    return y


def fp8_train_matmul(x2, w, bias, config: QuantConfig):
    """The fp8 training forward on rows: ``fp8_linear(x2, w, bias, recipe=config.fp8_recipe)`` with the
    float ``w [N, K]`` (in its own dtype: quantized afresh), in ``x2``'s dtype."""
    b = None if bias is None else jnp.reshape(bias, (-1,))
    return jq.fp8_linear(x2, w, b, recipe=config.fp8_recipe)


def serve_matmul(x2, qw: W.QuantizedWeight, bias, config: QuantConfig, act_scale=None):
    """The serving forward on rows: ``quantized_linear`` (W8A8, fp8) or ``weight_only_linear``, in ``x2``'s dtype."""
    b = None if bias is None else jnp.reshape(bias, (-1,))
    if config.serving_kind in ("w8a8", "fp8"):
        return jq.quantized_linear(x2, qw, b, act_scale=act_scale)
    return jq.weight_only_linear(x2, qw, b)


def maybe_abstract(fn, *args):
    """``fn(*args)``, or its ``jax.eval_shape`` when an argument is abstract (``ShapeDtypeStruct``
    leaves of a model built by ``nnx.eval_shape``): conversion then only computes shapes. Arrays
    on a mesh of explicit sharding types are converted with the sharding left to XLA
    (``sharding.call_auto_typed``)."""
    if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(args)):
        return jax.eval_shape(fn, *args)
    if S.explicit_context(args):
        fn = jax.sharding.auto_axes(fn, out_sharding=jax.sharding.PartitionSpec())
    return S.call_auto_typed(fn, args)


def geometry_of(module) -> Geometry | None:
    """The ``Geometry`` of an nnx layer ``quantize`` handles, None for other modules; raises
    ``UnsupportedLayer`` (with the reason) for a handled kind whose contraction is not a matmul."""
    if isinstance(module, (QATLayer, QuantizedLayer)):
        return module.geometry
    if not isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
        return None
    custom = [name for name, default in (("dot_general", (None, lax.dot_general)), ("dot_general_cls", (None,)),
                                         ("einsum_op", (None, jnp.einsum)), ("preferred_element_type", (None,)),
                                         ("promote_dtype", (None, dtypes.promote_dtype)))
              if getattr(module, name, None) not in default]
    if custom:
        raise G.UnsupportedLayer(f"the layer sets {', '.join(custom)}, which the quantized layers do not reproduce")
    kshape = tuple(module.kernel.get_value().shape)
    bias = getattr(module, "bias", None)
    bshape = None if bias is None else tuple(bias.get_value().shape)
    if isinstance(module, nnx.Linear):
        return G.linear("Linear", kshape, bshape)
    if isinstance(module, nnx.LinearGeneral):
        return G.general("LinearGeneral", kshape, module.axis, len(module.batch_axis), bshape)
    return G.einsum("Einsum", module.einsum_str, kshape, bshape)


def _nbytes(a) -> int:
    return 0 if a is None else int(math.prod(a.shape) * np.dtype(a.dtype).itemsize)


# ------------------------------------------------------------------------------------------
# nnx layers
# ------------------------------------------------------------------------------------------
class QuantStat(nnx.Variable):
    """A calibrated quantization statistic (the static activation scale): saved with the model
    state, not trained by ``nnx.Param`` optimizers."""


class Quantized(nnx.Variable):
    """Quantized weight data of a serving layer (codes, scales, zero points): not trainable."""


def _check_call(layer, einsum_str, out_sharding):
    g = layer.geometry
    if einsum_str is not None and einsum_str.replace(" ", "") != g.einsum:
        raise ValueError(f"{g.kind} quantized with einsum {g.einsum!r} was called with einsum_str={einsum_str!r}: "
                         "the quantized weight layout is fixed at quantization")
    if out_sharding is not None:
        raise NotImplementedError(f"{g.kind}: out_sharding is not supported by quantized layers")


class QATLayer(nnx.Module):
    """QAT version of a float ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` (module docstring).

    Holds the float layer's own ``kernel`` and ``bias`` params (same names, shapes and dtypes, so
    optimizers and checkpoints see the model's usual parameters), plus, with ``learnable_scales``,
    ``w_scale`` (and a float ``w_zero_point`` when asymmetric) as ``nnx.Param`` of shape ``[N]`` /
    ``[N, K // g]``, and with ``"static"`` activations the calibrated ``act_scale`` (``QuantStat``).
    ``config`` records what QAT simulates: ``quantize(qat_model)`` serves exactly that. With an fp8
    config the matmul is ``jaxquant.fp8_linear`` on the float weight (fp8 training; module
    docstring). The kernel and bias keep their variables' metadata (sharding annotations); ``quantize`` names the
    learnable scales' axes after the kernel's (``jaxquant.flax.sharding.annotate_layer``).
    """

    def __init__(self, layer: nnx.Module, geometry: Geometry, config: QuantConfig, *, act_scale=None):
        self.geometry = geometry
        self.config = config
        self.kernel = layer.kernel
        self.bias = layer.bias if getattr(layer, "bias", None) is not None else None
        self.dtype = getattr(layer, "dtype", None)
        self.precision = getattr(layer, "precision", None)
        s = z = None
        if config.learnable_scales:
            s, z = maybe_abstract(lambda k: weight_params(geometry.weight(k), config), self.kernel.get_value())
            z = None if z is None else maybe_abstract(lambda a: a.astype(jnp.float32), z)
        self.w_scale = None if s is None else nnx.Param(s)
        self.w_zero_point = None if z is None else nnx.Param(z)
        if config.activations == "static" and act_scale is None:
            raise ValueError("activations='static' needs a calibrated act_scale")
        self.act_scale = None if config.activations != "static" else QuantStat(act_scale)

    def weight(self):
        """The float weight ``W [N, K]``."""
        return self.geometry.weight(self.kernel[...])

    def weight_qparams(self):
        """``(scale, zero_point int32 or None)`` the weight is quantized with now."""
        if self.config.learnable_scales:
            zp = None if self.w_zero_point is None else self.w_zero_point[...]
            return self.w_scale[...], rounded_zero_point(zp, self.config)
        return weight_params(self.weight(), self.config, method="absmax")

    def quantized_weight(self):
        """``W_hat [N, K]`` of the forward pass (differentiable: STE / LSQ)."""
        c = self.config
        if c.learnable_scales:
            zp = None if self.w_zero_point is None else self.w_zero_point[...]
            return fake_quantize_weight(self.weight(), c, self.w_scale[...], zp, learnable=True)
        return fake_quantize_weight(self.weight(), c)

    def __call__(self, x, einsum_str=None, out_sharding=None):
        _check_call(self, einsum_str, out_sharding)
        dtype = compute_dtype(x, self.dtype, self.kernel.get_value().dtype)
        x = x.astype(dtype)
        bias = None if self.bias is None else self.bias[...]
        act = None if self.act_scale is None else self.act_scale[...]
        flat = bias if self.geometry.flat_bias else None
        if self.config.is_fp8:
            w = self.weight()
            matmul = lambda x2: fp8_train_matmul(x2, w, flat, self.config)
        else:
            w_hat = self.quantized_weight()
            matmul = lambda x2: qat_matmul(x2, w_hat, flat, self.config, act, self.precision)
        return self.geometry.apply(x, matmul, bias).astype(dtype)


class QuantizedLayer(nnx.Module):
    """Serving version of a float or QAT layer: ``codes`` / ``w_scale`` / ``w_zero_point``
    (``Quantized`` variables: int8 ``[N, K]``, packed ``[N, K // 2]`` or fp8 ``[N, K]``, float32 and int32
    ``[N]``, ``[N, K // g]`` or fp8 blocks' ``[N // 128, K // 128]``), the float ``bias`` (its own dtype),
    ``act_scale`` (``QuantStat``, static activations); runs ``jaxquant.quantized_linear`` (W8A8, fp8) or
    ``jaxquant.weight_only_linear``.
    ``dtype`` / ``kernel_dtype`` keep the float layer's compute-dtype behaviour. ``quantize`` gives
    the quantized variables the float kernel's sharding names mapped onto ``W [N, K]``
    (``jaxquant.flax.sharding.annotate_layer``).
    """

    def __init__(self, geometry: Geometry, config: QuantConfig, qweight: W.QuantizedWeight, bias=None, *,
                 act_scale=None, dtype=None, kernel_dtype=jnp.float32):
        if config.serving_kind == "fake":
            raise ValueError(f"QuantizedLayer: no integer kernel serves {config} (W8A8 needs 8-bit symmetric "
                             "per-channel weights; weight-only serving needs activations=None)")
        self.geometry = geometry
        self.config = config
        self.codes = Quantized(qweight.codes)
        self.w_scale = Quantized(qweight.scale)
        self.w_zero_point = None if qweight.zero_point is None else Quantized(qweight.zero_point)
        self.bias = bias
        self.act_scale = None if act_scale is None else QuantStat(act_scale)
        self.dtype = dtype
        self.kernel_dtype = jnp.dtype(kernel_dtype)

    @property
    def qweight(self) -> W.QuantizedWeight:
        return qweight_of(self.codes[...], self.w_scale[...],
                          None if self.w_zero_point is None else self.w_zero_point[...], self.config,
                          (self.geometry.n, self.geometry.k))

    def __call__(self, x, einsum_str=None, out_sharding=None):
        _check_call(self, einsum_str, out_sharding)
        dtype = compute_dtype(x, self.dtype, self.kernel_dtype)
        x = x.astype(dtype)
        bias = None if self.bias is None else self.bias[...]
        act = None if self.act_scale is None else self.act_scale[...]
        qw = self.qweight
        flat = bias if self.geometry.flat_bias else None
        y = self.geometry.apply(x, lambda x2: serve_matmul(x2, qw, flat, self.config, act), bias)
        return y.astype(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes, scales, zero points and bias."""
        return sum(_nbytes(None if v is None else v.get_value())
                   for v in (self.codes, self.w_scale, self.w_zero_point, self.bias))
