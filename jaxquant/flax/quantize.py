"""``quantize``: one call from a float (or QAT) Flax model to a QAT or serving model.

::

    served = quantize(model, [Rule(r".*attn.*", W8A8), Rule(r".*", W4A16)])   # PTQ: a serving model
    qat    = quantize(model, [Rule(r".*", W8A8)], mode="qat")                  # QAT: same model code
    served = quantize(qat)                                                     # serve what QAT simulated

nnx models: ``nnx.Linear``, ``nnx.LinearGeneral`` (``nnx.MultiHeadAttention``'s query / key / value
/ out) and ``nnx.Einsum`` whose equation is a matmul are quantized where the rules
(``jaxquant.flax.rules``) give a config. The input model is left unchanged: the result is a copy
(``nnx.clone``: arrays are shared, not copied) whose matched layers are replaced by ``QATLayer``
(``mode="qat"``) or ``QuantizedLayer`` (``mode="serve"``) modules (``jaxquant.flax.layers``).

* A layer a config cannot quantize (K not a multiple of the group size, an einsum that is not a
  matmul, an int4 x int8 config in serving mode, N or K not a multiple of 128 for fp8 blocks in
  serving mode) stays float with one ``QuantizationWarning``
  naming its path and the reason; ``strict=True`` raises ``ValueError`` listing them instead.
* A QAT layer records its config: ``quantize(qat_model)`` serves every QAT layer with it (its
  learned scales, calibrated activation scale). Rules passed for a QAT model still choose the
  float layers; a QAT layer whose rule gives another config warns and is served as trained.
* ``calibration``: ``Calibration(run, batches)`` sets static activation scales (configs with
  ``activations="static"``) from the inputs the float layers see; ``GPTQ(run, batches, ...)``
  also rounds the integer weights by GPTQ (fp8 layers are rounded to nearest). Weight scales
  follow ``QuantConfig.calibration`` (absmax, percentile, MSE clip search).
* Sharding annotations carry over (``jaxquant.flax.sharding``): a QAT layer keeps the float
  ``kernel`` / ``bias`` variables (and their ``out_sharding`` names); its learnable scales, and a
  serving layer's codes / scales / zero points, get the kernel's names mapped onto ``W [N, K]``.
* Abstract models work: ``nnx.eval_shape(lambda: quantize(Model(...), rules))`` builds the serving
  model without computing anything (for ``restore_checkpoint``), and a model whose variables are
  ``jax.ShapeDtypeStruct`` is quantized to one with abstract serving variables.

linen modules (``flax.linen.Module``) go to ``jaxquant.flax.linen.quantize_linen``, which returns a
``LinenQuantized`` model (same rules, modes and QAT recording; the module's code is not edited).
"""

from __future__ import annotations

import warnings

from flax import linen as nn
from flax import nnx

from jaxquant.flax import layers as L
from jaxquant.flax import linen as LQ
from jaxquant.flax.geometry import UnsupportedLayer
from jaxquant.flax.gptq import GPTQ, gptq_calibrate
from jaxquant.flax.observe import Calibration, collect_input_stats, path_str, resolve, set_child
from jaxquant.flax.rules import QuantizationWarning, as_rules, match
from jaxquant.flax.sharding import annotate_layer

__all__ = ["quantize", "MODES", "FLOAT_NOTE"]

MODES = ("serve", "qat")
#: Attribute of a float layer ``quantize`` left float, holding why (shown by ``summary``).
FLOAT_NOTE = "jaxquant_float_reason"


def quantize(model, rules=None, *, mode: str = "serve", strict: bool = False, calibration: Calibration | None = None):
    """Quantize a Flax model by ``rules`` (module docstring). Returns the new model.

    Args:
      model: an ``nnx.Module`` (float, QAT or partly served) or a ``flax.linen.Module``.
      rules: ``Rule`` s (first match wins), a ``QuantConfig`` (every layer), or None (only for a
        QAT model: serve it with the configs recorded at QAT time).
      mode: ``"serve"`` (quantized kernels: ``quantized_linear`` / ``weight_only_linear``) or
        ``"qat"`` (fake-quantized, trainable, same parameters as the float model; for fp8 configs
        fp8 training: the layers' matmuls run ``jaxquant.fp8_linear``).
      strict: raise instead of leaving a layer float with a warning.
      calibration: None, ``Calibration(run, batches)`` or ``GPTQ(run, batches, ...)`` (nnx only;
        for linen pass it to ``quantize_variables``).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration: expected None, jaxquant.flax.Calibration or jaxquant.flax.GPTQ, got "
                        f"{type(calibration).__name__}")
    if isinstance(model, (nn.Module, LQ.LinenQuantized)):
        if calibration is not None:
            raise ValueError("calibration: a linen model is calibrated when its variables are converted: "
                             "pass calibration= to jaxquant.flax.quantize_variables")
        return LQ.quantize_linen(model, as_rules(rules), mode=mode, strict=strict)
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected a flax nnx.Module or linen Module, got {type(model).__name__}")
    if rules is None and mode == "qat":
        raise ValueError("quantize(model, mode='qat') needs rules, e.g. quantize(model, W8A8, mode='qat')")
    if isinstance(calibration, GPTQ) and mode == "qat":
        raise ValueError("calibration=GPTQ(...) rounds weights for serving; QAT trains them (use Calibration(...) "
                         "for static activation scales)")
    return _quantize_nnx(model, as_rules(rules), mode, strict, calibration)


def _plan(model, rules, mode, strict):
    """``[(path, node, geometry, config)]`` of the layers to replace; warns / raises for the rest."""
    plan, problems = [], []
    serve = mode == "serve"
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, nnx.Variable):
            continue
        try:
            geometry = L.geometry_of(node)
            unsupported = None
        except UnsupportedLayer as e:
            geometry, unsupported = None, f"{type(node).__name__}: {e}"
        if geometry is None and unsupported is None:
            continue
        p = path_str(path)
        matched, config = match(rules, p, node) if rules is not None else (False, None)
        if isinstance(node, (L.QATLayer, L.QuantizedLayer)):
            have = node.config
            if matched and config != have:
                state = "trained with QAT" if isinstance(node, L.QATLayer) else "already served"
                warnings.warn(f"quantize: layer {p!r} was {state} as {have}; the rules ask for "
                              f"{config or 'float'}: keeping {have}", QuantizationWarning, stacklevel=4)
            if isinstance(node, L.QATLayer) and serve:
                why = have.problem(geometry.k, n=geometry.n, serve=True)
                if why:
                    problems.append((p, have, why, "stays a QAT layer (simulated)"))
                else:
                    plan.append((path, node, geometry, have))
            continue
        if config is None:
            if not matched:
                _note(node, "no rule matched")
            else:
                _note(node, "a rule keeps it float")
            continue
        why = unsupported or config.problem(geometry.k, n=geometry.n, serve=serve)
        if why:
            problems.append((p, config, why, "stays float"))
            _note(node, f"{config}: {why}")
            continue
        plan.append((path, node, geometry, config))
    if problems and strict:
        lines = "\n".join(f"  {p!r} ({c}): {why}" for p, c, why, _ in problems)
        raise ValueError(f"quantize(strict=True): {len(problems)} layer(s) cannot be quantized:\n{lines}")
    for p, c, why, outcome in problems:
        warnings.warn(f"quantize: layer {p!r} {outcome}: {c} cannot quantize it: {why}", QuantizationWarning,
                      stacklevel=4)
    if rules is None and serve and not any(isinstance(n, L.QATLayer) for _, n in nnx.iter_graph(model)):
        raise ValueError("quantize(model) without rules serves the QAT layers of a QAT model (mode='qat'), and "
                         "this model has none: pass rules, e.g. quantize(model, W8A8)")
    return plan


def _note(node, reason):
    setattr(node, FLOAT_NOTE, reason)


def _static_stats(model, plan, calibration):
    """Input statistics of the float layers with static activations (``{path: InputStats}``)."""
    static = [(path, g) for path, node, g, c in plan
              if c.activations == "static" and not isinstance(node, L.QATLayer)]
    if not static:
        return {}
    if calibration is None:
        names = ", ".join(repr(path_str(p)) for p, _ in static[:4]) + (" ..." if len(static) > 4 else "")
        raise ValueError(f"activations='static' needs calibration data for {names}: pass "
                         "calibration=jaxquant.flax.Calibration(run, batches)")
    stats = collect_input_stats(model, calibration, static)
    for path, st in stats.items():
        if st.rows == 0:
            raise ValueError(f"calibration: layer {path_str(path)!r} was not called by run() on the calibration "
                             "batches, so it has no activation scale")
    return stats


def _quantize_nnx(model, rules, mode, strict, calibration):
    model = nnx.clone(model)
    plan = _plan(model, rules, mode, strict)
    gptq = {}
    if isinstance(calibration, GPTQ):
        # GPTQ rounds integer codes; fp8 layers are quantized by quantize_weight (round to nearest)
        float_layers = [(path, g, c) for path, node, g, c in plan if not isinstance(node, L.QATLayer) and not c.is_fp8]
        gptq = gptq_calibrate(model, calibration, float_layers) if float_layers else {}
        stats = {path: st for path, (_, st) in gptq.items()}
    else:
        stats = _static_stats(model, plan, calibration)
    for path, node, geometry, config in plan:
        act = None
        if config.activations == "static":
            act = node.act_scale.get_value() if isinstance(node, L.QATLayer) else L.act_scale_from_amax(
                stats[path].amax)
        if mode == "qat":
            new = L.QATLayer(node, geometry, config, act_scale=act)
        elif isinstance(node, L.QATLayer):
            new = _serve_qat(node, act)
        else:
            qw = gptq[path][0] if path in gptq else L.maybe_abstract(
                lambda k: _quantize_kernel(k, geometry, config), node.kernel.get_value())
            new = L.QuantizedLayer(geometry, config, qw, getattr(node, "bias", None), act_scale=act,
                                   dtype=getattr(node, "dtype", None), kernel_dtype=node.kernel.get_value().dtype)
        new = annotate_layer(new, node.kernel, path_str(path))
        if not path:
            return new
        parent, key = resolve(model, path)
        set_child(parent, key, new)
    return model


def _quantize_kernel(kernel, geometry, config):
    w = geometry.weight(kernel)
    s, z = L.weight_params(w, config)
    return L.serving_weight(w, s, z, config)


def _serve_qat(node: L.QATLayer, act):
    g, c = node.geometry, node.config

    def convert(kernel, scale, zero_point):
        w = g.weight(kernel)
        if c.learnable_scales:
            return L.serving_weight(w, scale, L.rounded_zero_point(zero_point, c), c)
        s, z = L.weight_params(w, c, method="absmax")
        return L.serving_weight(w, s, z, c)

    get = lambda v: None if v is None else v.get_value()
    qw = L.maybe_abstract(convert, node.kernel.get_value(), get(node.w_scale), get(node.w_zero_point))
    return L.QuantizedLayer(g, c, qw, node.bias, act_scale=act, dtype=node.dtype,
                            kernel_dtype=node.kernel.get_value().dtype)
