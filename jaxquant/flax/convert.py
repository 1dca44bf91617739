"""Conversion to serving models: linear layers holding ``QuantizedWeight`` s, calling
``jaxquant.quantized_linear`` (W8A8) or ``jaxquant.weight_only_linear`` (W8A16 / W4A16).

* ``QuantizedLinear(in, out, *, config, rngs)`` — the serving layer. Usable as MiniLM's
  ``linear_factory`` (``functools.partial(QuantizedLinear, config=W8A8)``): its
  ``load_dense_weights(weight[out, in], bias)`` quantizes at load (``config.calibration`` picks
  the scales: absmax = ``jaxquant.quantize_weight``). State: ``codes`` (int8 ``[out, in]``, or
  ``[out, in // 2]`` packed int4), ``w_scale``, ``w_zero_point`` (asymmetric), ``bias``,
  ``act_scale`` (static activations) — ordinary arrays, so the model state is a plain pytree.
* ``convert(model, config, calibration=None)`` — replaces, in place, every ``nnx.Linear``
  (quantized with ``config``) and every ``QATLinear`` (with its own config, learned scales and
  calibrated activation scale) by a ``QuantizedLinear``; returns the model. With
  ``calibration=GPTQ(run, batches)`` (``jaxquant.flax.gptq``) the ``nnx.Linear`` weights are rounded
  by GPTQ on the layers' calibration inputs (same scales, different codes) and static activation
  scales are set from the observed ``max |x|``.
* ``save_checkpoint`` / ``restore_checkpoint`` (orbax when installed, else ``.npz``) and
  ``linear_weight_bytes``.
* linen: ``QuantizedDense`` (the serving layer) and ``linen_serving_variables(variables, config)``
  (QAT ``QATDense`` or float ``nn.Dense`` variables -> serving variables; same equivalence).

Equivalence with QAT (the bound ``tests/test_convert.py`` checks). The QAT layer computes
``y_qat = fl(x_hat @ W_hat^T) + b`` with ``x_hat = q_x * s_x`` and ``W_hat = q_w * s_w`` (float32
products of the same integer codes: the serving layer holds exactly the codes and scales the QAT
layer simulated). Weight-only serving computes ``fl(x @ W_hat^T)`` with the same ``W_hat``: only
the summation order of the matmul differs. W8A8 serving computes the integer dot exactly and
scales once: ``y = (f32(sum_k q_x q_w) * s_x) * s_w + b``. Both are within the float32 error of a
length-K dot product::

    |y_serving - y_qat| <= (K + 2) * u * sum_k |x_hat_k| |W_hat_nk| + u * |y| (+ u |b|),   u = 2**-24

(each of the K products and K-1 additions of the QAT dot rounds once; the serving epilogue
rounds twice).
"""

from __future__ import annotations

import functools
import math
import os
import pathlib

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

import jaxquant as jq
from jaxquant.core import weights as W
from jaxquant.flax import calibrate as C
from jaxquant.flax.config import QuantConfig
from jaxquant.flax.gptq import GPTQ, gptq_calibrate
from jaxquant.flax.qat import QATLinear, QuantStat

_TINY = np.float32(2.0**-126)

__all__ = ["QuantizedLinear", "quantize_weight_with", "convert", "linear_weight_bytes", "save_checkpoint",
           "restore_checkpoint", "serving_factory", "QuantizedDense", "linen_serving_variables"]


def quantize_weight_with(w, scale, zero_point, config: QuantConfig) -> W.QuantizedWeight:
    """``QuantizedWeight`` of ``w [N, K]`` with given parameters (``scale`` ``[N]`` or ``[N, K // g]``;
    ``zero_point`` int32 or None). With absmax parameters this is ``jaxquant.quantize_weight``."""
    qmin, qmax = config.weight_range
    gran = jq.PerChannel(0) if config.group_size is None else jq.PerGroup(config.group_size)
    zp = None if config.weight_symmetric else jnp.asarray(zero_point, jnp.int32)
    scale = jnp.asarray(scale, jnp.float32)
    codes = jq.quantize(jnp.asarray(w, jnp.float32), scale, zp, granularity=gran, qmin=qmin, qmax=qmax,
                        dtype=jnp.int8)
    if config.weight_bits == 4:
        codes = W.pack_int4(codes)
    qw = W.QuantizedWeight(codes, scale, zp, bits=config.weight_bits, group_size=config.group_size,
                           symmetric=config.weight_symmetric, shape=w.shape)
    return W.check_quantized_weight("qweight", qw)


class QuantizedLinear(nnx.Module):
    """Serving linear layer (module docstring): ``y = x @ W^T + b`` with a quantized ``W [out, in]``."""

    def __init__(self, in_features: int, out_features: int, *, config: QuantConfig, use_bias: bool = True,
                 rngs: nnx.Rngs | None = None, **_ignored):
        del rngs
        if config.serving_kind == "fake":
            raise ValueError(f"QuantizedLinear: no integer kernel serves {config} (W8A8 needs 8-bit symmetric "
                             "per-channel weights; weight-only serving needs activations=None)")
        config.check_features(in_features)
        self.in_features, self.out_features, self.config = in_features, out_features, config
        n, k = out_features, in_features
        ck = k // 2 if config.weight_bits == 4 else k
        pshape = (n,) if config.group_size is None else (n, k // config.group_size)
        self.codes = nnx.Variable(jnp.zeros((n, ck), jnp.int8))
        self.w_scale = nnx.Variable(jnp.ones(pshape, jnp.float32))
        self.w_zero_point = None if config.weight_symmetric else nnx.Variable(jnp.zeros(pshape, jnp.int32))
        self.bias = nnx.Variable(jnp.zeros((n,), jnp.float32)) if use_bias else None
        self.act_scale = QuantStat(jnp.ones((), jnp.float32)) if config.activations == "static" else None

    # -- loading ------------------------------------------------------------------------------
    def set_qweight(self, qw: W.QuantizedWeight, bias=None):
        W.check_quantized_weight("qweight", qw, k=self.in_features)
        self.codes.set_value(qw.codes)
        self.w_scale.set_value(qw.scale)
        if self.w_zero_point is not None:
            self.w_zero_point.set_value(qw.zero_point)
        if self.bias is not None and bias is not None:
            self.bias.set_value(jnp.asarray(bias, jnp.float32))

    def load_dense_weights(self, weight, bias):
        """Quantize a torch-layout float ``weight [out, in]`` at load (MiniLM's ``linear_factory`` hook)."""
        w = jnp.asarray(np.asarray(weight, np.float32))
        if w.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight: expected shape {(self.out_features, self.in_features)}, got {w.shape}")
        c = self.config
        s, z = C.weight_qparams(w, bits=c.weight_bits, group_size=c.group_size, symmetric=c.weight_symmetric,
                                method=c.calibration, percentile=c.percentile)
        self.set_qweight(quantize_weight_with(w, s, z, c), bias)

    # -- forward ------------------------------------------------------------------------------
    @property
    def qweight(self) -> W.QuantizedWeight:
        c = self.config
        return W.QuantizedWeight(self.codes[...], self.w_scale[...],
                                 None if self.w_zero_point is None else self.w_zero_point[...],
                                 bits=c.weight_bits, group_size=c.group_size, symmetric=c.weight_symmetric,
                                 shape=(self.out_features, self.in_features))

    def __call__(self, x):
        bias = None if self.bias is None else self.bias[...]
        if self.config.serving_kind == "w8a8":
            act = self.act_scale[...] if self.act_scale is not None else None
            return jq.quantized_linear(x, self.qweight, bias, act_scale=act)
        return jq.weight_only_linear(x, self.qweight, bias)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + (0 if self.bias is None else int(self.bias.get_value().nbytes))


def serving_factory(config: QuantConfig):
    """``linear_factory`` for models built layer by layer (e.g. ``load_minilm(linear_factory=...)``)."""
    return functools.partial(QuantizedLinear, config=config)


def _from_layer(layer, config):
    if isinstance(layer, QATLinear):
        c = layer.config
        w = layer.weight()
        s, z = layer.weight_qparams()
        new = QuantizedLinear(layer.in_features, layer.out_features, config=c, use_bias=layer.bias is not None)
        new.set_qweight(quantize_weight_with(w, s, z, c), None if layer.bias is None else layer.bias[...])
        if c.activations == "static":
            new.act_scale.set_value(layer.act_scale[...])
        return new
    kernel = layer.kernel[...]
    k, n = kernel.shape
    new = QuantizedLinear(k, n, config=config, use_bias=layer.bias is not None)
    new.load_dense_weights(np.asarray(kernel, np.float32).T,
                           None if layer.bias is None else np.asarray(layer.bias[...], np.float32))
    return new


def convert(model: nnx.Module, config: QuantConfig | None = None, *, calibration=None) -> nnx.Module:
    """Replace (in place) the model's ``nnx.Linear`` layers (quantized with ``config``; skipped when
    it is None) and ``QATLinear`` layers (their own config and scales) by ``QuantizedLinear``.

    ``calibration``: None (plain round-to-nearest with ``config.calibration``'s scales) or
    ``jaxquant.flax.GPTQ(run, batches, ...)``: the ``nnx.Linear`` layers' inputs are observed on the
    calibration batches and their weights rounded by GPTQ (``jaxquant.flax.gptq``); with
    ``activations="static"`` their activation scale is ``max(amax * f32(1/127), 2**-126)`` of the
    observed inputs. ``QATLinear`` layers are always converted with their own (trained) quantizer.

    Raises ``ValueError`` for ``activations="static"`` on float layers without calibration data
    (there is no activation scale to serve with).
    """
    targets = []
    for path, node in nnx.iter_graph(model):
        if not path:
            continue
        if isinstance(node, QATLinear) or (isinstance(node, nnx.Linear) and config is not None):
            targets.append((path, node))
    float_paths = [p for p, n in targets if not isinstance(n, QATLinear)]
    if float_paths and config.serving_kind == "fake":
        raise ValueError(f"convert: no integer kernel serves {config} (W8A8 needs 8-bit symmetric per-channel "
                         "weights; weight-only serving needs activations=None)")
    calibrated = {}
    if calibration is not None:
        if not isinstance(calibration, GPTQ):
            raise TypeError(f"calibration: expected None or jaxquant.flax.GPTQ, got {type(calibration).__name__}")
        if config is None:
            raise ValueError("calibration needs a config for the float nnx.Linear layers")
        if float_paths:
            calibrated = gptq_calibrate(model, config, calibration, float_paths)
    elif float_paths and config.activations == "static":
        raise ValueError("activations='static' on float nnx.Linear layers needs calibration data: pass "
                         "calibration=GPTQ(run, batches), or use QATLinear + calibrate_activations")
    for path, node in targets:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if path in calibrated:
            qw, stats = calibrated[path]
            k, n = node.kernel.get_value().shape
            new = QuantizedLinear(k, n, config=config, use_bias=node.bias is not None)
            new.set_qweight(qw, None if node.bias is None else node.bias[...])
            if config.activations == "static":
                new.act_scale.set_value(jnp.maximum(stats.amax * np.float32(1.0 / 127), _TINY))
        else:
            new = _from_layer(node, config)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return model


def linear_weight_bytes(model: nnx.Module) -> int:
    """Bytes of the linear layers' weights + biases (codes + scales + zero points when quantized)."""
    total = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, QuantizedLinear):
            total += node.nbytes
        elif isinstance(node, (nnx.Linear, QATLinear)):
            total += int(node.kernel.get_value().nbytes) + (0 if node.bias is None else int(node.bias.get_value().nbytes))
    return total


# ------------------------------------------------------------------------------------------
# linen serving: QuantizedDense + linen_serving_variables
# ------------------------------------------------------------------------------------------
from flax import linen as nn  # noqa: E402


class QuantizedDense(nn.Module):
    """linen serving layer: ``y = x @ W^T + b`` with a quantized ``W [features, in]``, calling
    ``jaxquant.quantized_linear`` (W8A8) or ``jaxquant.weight_only_linear`` (W8A16 / W4A16).

    The linen counterpart of ``QuantizedLinear``: build the model with ``QuantizedDense`` where the
    QAT model had ``QATDense`` (e.g. a ``dense`` class attribute) and serve the variables made by
    ``linen_serving_variables``. Collections: ``quantized`` (``codes`` int8 ``[features, in]`` or
    packed ``[features, in // 2]``, ``w_scale``, ``w_zero_point`` when asymmetric), ``params``
    (``bias``), ``quant_stats`` (``act_scale``, static activations).
    """

    features: int
    config: QuantConfig = QuantConfig()
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.config
        if c.serving_kind == "fake":
            raise ValueError(f"QuantizedDense: no integer kernel serves {c}")
        k, n = x.shape[-1], self.features
        c.check_features(k)
        ck = k // 2 if c.weight_bits == 4 else k
        pshape = (n,) if c.group_size is None else (n, k // c.group_size)
        codes = self.variable("quantized", "codes", jnp.zeros, (n, ck), jnp.int8).value
        scale = self.variable("quantized", "w_scale", jnp.ones, pshape, jnp.float32).value
        zp = None if c.weight_symmetric else self.variable("quantized", "w_zero_point", jnp.zeros, pshape,
                                                           jnp.int32).value
        bias = self.param("bias", nn.initializers.zeros_init(), (n,), jnp.float32) if self.use_bias else None
        qw = W.QuantizedWeight(codes, scale, zp, bits=c.weight_bits, group_size=c.group_size,
                               symmetric=c.weight_symmetric, shape=(n, k))
        if c.serving_kind == "w8a8":
            act = None
            if c.activations == "static":
                act = self.variable("quant_stats", "act_scale", jnp.ones, (), jnp.float32).value
            return jq.quantized_linear(x, qw, bias, act_scale=act)
        return jq.weight_only_linear(x, qw, bias)


def linen_serving_variables(variables, config: QuantConfig, *, qat: bool = True):
    """Variables for a ``QuantizedDense`` model from those of the QAT (``QATDense``) or float
    (``nn.Dense``) model: every ``params`` dict holding a 2-d ``kernel`` is one dense layer.

    ``qat=True``: the weights are quantized exactly as the ``QATDense`` forward with ``config``
    fake-quantizes them (learned ``w_scale`` / ``w_zero_point`` — zero point rounded and clamped to
    the code range — or absmax), and ``quant_stats`` (calibrated ``act_scale``) is kept.
    ``qat=False``: float ``nn.Dense`` params, scales by ``config.calibration``; a static-activation
    config then has no activation scale, which is an error.
    """
    from flax import traverse_util

    if not qat and config.activations == "static":
        raise ValueError("activations='static' from float nn.Dense params has no calibrated act_scale: "
                         "train/calibrate a QATDense model (calibrate_linen_activations) and pass qat=True")
    flat = traverse_util.flatten_dict(dict(variables["params"]))
    layers = {path[:-1] for path in flat if path[-1] == "kernel" and getattr(flat[path], "ndim", 0) == 2}
    params, quantized = {}, {}
    for path, value in flat.items():
        if path[:-1] not in layers:
            params[path] = value
    for layer in layers:
        w = jnp.asarray(flat[layer + ("kernel",)], jnp.float32).T
        if qat and config.learnable_scales:
            s = flat[layer + ("w_scale",)]
            z = None
            if not config.weight_symmetric:
                qmin, qmax = config.weight_range
                z = jnp.clip(jnp.round(flat[layer + ("w_zero_point",)]), qmin, qmax).astype(jnp.int32)
        else:
            s, z = C.weight_qparams(w, bits=config.weight_bits, group_size=config.group_size,
                                    symmetric=config.weight_symmetric,
                                    method="absmax" if qat else config.calibration, percentile=config.percentile)
        qw = quantize_weight_with(w, s, z, config)
        quantized[layer + ("codes",)] = qw.codes
        quantized[layer + ("w_scale",)] = qw.scale
        if not config.weight_symmetric:
            quantized[layer + ("w_zero_point",)] = qw.zero_point
        if layer + ("bias",) in flat:
            params[layer + ("bias",)] = jnp.asarray(flat[layer + ("bias",)], jnp.float32)
    out = {"params": traverse_util.unflatten_dict(params), "quantized": traverse_util.unflatten_dict(quantized)}
    if qat and config.activations == "static":
        out["quant_stats"] = variables["quant_stats"]
    return out


# ------------------------------------------------------------------------------------------
# Checkpoints: the nnx state is a pytree of plain arrays
# ------------------------------------------------------------------------------------------
def _have_orbax():
    try:
        import orbax.checkpoint  # noqa: F401
        return True
    except Exception:  # pragma: no cover
        return False


def save_checkpoint(path, model: nnx.Module, *, backend: str | None = None) -> str:
    """Save ``nnx.state(model)``. ``backend``: ``"orbax"`` (default when installed) or ``"numpy"``
    (one ``.npz`` keyed by the state paths). Returns the backend used."""
    backend = backend or ("orbax" if _have_orbax() else "numpy")
    state = nnx.state(model)
    path = pathlib.Path(path).absolute()
    if backend == "orbax":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, state)
        return backend
    if backend != "numpy":
        raise ValueError(f"backend: expected 'orbax' or 'numpy', got {backend!r}")
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})
    return backend


def restore_checkpoint(path, model: nnx.Module, *, backend: str | None = None) -> nnx.Module:
    """Restore the state saved by ``save_checkpoint`` into ``model`` (same structure), in place."""
    backend = backend or ("orbax" if _have_orbax() else "numpy")
    state = nnx.state(model)
    path = pathlib.Path(path).absolute()
    if backend == "orbax":
        import orbax.checkpoint as ocp

        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(path, abstract)
        nnx.update(model, restored)
        return model
    pure = nnx.to_pure_dict(state)
    p = path if str(path).endswith(".npz") else pathlib.Path(str(path) + ".npz")
    with np.load(p) as data:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
        new = []
        for k, v in leaves:
            a = data[jax.tree_util.keystr(k)]
            if a.shape != tuple(v.shape) or a.dtype != np.dtype(v.dtype):
                raise ValueError(f"checkpoint {p}: {jax.tree_util.keystr(k)} is {a.dtype}{list(a.shape)}, the model "
                                 f"expects {np.dtype(v.dtype)}{list(v.shape)}")
            new.append(jnp.asarray(a))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new))
    nnx.update(model, state)
    return model
