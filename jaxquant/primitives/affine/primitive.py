"""The affine primitives (``jaxquant_quantize``, ``_dequantize``, ``_fake_quantize``,
``_fake_quantize_backward``, ``_quantize_backward``) on operands in *broadcast form*.

Params: ``qmin``, ``qmax`` (integer codes), ``out_dtype``, ``fp8`` (None, or the fp8 format of the
codes: ``float8_e4m3fn`` / ``float8_e5m2``; then no zero point), ``config``, ``impl``.

Operands: the main arrays (``x``; ``q`` for dequantize; ``dy, x`` for the backward ops), all of
one shape, then ``scale`` (float32 / float64) and optionally ``zero_point`` (int32), whose every
dimension is 1 or equal to x's (``jaxquant.granularity``). The kernel path views them as
``[B, R, C]`` (``granularity.canonical_view``) and runs one ``pallas_call``
(``jaxquant.pallas.affine.triton``); the reference is ``reference.py``. Batching folds the batch
dimension into the operands (``PARAM`` role), so a vmapped op is still one kernel launch.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core import sharding as shd
from jaxquant.core.primitive import MAIN, PARAM, Choice, Op, Operand
from jaxquant.pallas.affine import triton as kernels
from jaxquant.primitives.affine import reference as ref

__all__ = ["OPS", "bind", "dispatch"]

_PARAMS = (Operand("scale", PARAM), Operand("zero_point", PARAM, optional=True))
_MAINS = {"quantize": ("x",), "dequantize": ("q",), "fake_quantize": ("x",), "fake_quantize_backward": ("dy", "x"),
          "quantize_backward": ("dy", "x")}
PRECISION = "bit-exact with jaxquant's reference (float32 arithmetic, round-half-to-even); deterministic"


def _broadcast_params(shape, scale, zp):
    """scale / zero point broadcast to one parameter shape, and the canonical view of x."""
    if zp is not None and zp.shape != scale.shape:
        pshape = np.broadcast_shapes(scale.shape, zp.shape)
        scale, zp = jnp.broadcast_to(scale, pshape), jnp.broadcast_to(zp, pshape)
    view = gran.canonical_view(shape, scale.shape)
    if view.expand is not None:
        scale = jnp.broadcast_to(scale, view.expand)
        zp = None if zp is None else jnp.broadcast_to(zp, view.expand)
    return scale, zp, view


def _view(avals):
    shape = avals["x"].shape if "x" in avals else avals["q"].shape
    pshape = avals["scale"].shape
    if avals.get("zero_point") is not None:
        pshape = np.broadcast_shapes(pshape, avals["zero_point"].shape)
    return gran.canonical_view(shape, pshape)


def _fp8_reference(op, m, scale, out_dtype, fp8):
    if op == "quantize":
        return ref.quantize_fp8_bf(m[0], scale, code=fp8)
    if op == "dequantize":
        return ref.dequantize_fp8_bf(m[0], scale, dtype=out_dtype)
    if op == "fake_quantize":
        return ref.fake_quantize_fp8_bf(m[0], scale, code=fp8)
    if op == "fake_quantize_backward":
        return ref.fake_quantize_backward_fp8_bf(m[0], m[1], scale, code=fp8)
    return ref.quantize_backward_fp8_bf(m[0], m[1], scale, code=fp8)


def _make(op):
    mains = _MAINS[op]

    def abstract_eval(*, scale, zero_point, qmin, qmax, out_dtype, fp8, config, impl, **main_avals):
        return jax.core.ShapedArray(main_avals[mains[0]].shape, out_dtype)

    def reference(*, scale, zero_point, qmin, qmax, out_dtype, fp8, config, impl, **arrays):
        m = [arrays[n] for n in mains]
        if fp8 is not None:
            return _fp8_reference(op, m, scale, out_dtype, fp8)
        if op == "quantize":
            return ref.quantize_bf(m[0], scale, zero_point, qmin=qmin, qmax=qmax, dtype=out_dtype)
        if op == "dequantize":
            return ref.dequantize_bf(m[0], scale, zero_point, dtype=out_dtype)
        if op == "fake_quantize":
            return ref.fake_quantize_bf(m[0], scale, zero_point, qmin=qmin, qmax=qmax)
        if op == "fake_quantize_backward":
            return ref.fake_quantize_backward_bf(m[0], m[1], scale, zero_point, qmin=qmin, qmax=qmax)
        return ref.quantize_backward_bf(m[0], m[1], scale, zero_point, qmin=qmin, qmax=qmax)

    def dispatch(avals, params, *, device_kind, interpret):
        view = _view(avals)
        cfg = params["config"] or kernels.heuristics(tuple(view.x_shape3), tuple(view.param_full))
        names = (f"jaxquant_{op}",)
        if view.param_full[2] and op != "dequantize":  # 1 / scale once per column (the kernel's _reciprocal)
            names = ("jaxquant_reciprocal",) + names
        return Choice("triton", cfg, names, interpret=interpret)

    def kernel(choice, *, scale, zero_point, qmin, qmax, out_dtype, fp8, config, impl, **arrays):
        m = [arrays[n] for n in mains]
        shape = m[0].shape
        scale, zero_point, view = _broadcast_params(shape, scale, zero_point)
        m3 = [jnp.reshape(a, view.x_shape3) for a in m]
        z3 = None if zero_point is None else jnp.reshape(zero_point, view.param_shape3)
        out = kernels.affine(op, *m3, scale=jnp.reshape(scale, view.param_shape3), zero_point=z3, qmin=qmin,
                             qmax=qmax, out_dtype=out_dtype, view=view, config=choice.config,
                             interpret=choice.interpret, fp8=fp8)
        return jnp.reshape(out, shape)

    def sharding(avals, params):
        """Elementwise: local on any layout of the main operands; a parameter dimension equal to
        x's is split with it, a broadcast one (size 1) stays whole."""
        shape = avals[mains[0]].shape
        fx = shd.leading("d", len(shape))
        operands = {n: fx for n in mains}
        operands["scale"] = shd.broadcast_factors(fx, shape, avals["scale"].shape, "s")
        if avals["zero_point"] is not None:
            operands["zero_point"] = shd.broadcast_factors(fx, shape, avals["zero_point"].shape, "z")
        return shd.Rule(operands, (fx,))

    return Op(f"jaxquant_{op}", [Operand(n, MAIN) for n in mains] + list(_PARAMS), abstract_eval=abstract_eval,
              reference=reference, kernel=kernel, dispatch=dispatch, precision=PRECISION, sharding=sharding)


OPS = {op: _make(op) for op in _MAINS}


def bind(op, *mains, scale, zero_point, qmin=0, qmax=0, out_dtype, config=None, impl="auto", fp8=None):
    """Bind the primitive of ``op`` on broadcast-form operands (already validated).

    ``fp8``: None (integer codes) or the fp8 format of the codes (then no zero point; qmin / qmax
    unused)."""
    return OPS[op](*mains, scale, zero_point, qmin=int(qmin), qmax=int(qmax), out_dtype=np.dtype(out_dtype),
                   fp8=None if fp8 is None else np.dtype(fp8), config=config, impl=impl)
