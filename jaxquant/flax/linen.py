"""linen: quantize an unmodified ``flax.linen`` model by the same rules, through method interception.

::

    qat = quantize(model, [Rule(".*", W8A8)], mode="qat")       # a LinenQuantized; model's code untouched
    v_qat = quantize_variables(qat, float_variables, x)          # + learnable scales / act scales
    ... train with qat.apply(v_qat, x) ...
    served = quantize(qat)                                       # serve what QAT simulated
    v_srv = quantize_variables(served, v_qat, x)                 # float / QAT variables -> serving variables
    y = jax.jit(served.apply)(v_srv, x)

``LinenQuantized.init`` / ``apply`` run the module under ``flax.linen.intercept_methods``: every
``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` call (automatic names included) is looked up
by its scope path (``"Dense_0"``, ``"Block_1/Dense_0"``) in the rules and computed by the library's
QAT or serving math (``jaxquant.flax.layers``) instead of Flax's. Variables, per quantized layer:

=========================  =========================================================================
mode                       collections
=========================  =========================================================================
``"qat"``                  ``params``: the float ``kernel`` and ``bias`` (unchanged names and shapes:
                           float variables load as they are), ``w_scale`` (+ float ``w_zero_point``)
                           with ``learnable_scales``; ``quant_stats``: ``act_scale`` (static)
``"serve"``                ``quantized``: ``codes``, ``w_scale`` (+ ``w_zero_point``); ``params``:
                           ``bias``; ``quant_stats``: ``act_scale`` (static). No float kernel.
=========================  =========================================================================

``quantize_variables(qmodel, variables, *args)`` builds these from float variables (and, for a
model served from QAT, from the QAT variables: learned scales, calibrated activation scales), by
tracing ``qmodel.module`` on ``args`` (arrays or ``jax.ShapeDtypeStruct``: only shapes are used)
to find the layers. ``calibration=Calibration(run, batches)`` sets static activation scales (and
``GPTQ(run, batches)`` rounds weights by GPTQ), where ``run(apply, batch)`` calls ``apply(*inputs)``
(the float model's forward on one batch).

Sharding: a kernel boxed by ``nn.with_partitioning`` / ``nn.with_logical_partitioning`` gives
its box (same type, mesh and rules) to the new variables, with its axis names mapped onto
``W [N, K]`` (``jaxquant.flax.sharding``): ``nn.get_partition_spec`` / ``nn.logical_to_mesh_sharding``
work on the converted variables as on the float ones.

Errors name the layer: applying a serving model to float variables, a QAT model with learnable
scales to variables without them, or a config that cannot serve a layer (``strict=True``; else
the layer stays float with one warning).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import dtypes as linen_dtypes
from flax import traverse_util
from flax.core import meta as flax_meta

from jaxquant.flax import geometry as G
from jaxquant.flax import layers as L
from jaxquant.flax.config import QuantConfig
from jaxquant.flax.gptq import GPTQ, gptq_quantize_weight
from jaxquant.flax.observe import _MASK, Calibration, path_str
from jaxquant.flax.rules import QuantizationWarning, Rule, match
from jaxquant.flax import sharding as S

__all__ = ["LinenQuantized", "quantize_linen", "quantize_variables", "LinenLayer", "linen_layers"]

_KINDS = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _geometry(module, args, kwargs) -> G.Geometry:
    """The geometry of a linen layer called on ``args[0]`` (raises ``UnsupportedLayer``)."""
    x = args[0]
    custom = [name for name, default in (("dot_general", (None,)), ("dot_general_cls", (None,)),
                                         ("preferred_element_type", (None,)),
                                         ("promote_dtype", (None, linen_dtypes.promote_dtype)))
              if getattr(module, name, None) not in default]
    if custom:
        raise G.UnsupportedLayer(f"the layer sets {', '.join(custom)}, which the quantized layers do not reproduce")
    if type(module) is nn.Dense:
        return G.linear("Dense", (x.shape[-1], module.features), (module.features,) if module.use_bias else None)
    if type(module) is nn.DenseGeneral:
        features, axis = _tuple(module.features), _tuple(module.axis)
        kshape = tuple(x.shape[a] for a in axis) + features
        return G.general("DenseGeneral", kshape, axis, len(_tuple(module.batch_dims)),
                         features if module.use_bias else None)
    spec = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
    spec = spec.replace(" ", "")
    g = G.einsum("Einsum", spec, tuple(module.shape))
    _, rhs, out = G._split(spec)
    bshape = tuple(module.shape[rhs.index(c)] for c in out if c in rhs) if module.use_bias else None
    return dataclasses.replace(g, bias_shape=bshape)


@dataclasses.dataclass(frozen=True)
class LinenLayer:
    """One quantizable linen layer found by tracing: path, geometry, kernel dtype and decision."""

    path: tuple[str, ...]
    kind: str
    geometry: G.Geometry | None
    kernel_dtype: object
    action: str                       # "float", "qat" or "serve"
    config: QuantConfig | None        # None: stays float
    from_qat: bool                    # from QAT variables (config recorded at QAT time)
    reason: str                       # why float ("" when quantized)


@dataclasses.dataclass(frozen=True, eq=False)
class LinenQuantized:
    """A linen module run with its ``Dense`` / ``DenseGeneral`` / ``Einsum`` layers quantized by
    ``rules`` (module docstring). ``qat_rules``: the rules of the QAT model it serves, if any."""

    module: nn.Module
    rules: tuple[Rule, ...] | None
    mode: str = "serve"
    strict: bool = False
    qat_rules: tuple[Rule, ...] | None = None
    _warned: set = dataclasses.field(default_factory=set, repr=False)

    # -- decisions -----------------------------------------------------------------------------
    def decide(self, path: str, module, geometry: G.Geometry | None, unsupported: str | None):
        """``(action, config, from_qat, reason)`` for one layer: ``action`` is ``"float"``, ``"qat"`` or
        ``"serve"``; warns (or raises with ``strict``) once per path."""
        from_qat = False
        matched, config = match(self.rules, path, module) if self.rules is not None else (False, None)
        if self.qat_rules is not None:
            q_matched, q_config = match(self.qat_rules, path, module)
            if q_config is not None and (geometry is None or not q_config.problem(geometry.k, n=geometry.n,
                                                                                   serve=False)):
                if matched and config != q_config:
                    self._warn(path, f"quantize: layer {path!r} was trained with QAT as {q_config}; the rules ask "
                                     f"for {config or 'float'}: serving {q_config}")
                config, from_qat, matched = q_config, True, True
        if config is None:
            return "float", None, False, ("a rule keeps it float" if matched else "no rule matched")
        why = unsupported or config.problem(geometry.k, n=geometry.n, serve=self.mode == "serve")
        if why and from_qat and not unsupported and not config.problem(geometry.k, n=geometry.n, serve=False):
            # trained with a config no integer kernel serves (e.g. W4A8): keep simulating it
            self._warn(path, f"quantize: layer {path!r} stays a QAT layer (simulated): {config} cannot be served: "
                             f"{why}")
            return "qat", config, True, f"{config}: {why}"
        if why:
            msg = f"quantize: layer {path!r} stays float: {config} cannot quantize it: {why}"
            if self.strict:
                raise ValueError(msg.replace("stays float", "cannot be quantized (strict=True)"))
            self._warn(path, msg)
            return "float", None, False, f"{config}: {why}"
        return self.mode, config, from_qat, ""

    def _warn(self, path, msg):
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(msg, QuantizationWarning, stacklevel=4)

    # -- running -------------------------------------------------------------------------------
    def _interceptor(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or type(module) not in _KINDS:
            return next_fun(*args, **kwargs)
        path = path_str(module.scope.path)
        try:
            geometry, unsupported = _geometry(module, args, kwargs), None
        except G.UnsupportedLayer as e:
            geometry, unsupported = None, f"{type(module).__name__}: {e}"
        action, config, _, _ = self.decide(path, module, geometry, unsupported)
        if action == "float":
            return next_fun(*args, **kwargs)
        if action == "qat":
            return _qat_forward(module, path, geometry, config, next_fun, args, kwargs)
        return _serve_forward(module, path, geometry, config, args[0])

    def init(self, rngs, *args, **kwargs):
        """``module.init`` with the quantized layers' variables (random; see ``quantize_variables``)."""
        with nn.intercept_methods(self._interceptor):
            return self.module.init(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        """``module.apply`` with the layers quantized (jit it as usual)."""
        with nn.intercept_methods(self._interceptor):
            return self.module.apply(variables, *args, **kwargs)


def quantize_linen(model, rules, *, mode="serve", strict=False) -> LinenQuantized:
    """``jaxquant.flax.quantize`` for linen (``rules`` already normalised by ``rules.as_rules``)."""
    if isinstance(model, LinenQuantized):
        if model.mode != "qat":
            raise ValueError("quantize: this linen model is already served; quantize its float module instead")
        if mode == "qat":
            raise ValueError("quantize(mode='qat'): the model is already a QAT model")
        return LinenQuantized(model.module, rules, mode, strict, qat_rules=model.rules)
    if rules is None:
        raise ValueError("quantize(model) without rules serves a QAT model; for a float linen model pass rules, "
                         "e.g. quantize(model, W8A8)")
    return LinenQuantized(model, rules, mode, strict)


# ------------------------------------------------------------------------------------------
# forwards
# ------------------------------------------------------------------------------------------
def _missing(path, what, collection):
    return ValueError(f"layer {path!r}: the variables have no {collection}/{path}/{what}: convert the float (or QAT) "
                      "variables with jaxquant.flax.quantize_variables(qmodel, variables, *inputs)")


def _stat(module, path, name, shape):
    if not module.is_initializing() and not module.has_variable("quant_stats", name):
        raise _missing(path, name, "quant_stats")
    return module.variable("quant_stats", name, lambda: jnp.ones(shape, jnp.float32)).value


def _qat_forward(module, path, geometry, config, next_fun, args, kwargs):
    # Let Flax create / fetch the float params exactly as the layer does (its initialisers, names
    # and shapes); the float result is unused and removed by XLA under jit.
    next_fun(*args, **kwargs)
    # scope.get_variable returns partitioning boxes (nn.with_partitioning) as they are stored
    kernel = flax_meta.unbox(module.scope.get_variable("params", "kernel"))
    bias = flax_meta.unbox(module.scope.get_variable("params", "bias")) if geometry.bias_shape is not None else None
    x = args[0]
    dtype = L.compute_dtype(x, module.dtype, kernel.dtype)
    w = geometry.weight(kernel)
    flat = bias if geometry.flat_bias else None
    if config.is_fp8:       # fp8 training: fp8_linear on the float weight
        y = geometry.apply(x.astype(dtype), lambda x2: L.fp8_train_matmul(x2, w, flat, config), bias)
        return y.astype(dtype)
    if config.learnable_scales:
        for name in ("w_scale",) + (() if config.weight_symmetric else ("w_zero_point",)):
            if not module.is_initializing() and not module.has_variable("params", name):
                raise _missing(path, name, "params")
        init = lambda i: (lambda _rng: _learnable_init(w, config)[i])
        s = module.param("w_scale", init(0))
        z = None if config.weight_symmetric else module.param("w_zero_point", init(1))
        w_hat = L.fake_quantize_weight(w, config, s, z, learnable=True)
    else:
        w_hat = L.fake_quantize_weight(w, config)
    act = _stat(module, path, "act_scale", ()) if config.activations == "static" else None
    y = geometry.apply(x.astype(dtype), lambda x2: L.qat_matmul(x2, w_hat, flat, config, act, module.precision),
                       bias)
    return y.astype(dtype)


def _learnable_init(w, config):
    s, z = L.weight_params(jax.lax.stop_gradient(w), config)
    return s, (None if z is None else z.astype(jnp.float32))


def _serve_forward(module, path, geometry, config, x):
    n, k = geometry.n, geometry.k
    if not module.is_initializing() and not module.has_variable("quantized", "codes"):
        raise _missing(path, "codes", "quantized")
    cshape, cdtype = L.codes_spec(config, n, k)
    pshape = L.param_shape(config, n, k)
    codes = module.variable("quantized", "codes", lambda: jnp.zeros(cshape, cdtype)).value
    scale = module.variable("quantized", "w_scale", lambda: jnp.ones(pshape, jnp.float32)).value
    zp = None
    if not config.weight_symmetric:
        zp = module.variable("quantized", "w_zero_point", lambda: jnp.zeros(pshape, jnp.int32)).value
    bias = None
    if geometry.bias_shape is not None:
        bias = module.param("bias", module.bias_init, geometry.bias_shape, module.param_dtype)
    act = _stat(module, path, "act_scale", ()) if config.activations == "static" else None
    qw = L.qweight_of(codes, scale, zp, config, (n, k))
    dtype = L.compute_dtype(x, module.dtype, module.param_dtype)
    flat = bias if geometry.flat_bias else None
    y = geometry.apply(x.astype(dtype), lambda x2: L.serve_matmul(x2, qw, flat, config, act), bias)
    return y.astype(dtype)


# ------------------------------------------------------------------------------------------
# variables
# ------------------------------------------------------------------------------------------
def linen_layers(qmodel: LinenQuantized, variables, *args, **kwargs) -> list[LinenLayer]:
    """The quantizable layers of ``qmodel.module`` (traced abstractly on ``args`` with the float
    ``params`` of ``variables``) and what ``qmodel`` does with each."""
    found: list[LinenLayer] = []
    seen = set()
    # Serving variables (no float kernels) are traced through qmodel's own layers; float or QAT
    # variables through the float module.
    served = "quantized" in variables
    inner = qmodel._interceptor if served else (lambda next_fun, a, kw, context: next_fun(*a, **kw))

    def record(next_fun, a, kw, context):
        module = context.module
        if context.method_name == "__call__" and type(module) in _KINDS:
            path = tuple(module.scope.path)
            if path not in seen:
                seen.add(path)
                try:
                    geometry, unsupported = _geometry(module, a, kw), None
                except G.UnsupportedLayer as e:
                    geometry, unsupported = None, f"{type(module).__name__}: {e}"
                action, config, from_qat, reason = qmodel.decide(path_str(path), module, geometry, unsupported)
                found.append(LinenLayer(path, type(module).__name__, geometry, jnp.dtype(module.param_dtype), action,
                                        config, from_qat, reason))
        return inner(next_fun, a, kw, context)

    if not served:
        variables = {c: v for c, v in variables.items() if c != "quant_stats"}

    def run(v, *a):
        with nn.intercept_methods(record):
            return qmodel.module.apply(v, *a, **kwargs)

    jax.eval_shape(run, variables, *args)
    return found


def _collect_stats(qmodel, variables, calibration: Calibration, layers) -> dict:
    """``{path: (xtx, amax, rows)}`` of the float inputs of ``layers`` over the calibration batches."""
    wanted = {l.path: l.geometry for l in layers}
    params_only = {c: v for c, v in variables.items() if c not in ("quantized", "quant_stats")}

    def observe(next_fun, a, kw, context):
        module = context.module
        path = tuple(module.scope.path) if context.method_name == "__call__" else None
        if path in wanted and type(module) in _KINDS:
            g = wanted[path]
            x2, free = g.rows(jax.lax.stop_gradient(a[0]))
            x2 = x2.astype(jnp.float32)
            mask = _MASK[0]
            keep = jnp.ones((x2.shape[0],), bool) if mask is None else jnp.reshape(jnp.asarray(mask) != 0, (-1,))
            if mask is not None and tuple(jnp.shape(mask)) != tuple(free):
                raise ValueError(f"calibration_mask: mask of shape {tuple(jnp.shape(mask))} does not match the rows "
                                 f"{tuple(free)} of layer {path_str(path)!r}")
            x2 = jnp.where(keep[:, None], x2, 0.0)
            col = "jaxquant_calibration"
            xtx = module.variable(col, "xtx", lambda: jnp.zeros((g.k, g.k), jnp.float32))
            amax = module.variable(col, "amax", lambda: jnp.zeros((), jnp.float32))
            rows = module.variable(col, "rows", lambda: jnp.zeros((), jnp.int32))
            xtx.value = xtx.value + jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
            amax.value = jnp.maximum(amax.value, jnp.max(jnp.abs(x2)))
            rows.value = rows.value + jnp.sum(keep, dtype=jnp.int32)
        return next_fun(*a, **kw)

    def step(state, batch):
        holder = [state]

        def apply(*a, **kw):
            with nn.intercept_methods(observe):
                y, upd = qmodel.module.apply({**params_only, **holder[0]}, *a, mutable=["jaxquant_calibration"], **kw)
            holder[0] = dict(upd)
            return y

        calibration.run(apply, batch)
        return holder[0]

    step = jax.jit(step) if calibration.jit else step
    state = {}
    for b in calibration.batches:
        state = step(state, b)
    flat = traverse_util.flatten_dict(dict(state.get("jaxquant_calibration", {})))
    out = {}
    for l in layers:
        if l.path + ("rows",) not in flat or int(flat[l.path + ("rows",)]) == 0:
            raise ValueError(f"calibration: layer {path_str(l.path)!r} was not called by run() on the calibration "
                             "batches")
        rows = int(flat[l.path + ("rows",)])
        out[l.path] = (flat[l.path + ("xtx",)] / np.float32(rows), flat[l.path + ("amax",)], rows)
    return out


def quantize_variables(qmodel: LinenQuantized, variables, *args, calibration: Calibration | None = None, **kwargs):
    """Variables for ``qmodel`` (QAT or serving) from the float variables of ``qmodel.module``, or,
    for a model served from QAT (``quantize(qat_model)``), from the QAT variables.

    ``args`` / ``kwargs``: example inputs of ``qmodel.module`` (arrays or ``jax.ShapeDtypeStruct``),
    used only to find the layers. ``calibration``: ``Calibration(run, batches)`` or ``GPTQ(...)``
    (non-sequential), with ``run(apply, batch)`` calling ``apply(*inputs)``. Works on abstract
    variables (``ShapeDtypeStruct`` leaves) when no calibration is needed.
    """
    if not isinstance(qmodel, LinenQuantized):
        raise TypeError(f"qmodel: expected the result of jaxquant.flax.quantize(linen_model, ...), got "
                        f"{type(qmodel).__name__}")
    if isinstance(calibration, GPTQ) and (calibration.sequential or qmodel.mode == "qat"):
        raise ValueError("linen GPTQ: only non-sequential GPTQ for serving is supported")
    if "quantized" in variables:
        raise ValueError("quantize_variables: these are serving variables already; pass the float or QAT "
                         "model's variables")
    # layers served from QAT that stay QAT layers keep their QAT variables as they are
    layers = [l for l in linen_layers(qmodel, variables, *args, **kwargs)
              if l.action == qmodel.mode and l.config is not None]
    needs = [l for l in layers if not l.from_qat and (l.config.activations == "static" or _gptq(calibration, l))]
    stats = {}
    if needs:
        if calibration is None:
            names = ", ".join(repr(path_str(l.path)) for l in needs[:4])
            raise ValueError(f"activations='static' needs calibration data for {names}: pass "
                             "calibration=jaxquant.flax.Calibration(run, batches)")
        stats = _collect_stats(qmodel, variables, calibration, needs)
    flat = {c: traverse_util.flatten_dict(dict(v)) for c, v in variables.items()}
    out = {c: dict(v) for c, v in flat.items()}
    for c in ("params", "quantized", "quant_stats"):
        out.setdefault(c, {})
    for l in layers:
        _convert_layer(qmodel.mode, l, flat, out, stats.get(l.path), calibration)
    return {c: traverse_util.unflatten_dict(v) for c, v in out.items() if v}


def _gptq(calibration, l: LinenLayer) -> bool:
    """Whether GPTQ rounds this layer's weight (integer codes; fp8 layers are rounded to nearest)."""
    return isinstance(calibration, GPTQ) and not l.config.is_fp8


def _convert_layer(mode, l: LinenLayer, flat, out, stats, calibration):
    p, c, g = l.path, l.config, l.geometry
    name = path_str(p)

    def need(collection, var):
        key = p + (var,)
        if key not in flat.get(collection, {}):
            raise ValueError(f"layer {name!r} ({c}{', trained with QAT' if l.from_qat else ''}): the variables have "
                             f"no {collection}/{name}/{var}" + (": pass the QAT model's variables" if l.from_qat
                                                                else ""))
        return flat[collection][key]

    kernel_box = need("params", "kernel")
    kernel = flax_meta.unbox(kernel_box)
    n_ax = k_ax = None
    if isinstance(kernel_box, flax_meta.Partitioned):
        logical = isinstance(kernel_box, nn.LogicallyPartitioned)
        rules = (getattr(kernel_box, "rules", None) or nn.get_logical_axis_rules()) if logical else None
        n_ax, k_ax = S.weight_axes(g, kernel_box.names, name, rules, unmapped_replicated=True)
    box = lambda v, axes: S.linen_box(v, kernel_box, axes(c, n_ax, k_ax))
    act = None
    if c.activations == "static":
        act = need("quant_stats", "act_scale") if l.from_qat else L.act_scale_from_amax(stats[1])
    if mode == "qat":
        if c.learnable_scales:
            s, z = L.maybe_abstract(lambda k: _learnable_init(g.weight(k), c), kernel)
            out["params"][p + ("w_scale",)] = box(s, S.qparam_axes)
            if z is not None:
                out["params"][p + ("w_zero_point",)] = box(z, S.qparam_axes)
        if act is not None:
            out["quant_stats"][p + ("act_scale",)] = act
        return
    if l.from_qat and c.learnable_scales:
        s = flax_meta.unbox(need("params", "w_scale"))
        z = None if c.weight_symmetric else flax_meta.unbox(need("params", "w_zero_point"))
        qw = L.maybe_abstract(lambda k, s, z: L.serving_weight(g.weight(k), s, L.rounded_zero_point(z, c), c),
                              kernel, s, z)
    elif _gptq(calibration, l) and not l.from_qat:
        qw = gptq_quantize_weight(jnp.asarray(g.weight(kernel), jnp.float32), stats[0], c, damp=calibration.damp,
                                  act_order=calibration.act_order, block_size=calibration.block_size)
    else:
        method = "absmax" if l.from_qat else None
        qw = L.maybe_abstract(lambda k: L.serving_weight(g.weight(k), *L.weight_params(g.weight(k), c, method), c),
                              kernel)
    for var in ("kernel", "w_scale", "w_zero_point"):
        out["params"].pop(p + (var,), None)
    out["quantized"][p + ("codes",)] = box(qw.codes, S.codes_axes)
    out["quantized"][p + ("w_scale",)] = box(qw.scale, S.qparam_axes)
    if qw.zero_point is not None:
        out["quantized"][p + ("w_zero_point",)] = box(qw.zero_point, S.qparam_axes)
    if act is not None:
        out["quant_stats"][p + ("act_scale",)] = act
