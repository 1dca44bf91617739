"""Quantization-aware training for Flax: a ``dot_general`` for ``nnx.Linear`` / ``nn.Dense`` and
explicit ``QATLinear`` (nnx) / ``QATDense`` (linen) layers.

Forward of one layer (``x [..., K]``, flax kernel ``[K, N]`` = ``W^T``, ``W [N, K]``)::

    W_hat = fake_quantize(W, s_w, z_w, PerChannel(0) | PerGroup(g), qmin_w, qmax_w)
            s_w, z_w = choose_qparams(W) (absmax, recomputed every step; constants under the STE)
                       or learned (``learnable_scales``: LSQ gradients, ``jaxquant.primitives.lsq.api``)
    x_hat = x                                           activations=None
          = fake_quantize(x, s_x, PerToken(), -128, 127)   "dynamic": s_x = choose_qparams(x, PerToken())
          = fake_quantize(x, act_scale, PerTensor(), -128, 127)   "static": calibrated act_scale
    y     = x_hat @ W_hat^T (+ bias)

so per-output-channel scales on the flax kernel ``[K, N]`` are ``PerChannel(-1)`` of the kernel and
groups run along K (axis 0): the layers transpose to ``W [N, K]`` (free under jit) and use the
library's weight layout, which makes the weight quantizer exactly ``jaxquant.quantize_weight``.

Gradients: straight-through (``jaxquant.fake_quantize``): ``dx = dy_hat * m_x``, ``dW = dW_hat * m_w``
with ``m`` the in-range masks; scales from data get none; learnable scales get LSQ gradients.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

import jaxquant as jq
from jaxquant.flax import calibrate as C
from jaxquant.flax.config import QuantConfig

__all__ = ["fake_quantize_weight", "fake_quantize_activation", "QATDotGeneral", "qat_dot_general",
           "QATLinear", "QATDense", "QuantStat", "lsq_grad_factor", "calibrate_linen_activations"]


def _weight_gran(config: QuantConfig):
    return jq.PerChannel(0) if config.group_size is None else jq.PerGroup(config.group_size)


def lsq_grad_factor(config: QuantConfig, k: int) -> float:
    """LSQ's gradient scale for a weight quantizer: ``1 / sqrt(elements per scale * qmax)``."""
    per_scale = k if config.group_size is None else config.group_size
    return 1.0 / math.sqrt(per_scale * config.weight_range[1])


def fake_quantize_weight(w, config: QuantConfig, scale=None, zero_point=None, *, learnable: bool = False):
    """Fake-quantized ``W [N, K]`` (STE). ``scale``/``zero_point`` of shape ``[N]`` or ``[N, K // g]``.

    ``scale=None``: absmax parameters from ``w`` (``jaxquant.choose_qparams``, constants).
    ``learnable=True``: ``scale`` and a FLOAT ``zero_point`` (or None when symmetric) get LSQ
    gradients (``jaxquant.primitives.lsq.api.fake_quantize_learnable``; groups are channels of the
    ``[N * K/g, g]`` view).
    """
    qmin, qmax = config.weight_range
    n, k = w.shape
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


def fake_quantize_activation(x, config: QuantConfig, act_scale=None):
    """int8 fake-quantized activations (``config.activations``), or ``x`` unchanged when None."""
    if config.activations is None:
        return x
    if config.activations == "dynamic":
        s, _ = jq.choose_qparams(x, granularity=jq.PerToken(), qmin=-128, qmax=127)
        return jq.fake_quantize(x, s, granularity=jq.PerToken(), qmin=-128, qmax=127)
    if act_scale is None:
        raise ValueError("activations='static' needs a calibrated act_scale (jaxquant.flax.calibrate_activations)")
    return jq.fake_quantize(x, jnp.reshape(act_scale, ()), granularity=jq.PerTensor(), qmin=-128, qmax=127)


def _linear(x, w_hat, bias, precision=None, preferred_element_type=None):
    y = lax.dot_general(x, w_hat.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=preferred_element_type)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


@dataclasses.dataclass(frozen=True)
class QATDotGeneral:
    """A ``dot_general`` for ``nnx.Linear(..., dot_general=...)`` and ``nn.Dense(dot_general=...)``.

    Called as ``dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
    **kwargs)`` (flax passes ``out_sharding``; it is forwarded to ``lax.dot_general``). It supports
    the dense contraction: ``rhs`` a 2-d kernel ``[K, N]`` contracted on its axis 0 with the last
    axis of ``lhs``, no batch dimensions. Weights: absmax fake-quantization (``config``'s bits /
    group size / symmetry); activations: None or ``"dynamic"`` (per token). Stateful options
    (``"static"`` activations, learnable scales) need a layer that holds state: ``QATLinear`` (nnx)
    or ``QATDense`` (linen).
    """

    config: QuantConfig = QuantConfig()

    def __post_init__(self):
        if self.config.activations == "static" or self.config.learnable_scales:
            raise ValueError("QATDotGeneral is stateless: activations='static' and learnable_scales=True need "
                             "QATLinear (nnx) or QATDense (linen) layers")

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        (lc, rc), (lb, rb) = dimension_numbers
        if rhs.ndim != 2 or tuple(lb) or tuple(rb) or tuple(rc) != (0,) or tuple(lc) != (lhs.ndim - 1,):
            raise NotImplementedError(
                f"QATDotGeneral: expected a dense contraction (lhs [..., K] with rhs [K, N] on K, no batch dims), "
                f"got lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)}, dimension_numbers={dimension_numbers}")
        w_hat = fake_quantize_weight(rhs.T, self.config)
        x_hat = fake_quantize_activation(lhs, self.config)
        return lax.dot_general(x_hat, w_hat.T.astype(rhs.dtype), dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def qat_dot_general(config: QuantConfig = QuantConfig()) -> QATDotGeneral:
    """``QATDotGeneral(config)``: pass as ``nnx.Linear(..., dot_general=qat_dot_general(cfg))``."""
    return QATDotGeneral(config)


# ------------------------------------------------------------------------------------------
# nnx
# ------------------------------------------------------------------------------------------
from flax import nnx  # noqa: E402
from flax import linen as nn  # noqa: E402


class QuantStat(nnx.Variable):
    """Calibrated quantization statistics (static activation scale and its observed amax): not
    trained by ``nnx.Param`` optimizers, saved with the model state."""


class QATLinear(nnx.Module):
    """Dense layer with fake-quantized weights and activations (module docstring).

    ``kernel [in, out]`` and ``bias [out]`` are ``nnx.Param`` (nnx.Linear layout, so
    ``load_bert_weights`` and optimizers see the usual names). With ``learnable_scales``:
    ``w_scale`` (and ``w_zero_point``, float, when asymmetric) are ``nnx.Param`` of shape
    ``[out]`` / ``[out, in // g]``, initialised by ``reset_weight_qparams`` (``config.calibration``)
    at construction and by ``load_dense_weights``. ``"static"`` activations hold ``act_scale``
    (``QuantStat``, set by ``jaxquant.flax.calibrate_activations``).
    """

    def __init__(self, in_features: int, out_features: int, *, config: QuantConfig = QuantConfig(),
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init(),
                 rngs: nnx.Rngs):
        config.check_features(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.config = config
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        if config.learnable_scales:
            g = in_features if config.group_size is None else config.group_size
            pshape = (out_features,) if config.group_size is None else (out_features, in_features // g)
            self.w_scale = nnx.Param(jnp.ones(pshape, jnp.float32))
            self.w_zero_point = None if config.weight_symmetric else nnx.Param(jnp.zeros(pshape, jnp.float32))
            self.reset_weight_qparams()
        if config.activations == "static":
            self.act_scale = QuantStat(jnp.ones((), jnp.float32))
            self.act_amax = QuantStat(jnp.zeros((), jnp.float32))
        self.observing = False

    # -- parameters -------------------------------------------------------------------------
    def weight(self):
        """The float weight ``W [out, in]`` (the kernel's transpose)."""
        return self.kernel[...].T

    def reset_weight_qparams(self, method: str | None = None):
        """(Re)initialise learnable weight scales from the current kernel (``config.calibration``)."""
        if not self.config.learnable_scales:
            return
        c = self.config
        s, z = C.weight_qparams(self.weight(), bits=c.weight_bits, group_size=c.group_size,
                                symmetric=c.weight_symmetric, method=method or c.calibration, percentile=c.percentile)
        self.w_scale.set_value(s)
        if self.w_zero_point is not None:
            self.w_zero_point.set_value(z.astype(jnp.float32))

    def load_dense_weights(self, weight, bias):
        """Load a torch-layout ``weight [out, in]`` and ``bias [out]`` (MiniLM's ``linear_factory`` hook)."""
        weight = np.asarray(weight, np.float32)
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected shape {(self.out_features, self.in_features)}, got {weight.shape}")
        self.kernel.set_value(jnp.asarray(weight.T, self.kernel.get_value().dtype))
        if self.bias is not None:
            self.bias.set_value(jnp.asarray(bias, self.bias.get_value().dtype))
        self.reset_weight_qparams()

    def weight_qparams(self):
        """``(scale, zero_point int32 or None)`` the weight is quantized with now."""
        c = self.config
        if c.learnable_scales:
            zp = None
            if self.w_zero_point is not None:
                qmin, qmax = c.weight_range
                zp = jnp.clip(jnp.round(self.w_zero_point[...]), qmin, qmax).astype(jnp.int32)
            return self.w_scale[...], zp
        s, z = C.weight_qparams(self.weight(), bits=c.weight_bits, group_size=c.group_size,
                                symmetric=c.weight_symmetric, method="absmax")
        return s, (None if c.weight_symmetric else z)

    def quantized_weight(self):
        """The fake-quantized ``W_hat [out, in]`` of the forward pass (differentiable, STE/LSQ)."""
        c = self.config
        if c.learnable_scales:
            zp = None if self.w_zero_point is None else self.w_zero_point[...]
            return fake_quantize_weight(self.weight(), c, self.w_scale[...], zp, learnable=True)
        return fake_quantize_weight(self.weight(), c)

    def __call__(self, x):
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.get_value().dtype)
        x = x.astype(dtype)
        bias = None if self.bias is None else self.bias[...]
        if self.observing:
            amax = jnp.max(jnp.abs(lax.stop_gradient(x))).astype(jnp.float32)
            self.act_amax.set_value(jnp.maximum(self.act_amax.get_value(), amax))
            return _linear(x, self.weight(), bias)
        act_scale = self.act_scale[...] if self.config.activations == "static" else None
        x_hat = fake_quantize_activation(x, self.config, act_scale)
        return _linear(x_hat, self.quantized_weight(), bias)


# ------------------------------------------------------------------------------------------
# linen
# ------------------------------------------------------------------------------------------
class QATDense(nn.Module):
    """linen ``Dense`` with fake-quantized weights and activations: every ``QuantConfig`` option, as
    ``QATLinear`` (nnx) computes it (module docstring).

    Variables (``model.init`` creates them):

    * ``params``: ``kernel [in, features]``, ``bias [features]`` (as ``nn.Dense``); with
      ``learnable_scales``: ``w_scale`` (``[features]`` or ``[features, in // g]``) and, when
      asymmetric, a float ``w_zero_point``, initialised from the kernel by ``config.calibration``
      (``QATDense.weight_qparams_from_kernel`` recomputes them after loading other kernels) and
      trained with LSQ gradients.
    * ``quant_stats``: ``act_scale`` (``activations="static"``, a per-tensor float32 scale, 1.0 until
      calibrated by ``calibrate_linen_activations``).
    * ``quant_amax``: ``act_amax`` — only while observing: when ``apply`` is called with
      ``"quant_amax"`` mutable (outside ``init``), a static-activation layer records ``max |x|``
      and computes the float forward instead of quantizing (``calibrate_linen_activations`` does this).
    """

    features: int
    config: QuantConfig = QuantConfig()
    use_bias: bool = True
    dtype: object = None
    param_dtype: object = jnp.float32
    kernel_init: object = nn.initializers.lecun_normal()
    bias_init: object = nn.initializers.zeros_init()

    @staticmethod
    def weight_qparams_from_kernel(kernel, config: QuantConfig, method: str | None = None) -> dict:
        """``{"w_scale": ..., "w_zero_point": ...}`` (the zero point only when asymmetric) calibrated from a
        kernel ``[in, out]`` by ``method`` (default ``config.calibration``): the learnable-scale params."""
        s, z = C.weight_qparams(jnp.asarray(kernel).T, bits=config.weight_bits, group_size=config.group_size,
                                symmetric=config.weight_symmetric, method=method or config.calibration,
                                percentile=config.percentile)
        out = {"w_scale": s}
        if not config.weight_symmetric:
            out["w_zero_point"] = z.astype(jnp.float32)
        return out

    @nn.compact
    def __call__(self, x):
        c = self.config
        k = x.shape[-1]
        c.check_features(k)
        kernel = self.param("kernel", self.kernel_init, (k, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
        x = x.astype(dtype)
        w = kernel.T
        if c.learnable_scales:
            init = lambda name: (lambda _rng: QATDense.weight_qparams_from_kernel(kernel, c)[name])
            w_scale = self.param("w_scale", init("w_scale"))
            w_zp = None if c.weight_symmetric else self.param("w_zero_point", init("w_zero_point"))
            w_hat = fake_quantize_weight(w, c, w_scale, w_zp, learnable=True)
        else:
            w_hat = fake_quantize_weight(w, c)
        act_scale = None
        if c.activations == "static":
            act_scale = self.variable("quant_stats", "act_scale", lambda: jnp.ones((), jnp.float32)).value
            if self.is_mutable_collection("quant_amax") and not self.is_initializing():
                amax = self.variable("quant_amax", "act_amax", lambda: jnp.zeros((), jnp.float32))
                amax.value = jnp.maximum(amax.value, jnp.max(jnp.abs(lax.stop_gradient(x))).astype(jnp.float32))
                return _linear(x, w, bias)
        return _linear(fake_quantize_activation(x, c, act_scale), w_hat, bias)


def calibrate_linen_activations(model: nn.Module, variables, batches, *, apply=None):
    """linen counterpart of ``jaxquant.flax.calibrate_activations``: returns ``variables`` with the
    ``quant_stats/.../act_scale`` of every static-activation ``QATDense`` set to
    ``max(amax * f32(1/127), 2**-126)``, ``amax`` = ``max |x|`` of its inputs over ``batches``.

    ``apply(variables, batch)`` runs the forward pass with ``"quant_amax"`` mutable and returns
    ``(output, updates)``; default ``jax.jit(lambda v, b: model.apply(v, b, mutable=["quant_amax"]))``
    (pass your own for models taking several arguments).
    """
    from flax import traverse_util

    if apply is None:
        apply = jax.jit(lambda v, b: model.apply(v, b, mutable=["quant_amax"]))
    variables = dict(variables)
    variables.pop("quant_amax", None)
    amax = None
    for b in batches:
        _, updates = apply(variables if amax is None else {**variables, "quant_amax": amax}, b)
        amax = updates["quant_amax"]
    if amax is None:
        raise ValueError("calibrate_linen_activations: no batch produced activation statistics")
    stats = traverse_util.flatten_dict(dict(variables.get("quant_stats", {})))
    for path, value in traverse_util.flatten_dict(dict(amax)).items():
        stats[path[:-1] + ("act_scale",)] = jnp.maximum(value * np.float32(1.0 / 127), np.float32(2.0**-126))
    variables["quant_stats"] = traverse_util.unflatten_dict(stats)
    return variables
