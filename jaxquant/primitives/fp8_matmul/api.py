"""fp8 matmuls: the raw GEMM ``fp8_matmul``, fp8 serving in ``quantized_linear`` and ``fp8_linear`` for training.

* ``fp8_matmul(a, w, a_scale, w_scale, bias=None, *, layout, out_dtype)`` — the GEMM on fp8 codes
  you already have (``jaxquant_fp8_matmul``; math and bound: ``reference.py``).
* ``quantized_linear(x, qweight, ...)`` — with an fp8 ``QuantizedWeight`` (``quantize_weight(w,
  dtype=jnp.float8_e4m3fn[, block_size=128])``) x is quantized to the weight's format (per token
  for per-channel weights, in 1 x 128 groups for 128 x 128 block weights: ``dynamic_quantize``) and
  the fp8 GEMM applies both scales; integer weights go to the W8A8 ``quantized_linear``.
* ``fp8_linear(x, w, bias=None, *, recipe)`` — ``y = x @ w^T (+ bias)`` for training with float
  weights: the forward GEMM and both backward GEMMs run in fp8 with fresh dynamic scales.

Training recipes (the granularity of the dynamic scales of every GEMM operand; ``A [R, C]``
quantized for a GEMM contracting over C):

=============  ================================  ===================================  =============
recipe         activation-side operand ``a``     weight-side operand ``w``            GEMM layout
=============  ================================  ===================================  =============
tensorwise     one scale (``PerTensor``)         one scale (``PerTensor``)            rowwise
rowwise        one per row (``PerToken``)        one per row (``PerToken``)           rowwise
blockwise      1 x 128 groups (``PerGroup(128)``) 128 x 128 blocks (``PerBlock``)     blockwise
=============  ================================  ===================================  =============

The three GEMMs and their operands (``x [M, K]``, ``w [N, K]``, ``dy [M, N]``)::

    forward  y  = x @ w^T       a = x    [M, K]    w-side = w    [N, K]     (contract K)
    dgrad    dx = dy @ w        a = dy   [M, N]    w-side = w^T  [K, N]     (contract N)
    wgrad    dw = dy^T @ x      a = dy^T [N, M]    w-side = x^T  [K, M]     (contract M: tokens)

so wgrad's scales run along the token axis. Blockwise pads the contracted axis (and the weight
side's rows) with zeros to multiples of 128: zeros add nothing to the sums.

Format: e4m3 (``float8_e4m3fn``) for every operand by default, the backward GEMMs' too
(``grad_dtype``). The kernels take both operands of a GEMM in one format, so e5m2 gradients would
force e5m2 weights and activations in dgrad / wgrad as well; with fresh per-row or per-block scales
the gradients' dynamic range is handled by the scales, and e4m3's extra mantissa bit halves the
quantization error (docs/fp8.md gives the measured gradient errors of both).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core import backend
from jaxquant.core import validation as V
from jaxquant.core.weights import QuantizedWeight, check_quantized_weight
from jaxquant.pallas.fp8_matmul import mosaic as mg_k
from jaxquant.pallas.fp8_matmul import triton as tr_k
from jaxquant.primitives.affine.api import quantize
from jaxquant.primitives.dynamic.api import dynamic_quantize
from jaxquant.primitives.fp8_matmul import primitive as P
from jaxquant.primitives.fp8_matmul.reference import BLOCK
from jaxquant.primitives.int8_matmul import api as int8_api
from jaxquant.primitives.linear import dy_at, frozen_weight_linear
from jaxquant.primitives.weights import dequantize_weight_raw

__all__ = ["fp8_matmul", "quantized_linear", "fp8_linear", "RECIPES"]

RECIPES = ("tensorwise", "rowwise", "blockwise")
_OUT_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))
E4M3 = np.dtype(jnp.float8_e4m3fn)


def _impl():
    return backend.current_implementation()


def _check_config(config):
    return V.config("config", config, tr_k.Config, mg_k.Config)


def _out_dtype(out_dtype, default):
    if out_dtype is None:
        return np.dtype(default)
    return V.dtype_in("out_dtype", out_dtype, _OUT_DTYPES, "float16, bfloat16 or float32")


def _bias(bias, n):
    return None if bias is None else V.vector("bias", bias, n, what="one value per output channel N")


# ------------------------------------------------------------------------------------------
# fp8_matmul: the raw GEMM
# ------------------------------------------------------------------------------------------


def fp8_matmul(a, w, a_scale, w_scale, bias=None, *, layout: str = "rowwise", out_dtype=jnp.bfloat16,
               config: tr_k.Config | mg_k.Config | None = None):
    """The fp8 GEMM on codes: ``y [..., N]`` from ``a [..., K]`` and ``w [N, K]`` (``y = a @ w^T``).

    Args:
      a, w: fp8 codes of one format (``float8_e4m3fn`` or ``float8_e5m2``).
      a_scale: float32; rowwise: a scalar (per tensor) or ``a.shape[:-1]`` (per token);
        blockwise: ``a.shape[:-1] + (ceil(K/128),)`` (1 x 128 groups).
      w_scale: float32; rowwise ``[N]`` or a scalar; blockwise ``[ceil(N/128), ceil(K/128)]``.
      bias: None or float ``[N]`` (added in float32).
      layout: ``"rowwise"`` or ``"blockwise"``; out_dtype: float32 / bfloat16 / float16.
      config: a ``jaxquant.pallas.fp8_matmul.triton.Config`` or ``.mosaic.Config`` (Hopper only).

    Math and the error bound: ``jaxquant.primitives.fp8_matmul.reference``. Not differentiable
    (``fp8_linear`` is the differentiable fp8 linear layer).
    """
    a, w = V.as_array("a", a), V.as_array("w", w)
    if layout not in tr_k.LAYOUTS:
        raise ValueError(f"layout: expected one of {tr_k.LAYOUTS}, got {layout!r}")
    if a.ndim < 1:
        raise ValueError("a: expected an array [..., K] of rank >= 1, got a scalar")
    a_scale = V.as_array("a_scale", a_scale)
    w_scale = V.as_array("w_scale", w_scale)
    m, k = math.prod(a.shape[:-1]), a.shape[-1]
    lead = tuple(a.shape[:-1])
    if layout == "rowwise":
        if a_scale.size == 1 and a_scale.ndim <= 1:  # one per-tensor scale
            a_scale_op = jnp.reshape(a_scale, (1,) * a.ndim)
        elif tuple(a_scale.shape) == lead:
            a_scale_op = a_scale[..., None]
        else:
            raise ValueError(f"a_scale (rowwise): expected a scalar or shape {lead} (one per token), "
                             f"got shape {tuple(a_scale.shape)}")
        w_scale = jnp.reshape(w_scale, (1,)) if w_scale.ndim == 0 else w_scale
    else:
        want = lead + (-(-k // BLOCK),)
        if tuple(a_scale.shape) != want:
            raise ValueError(f"a_scale (blockwise): expected shape {want} (1 x 128 groups), got {tuple(a_scale.shape)}")
        a_scale_op = a_scale
    out_dtype = _out_dtype(out_dtype, jnp.bfloat16)
    # the kernels' own checks (formats, shapes, float32 scales) on the 2-d view
    rows = 1 if a_scale_op.size == 1 and layout == "rowwise" else m
    tr_k.validate(jnp.reshape(a, (m, k)), w, jnp.reshape(a_scale_op, (rows, a_scale_op.shape[-1])), w_scale, bias,
                  layout, out_dtype)
    a, w, a_scale_op, w_scale, bias = jax.lax.stop_gradient((a, w, a_scale_op, w_scale, bias))
    return P.bind(a, w, a_scale_op, w_scale, bias, layout=layout, out_dtype=out_dtype, config=_check_config(config),
                  impl=_impl())


# ------------------------------------------------------------------------------------------
# quantized_linear with fp8 weights (serving)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ServeSpec:
    code_dtype: np.dtype
    block_size: int | None
    out_dtype: np.dtype
    config: object
    impl: str


def _serve_forward(spec: _ServeSpec, x, codes, w_scale, bias, act_scale):
    if act_scale is not None:  # a static per-tensor scale
        q = quantize(x, act_scale, granularity=gran.PerTensor(), dtype=spec.code_dtype)
        s = jnp.reshape(act_scale, (1,) * x.ndim)
        layout = "rowwise"
    elif spec.block_size is None:
        q, s, _ = dynamic_quantize(x, granularity=gran.PerToken(), dtype=spec.code_dtype)
        s, layout = s[..., None], "rowwise"
    else:
        q, s, _ = dynamic_quantize(x, granularity=gran.PerGroup(BLOCK), dtype=spec.code_dtype)
        layout = "blockwise"
    return P.bind(q, codes, s, w_scale, bias, layout=layout, out_dtype=spec.out_dtype, config=spec.config,
                  impl=spec.impl)


def _serve_dx(spec: _ServeSpec, dy, codes, w_scale, bias, act_scale, x_dtype):
    """Straight through the activation quantizer: ``dy @ W_hat`` (the dequantized weight, float32)."""
    w_hat = dequantize_weight_raw(codes, w_scale, None, bits=8, group_size=None, symmetric=True,
                                  dtype=jnp.float32, block_size=spec.block_size)
    return dy_at(dy, w_hat, jax.lax.Precision.HIGHEST).astype(x_dtype)


@functools.lru_cache(maxsize=None)
def _serve_fn(spec: _ServeSpec):
    return frozen_weight_linear(functools.partial(_serve_forward, spec), functools.partial(_serve_dx, spec),
                                bias_arg=3)


def quantized_linear(x, qweight, bias=None, *, out_dtype=None, act_scale=None, config=None):
    """Quantized linear layer ``y = x @ W^T (+ bias)`` for int8 (W8A8) and fp8 weights.

    With an fp8 ``qweight`` (``quantize_weight(w, dtype=jnp.float8_e4m3fn)``, optionally
    ``block_size=128``): x is quantized to the weight's fp8 format (dynamic, per token; 1 x 128
    groups for block weights; or ``act_scale``, a static per-tensor scale, per-channel weights only)
    and the fp8 GEMM applies the scales (``jaxquant_fp8_matmul``: Mosaic GPU for prefill on Hopper,
    Triton otherwise). Its error bound: ``jaxquant.primitives.fp8_matmul.reference``. ``jax.grad``
    gives ``dx = dy @ W_hat`` (straight through the activation quantizer) and ``dbias = sum(dy)``.
    ``config``: a ``jaxquant.pallas.fp8_matmul.triton.Config`` / ``.mosaic.Config``.

    With an integer weight this is the W8A8 ``quantized_linear`` (its docstring:
    ``jaxquant.primitives.int8_matmul.api``).
    """
    if not (isinstance(qweight, QuantizedWeight) and qweight.is_fp8):
        return int8_api.quantized_linear(x, qweight, bias, out_dtype=out_dtype, act_scale=act_scale, config=config)
    x = V.activation("x", x)
    qw = check_quantized_weight("qweight", qweight, k=x.shape[-1], fp8=True)
    if qw.block_size not in (None, BLOCK):
        raise ValueError(f"qweight.block_size: expected None or {BLOCK} (the fp8 GEMM's block format), "
                         f"got {qw.block_size}")
    bias = _bias(bias, qw.shape[0])
    if act_scale is not None:
        if qw.block_size is not None:
            raise ValueError("act_scale: a static per-tensor activation scale needs a per-channel fp8 weight "
                             "(block weights take 1 x 128 dynamic activation groups)")
        act_scale = V.float_array("act_scale", act_scale)
        if act_scale.size != 1 or act_scale.ndim > 1:
            raise ValueError(f"act_scale: expected a scalar, got shape {tuple(act_scale.shape)}")
        act_scale = jnp.reshape(act_scale, ()).astype(jnp.float32)
    spec = _ServeSpec(qw.code_dtype, qw.block_size, _out_dtype(out_dtype, x.dtype), _check_config(config), _impl())
    return _serve_fn(spec)(x, qw.codes, qw.scale, bias, act_scale)


# ------------------------------------------------------------------------------------------
# fp8_linear (training)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TrainSpec:
    recipe: str
    grad_dtype: np.dtype
    impl: str


def _pad(t, axis, mult):
    size = t.shape[axis]
    extra = (-size) % mult
    if not extra:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, extra)
    return jnp.pad(t, widths)


def _gemm(a, b, recipe, code, out_dtype, impl):
    """``a [R, C] @ b[S, C]^T -> [R, S]`` with both operands quantized freshly by ``recipe``."""
    r, s_rows = a.shape[0], b.shape[0]
    if recipe == "blockwise":
        a, b = _pad(a, 1, BLOCK), _pad(_pad(b, 1, BLOCK), 0, BLOCK)
        qa, sa, _ = dynamic_quantize(a, granularity=gran.PerGroup(BLOCK), dtype=code)
        qb, sb, _ = dynamic_quantize(b, granularity=gran.PerBlock((BLOCK, BLOCK)), dtype=code)
        layout = "blockwise"
    else:
        g = gran.PerTensor() if recipe == "tensorwise" else gran.PerToken()
        qa, sa, _ = dynamic_quantize(a, granularity=g, dtype=code)
        qb, sb, _ = dynamic_quantize(b, granularity=g, dtype=code)
        sa = jnp.reshape(sa, (1, 1) if recipe == "tensorwise" else (r, 1))
        sb = jnp.reshape(sb, (1,) if recipe == "tensorwise" else (-1,))
        layout = "rowwise"
    y = P.bind(qa, qb, sa, sb, None, layout=layout, out_dtype=out_dtype, impl=impl)
    return y[:, :s_rows]


@functools.lru_cache(maxsize=None)
def _train_fn(spec: _TrainSpec):
    def forward(x, w, bias):
        k = x.shape[-1]
        x2 = jnp.reshape(x, (-1, k))
        y = _gemm(x2, w, spec.recipe, E4M3, np.dtype(x.dtype), spec.impl)
        if bias is not None:
            y = (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
        return jnp.reshape(y, x.shape[:-1] + (w.shape[0],))

    @jax.custom_vjp
    def f(x, w, bias):
        return forward(x, w, bias)

    def fwd(x, w, bias):
        return forward(x, w, bias), (x, w, bias)

    def bwd(res, dy):
        x, w, bias = res
        k, n = x.shape[-1], w.shape[0]
        x2, dy2 = jnp.reshape(x, (-1, k)), jnp.reshape(dy, (-1, n))
        code = spec.grad_dtype
        dx = _gemm(dy2, jnp.transpose(w), spec.recipe, code, np.dtype(x.dtype), spec.impl)  # dgrad, contract N
        dw = _gemm(jnp.transpose(dy2), jnp.transpose(x2), spec.recipe, code, np.dtype(np.float32),
                   spec.impl)  # wgrad, contract tokens
        db = None if bias is None else jnp.sum(dy2.astype(jnp.float32), axis=0).astype(bias.dtype)
        return jnp.reshape(dx, x.shape), dw.astype(w.dtype), db

    f.defvjp(fwd, bwd)
    return f


def fp8_linear(x, w, bias=None, *, recipe: str = "rowwise", grad_dtype=jnp.float8_e4m3fn):
    """``y = x @ w^T (+ bias)`` with the forward and both backward GEMMs in fp8 (training).

    Args:
      x: float32 / bfloat16 / float16 activations ``[..., K]``.
      w: the float weight ``[N, K]`` (kept in float for the optimizer; quantized afresh each call).
      bias: None or float ``[N]`` (added in float32 after the GEMM).
      recipe: ``"tensorwise"``, ``"rowwise"`` or ``"blockwise"`` (module docstring: the scale
        granularity of every GEMM operand). Blockwise pads K, N and the tokens to multiples of 128.
      grad_dtype: the fp8 format of both operands of the backward GEMMs (dgrad, wgrad):
        ``float8_e4m3fn`` (default) or ``float8_e5m2``. The forward GEMM is e4m3.

    Returns ``[..., N]`` in x's dtype. ``jax.grad`` gives ``dx`` (x's dtype), ``dw`` (w's dtype) and
    ``dbias``, each from fp8 GEMMs with fresh dynamic scales (a straight-through estimator of the
    quantizers). Works under ``jit``, ``grad``, ``vmap``, ``remat`` and ``scan``.
    """
    x = V.activation("x", x)
    w = V.float_array("w", w)
    if w.ndim != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: expected a 2-d weight [N, K] with K = {x.shape[-1]} (the last axis of x; y = x @ w^T), "
                         f"got shape {tuple(w.shape)}")
    if np.dtype(w.dtype) == np.float64:
        raise TypeError("w: expected a float16, bfloat16 or float32 weight, got float64")
    if recipe not in RECIPES:
        raise ValueError(f"recipe: expected one of {RECIPES}, got {recipe!r}")
    gd = V.fp8_dtype("grad_dtype", grad_dtype)
    bias = _bias(bias, w.shape[0])
    return _train_fn(_TrainSpec(recipe, gd, _impl()))(x, w, bias)
