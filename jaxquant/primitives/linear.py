"""W8A8 linear layers: the ``jaxquant_quantized_linear`` and ``jaxquant_int8_matmul`` primitives.

Public functions (trace-time validation, custom_vjp):

* ``quantized_linear(x, qweight, bias=None, *, out_dtype=None, act_scale=None)`` —
  ``y ≈ x @ W^T (+ bias)`` with int8 activations and int8 weights;
* ``int8_matmul(a, w, a_scale=None, w_scale=None, bias=None, *, out_dtype=None)`` — the raw
  int8 GEMM on codes you already have (``int32`` accumulator out when there are no scales).

Forward math of ``quantized_linear`` (float32; ``x [..., K]`` viewed as ``[M, K]``)::

    dynamic (act_scale=None), per token:  s[m] = max(max_k |x[m, k]| * f32(1/127), 2**-126)
    static  (act_scale=s):                s[m] = s
    q[m, k]   = clamp(rne(x[m, k] * (1 / s[m])), -128, 127)                 (NaN -> -128)
    acc[m, n] = sum_k int32(q[m, k]) * int32(codes[n, k])                     (exact int32)
    y[m, n]   = (f32(acc[m, n]) * s[m]) * w_scale[n]  (+ f32(bias[n]))  ->  out_dtype

The activation rule is ``jaxquant.dynamic_quantize(x)`` / ``jaxquant.quantize(x, s, PerTensor())``
exactly (DESIGN.md §1); the weight is ``jaxquant.quantize_weight(w, bits=8)`` (symmetric, one
scale per output channel). A row containing NaN gets a NaN scale, so its outputs are NaN.

Backward (``jax.grad``), straight through the activation quantizer::

    dx    = dy @ W_hat,  W_hat[n, k] = codes[n, k] * w_scale[n]     (the dequantized weight)
    dbias = sum over the leading axes of dy
and no gradient (zero) to ``codes``, ``w_scale`` and ``act_scale``: they are frozen serving
parameters (train float weights with ``jaxquant.fake_quantize`` for QAT instead). ``dx`` is computed
in x's dtype with a float32 accumulator (float32 x: ``precision=HIGHEST``). The VJP is linear in
``dy``, so it can itself be differentiated (``jax.test_util.check_grads`` on it passes).

Lowering: CPU -> the plain-jnp reference (``linear_reference``); CUDA -> Pallas: the fused
per-token quantization kernel (``jaxquant.pallas.dynamic``; static scale:
``jaxquant.pallas.affine``) writes int8 codes + scales, then the GEMM kernel applies the epilogue
in registers — the int32 ``[M, N]`` accumulator never reaches device memory. The GEMM is the
Triton kernel (``jaxquant.pallas.int8_matmul``: any shape, masked edges, split K at decode) or,
on Hopper for prefill shapes that fit its tile and have no bias, the Mosaic GPU kernel
(``jaxquant.pallas.int8_matmul_mgpu``: warp-specialised, TMA-fed; ``use_mgpu`` decides). Both
are bit-exact with the reference epilogue. For ``M <= fused_quantize_max_m(device)`` one kernel
would quantize the activation tiles itself (one launch); on the H200 that measured slower at every
M, so it is off there (``linear_kernel(..., fuse=True)`` forces it). Batching (``vmap``) folds batch dimensions of x into M
(one launch); a batched weight falls back to ``lax.map`` over the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from jaxquant import _validation as V
from jaxquant import backend
from jaxquant import granularity as gran
from jaxquant import reference as ref
from jaxquant.pallas import affine as affine_k
from jaxquant.pallas import dynamic as dynamic_k
from jaxquant.pallas import int8_matmul as mm_k
from jaxquant.pallas import int8_matmul_mgpu as mg_k
from jaxquant.pallas.int8_matmul import Config
from jaxquant.pallas.mgpu_common import device_kind as _device_kind, is_hopper, num_sms as _num_sms
from jaxquant.primitives._register import register

__all__ = ["quantized_linear", "int8_matmul", "linear_reference", "int8_matmul_reference",
           "quantized_linear_p", "int8_matmul_p", "Config"]

QMIN, QMAX = -128, 127
_DN = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]
_OUT_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))


# ------------------------------------------------------------------------------------------
# References (plain jnp): the CPU lowering and the test oracle.
# ------------------------------------------------------------------------------------------


def int8_matmul_reference(a2, w, a_scale2=None, w_scale=None, bias=None, *, out_dtype):
    """``a2 [M, K]`` int8, ``w [N, K]`` int8, ``a_scale2 [M, 1]`` / ``[1, 1]`` -> ``[M, N]``."""
    # int32 operands: exact by construction on every backend. (XLA:CPU's int8 x int8 -> int32 dot
    # in jax 0.11.2 returned twice the true accumulator on the GPU machine's CPU backend, while
    # XLA:GPU, this kernel and numpy agreed; int32 operands avoid that path.)
    acc = jax.lax.dot_general(a2.astype(jnp.int32), w.astype(jnp.int32), _DN, preferred_element_type=jnp.int32)
    return ref.int8_epilogue(acc, a_scale2, w_scale, bias, out_dtype)


def quantize_activation_reference(x2, act_scale=None):
    """The activation codes and scale of ``quantized_linear``: ``(q [M, K] int8, s [M, 1] or [1, 1])``."""
    if act_scale is None:
        q, s, _ = ref.dynamic_quantize_rows(x2, qmin=QMIN, qmax=QMAX, symmetric=True, dtype=jnp.int8)
        return q, s
    s = jnp.reshape(act_scale, (1, 1)).astype(jnp.float32)
    return ref.quantize_bf(x2, s, None, qmin=QMIN, qmax=QMAX, dtype=jnp.int8), s


def linear_reference(x2, codes, w_scale, bias=None, act_scale=None, *, out_dtype):
    """Plain-jnp ``quantized_linear`` on ``x2 [M, K]``: quantize, int8 dot (int32), epilogue."""
    q, s = quantize_activation_reference(x2, act_scale)
    return int8_matmul_reference(q, codes, s, w_scale, bias, out_dtype=out_dtype)


# ------------------------------------------------------------------------------------------
# Kernel paths (CUDA, or Pallas interpret mode).
# ------------------------------------------------------------------------------------------


def _row_chunks(m, per_row_elems):
    """Row ranges keeping every per-call array under 2**31 elements (module limit of the kernels)."""
    step = max(1, mm_k.MAX_ELEMENTS // max(1, per_row_elems))
    return [(r, min(m, r + step)) for r in range(0, m, step)]


def _n_chunks(n, k):
    step = max(1, mm_k.MAX_ELEMENTS // max(1, k))
    return [(c, min(n, c + step)) for c in range(0, n, step)]


def _split_n(fn, w, w_scale, bias, n, k):
    """Run ``fn(w, w_scale, bias) -> [M, n_chunk]`` on column chunks of the weight, concatenated."""
    chunks = _n_chunks(n, k)
    if len(chunks) == 1:
        return fn(w, w_scale, bias)
    outs = [fn(w[c0:c1], None if w_scale is None else w_scale[c0:c1], None if bias is None else bias[c0:c1])
            for c0, c1 in chunks]
    return jnp.concatenate(outs, axis=1)


def use_mgpu(m, n, k, *, has_a_scale, has_w_scale, out_dtype, config, device_kind, interpret,
             has_bias=False) -> bool:
    """Whether the int8 GEMM of an ``[m, k] x [n, k]`` problem runs the Mosaic GPU kernel.

    An explicit ``int8_matmul_mgpu.Config`` always does (its shape must fit it). With no config: on
    Hopper (``device_kind`` names an H100 / H200 / H800 / H20), with both scales (a float
    epilogue) and no bias, when the shape is a multiple of its tile and gives at least
    ``int8_matmul_mgpu.MIN_TILES`` CTA tiles (below that the Triton kernel's smaller tiles keep more
    SMs busy). Otherwise Triton.

    No bias: Mosaic GPU contracts the epilogue's ``(y * w_scale) + bias`` into one FMA, which
    under cancellation moved float32 results by up to ~3e5 ulps from the reference's two roundings
    on an H200 (``tests/test_linear.py::test_mgpu_gemm_equals_reference``); the Triton kernel
    keeps them apart (``mul.rn``) and stays bit-exact, so a layer with a bias runs there.
    """
    if isinstance(config, mg_k.Config):
        if interpret:
            raise ValueError("config: an int8_matmul_mgpu.Config has no interpret mode (Mosaic GPU runs on "
                             "Hopper GPUs only); use a jaxquant.pallas.int8_matmul.Config")
        if not (has_a_scale and has_w_scale and np.dtype(out_dtype) != np.int32):
            raise ValueError("config: an int8_matmul_mgpu.Config needs the float epilogue (a_scale and w_scale)")
        if has_bias:
            raise ValueError("config: an int8_matmul_mgpu.Config takes no bias (its epilogue would contract "
                             "the bias add into an FMA: not bit-exact); use a jaxquant.pallas.int8_matmul.Config")
        if not mg_k.supports(m, n, k, config=config):
            cm, cn = config.cta_shape()
            raise ValueError(f"config: {config} needs M, N multiples of {cm}, {cn} and K of {config.tile_k}; "
                             f"got M={m}, N={n}, K={k}")
        return True
    if config is not None or interpret or not is_hopper(device_kind):
        return False
    if not (has_a_scale and has_w_scale) or has_bias or np.dtype(out_dtype) == np.int32:
        return False
    cfg = mg_k.heuristics(m, n, k)
    return mg_k.supports(m, n, k, config=cfg) and mg_k.enough_tiles(m, n, cfg)


def gemm_config(m, n, k, *, device_kind, has_bias=False, out_dtype=np.float32):
    """The GEMM tile ``quantized_linear`` picks for ``[m, k] x [n, k]`` with no explicit config
    (an ``int8_matmul_mgpu.Config`` or an ``int8_matmul.Config``): what benchmarks report."""
    if use_mgpu(m, n, k, has_a_scale=True, has_w_scale=True, out_dtype=out_dtype, config=None,
                device_kind=device_kind, interpret=False, has_bias=has_bias):
        return mg_k.heuristics(m, n, k)
    return mm_k.heuristics(m, n, k, device_kind=device_kind)


def _gemm(q, w, s, ws, b, *, out_dtype, config, device_kind, interpret):
    """The int8 GEMM with its epilogue: Mosaic GPU (``use_mgpu``) or Triton."""
    m, k = q.shape
    if use_mgpu(m, w.shape[0], k, has_a_scale=s is not None, has_w_scale=ws is not None, out_dtype=out_dtype,
                config=config, device_kind=device_kind, interpret=interpret, has_bias=b is not None):
        # (use_mgpu is False for a Triton config: config here is an int8_matmul_mgpu.Config or None)
        return mg_k.int8_matmul_mgpu(q, w, s, ws, out_dtype=out_dtype, config=config, num_sms=_num_sms())
    return mm_k.int8_matmul(q, w, a_scale=s, w_scale=ws, bias=b, a_mode="int8", out_dtype=out_dtype, config=config,
                            device_kind=device_kind, interpret=interpret)


def _quantize_rows_kernel(x2, act_scale, interpret):
    """int8 codes + scale of ``x2`` with the fused dynamic kernel, or the affine kernel (static)."""
    if act_scale is None:
        q, s, _ = dynamic_k.dynamic_quantize_rows(x2, qmin=QMIN, qmax=QMAX, symmetric=True, out_dtype=jnp.int8,
                                                  interpret=interpret)
        return q, s
    m, k = x2.shape
    view = gran.canonical_view((m, k), (1, 1))
    s = jnp.reshape(act_scale, (1, 1)).astype(jnp.float32)
    q = affine_k.affine("quantize", jnp.reshape(x2, view.x_shape3), scale=jnp.reshape(s, view.param_shape3),
                        qmin=QMIN, qmax=QMAX, out_dtype=jnp.int8, view=view, interpret=interpret)
    return jnp.reshape(q, (m, k)), s


def linear_kernel(x2, codes, w_scale, bias=None, act_scale=None, *, out_dtype, config=None, interpret=False,
                  device_kind=None, fuse=None):
    """``quantized_linear`` on ``x2 [M, K]`` with the Pallas kernels (see the module docstring).

    ``fuse``: quantize the activation inside the GEMM kernel (one launch) instead of a separate
    quantization kernel; default: ``M <= fused_quantize_max_m(device)`` (measured per device).
    """
    m, k = x2.shape
    n = codes.shape[0]
    dk = device_kind if device_kind is not None else (None if interpret else _device_kind())
    if fuse is None:
        fuse = m <= mm_k.fused_quantize_max_m(dk) and not isinstance(config, mg_k.Config)
    if fuse and isinstance(config, mg_k.Config):
        raise ValueError("config: the Mosaic GPU GEMM (int8_matmul_mgpu.Config) takes int8 activations; "
                         "fuse=True needs a jaxquant.pallas.int8_matmul.Config or None")
    if fuse and m * k <= mm_k.MAX_ELEMENTS:
        mode = "dynamic" if act_scale is None else "static"
        a_s = None if act_scale is None else jnp.reshape(act_scale, (1, 1)).astype(jnp.float32)
        return _split_n(lambda w, ws, b: mm_k.int8_matmul(x2, w, a_scale=a_s, w_scale=ws, bias=b, a_mode=mode,
                                                          out_dtype=out_dtype, config=config, device_kind=dk,
                                                          interpret=interpret),
                        codes, w_scale, bias, n, k)
    outs = []
    for r0, r1 in _row_chunks(m, max(k, n)):
        xr = x2 if (r0, r1) == (0, m) else x2[r0:r1]
        q, s = _quantize_rows_kernel(xr, act_scale, interpret)
        outs.append(_split_n(lambda w, ws, b: _gemm(q, w, s, ws, b, out_dtype=out_dtype, config=config,
                                                    device_kind=dk, interpret=interpret),
                             codes, w_scale, bias, n, k))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def int8_matmul_kernel(a2, w, a_scale2=None, w_scale=None, bias=None, *, out_dtype, config=None, interpret=False,
                       device_kind=None):
    m, k = a2.shape
    n = w.shape[0]
    dk = device_kind if device_kind is not None else (None if interpret else _device_kind())
    outs = []
    for r0, r1 in _row_chunks(m, max(k, n)):
        ar = a2 if (r0, r1) == (0, m) else a2[r0:r1]
        sr = a_scale2
        if a_scale2 is not None and a_scale2.shape[0] != 1 and (r0, r1) != (0, m):
            sr = a_scale2[r0:r1]
        outs.append(_split_n(lambda w_, ws, b: _gemm(ar, w_, sr, ws, b, out_dtype=out_dtype, config=config,
                                                     device_kind=dk, interpret=interpret),
                             w, w_scale, bias, n, k))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


# ------------------------------------------------------------------------------------------
# Primitives.
# ------------------------------------------------------------------------------------------


def _map_fallback(p, args, dims, params):
    """vmap of a primitive whose weight-like operands are batched: ``lax.map`` over the batch."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    batched = [jnp.moveaxis(a, d, 0) if d is not None else None for a, d in zip(args, dims)]

    def one(xs):
        it = iter(xs)
        full = [next(it) if d is not None else a for a, d in zip(args, dims)]
        return p.bind(*full, **params)

    out = jax.lax.map(one, tuple(b for b in batched if b is not None))
    assert out.shape[0] == size
    return out, 0


# --- jaxquant_quantized_linear: (x [..., K] float, codes [N, K] int8, w_scale [N] f32, [bias [N]], [act_scale []])

quantized_linear_p = Primitive("jaxquant_quantized_linear")


def _ql_split(args, has_bias, static):
    x, codes, w_scale = args[:3]
    rest = list(args[3:])
    bias = rest.pop(0) if has_bias else None
    act_scale = rest.pop(0) if static else None
    return x, codes, w_scale, bias, act_scale


def _ql_abstract(*avals, has_bias, static, out_dtype, config, impl):
    x, codes = avals[0], avals[1]
    return jax.core.ShapedArray(x.shape[:-1] + (codes.shape[0],), out_dtype)


def _ql_lowering(platform):
    def rule(ctx, *args, has_bias, static, out_dtype, config, impl):
        use = backend.resolve(impl, platform)

        def fn(*a):
            x, codes, w_scale, bias, act_scale = _ql_split(a, has_bias, static)
            lead, k = x.shape[:-1], x.shape[-1]
            x2 = jnp.reshape(x, (math.prod(lead), k))
            if use == "reference":
                y = linear_reference(x2, codes, w_scale, bias, act_scale, out_dtype=out_dtype)
            else:
                y = linear_kernel(x2, codes, w_scale, bias, act_scale, out_dtype=out_dtype, config=config,
                                  interpret=use == "interpret")
            return jnp.reshape(y, lead + (codes.shape[0],))

        return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)
    return rule


def _ql_batch(args, dims, **params):
    if all(d is None for d in dims[1:]):  # only x batched: fold into the leading (token) axes
        x = jnp.moveaxis(args[0], dims[0], 0)
        return quantized_linear_p.bind(x, *args[1:], **params), 0
    return _map_fallback(quantized_linear_p, args, dims, params)


register(quantized_linear_p, abstract_eval=_ql_abstract, lowering=_ql_lowering, batch=_ql_batch)


# --- jaxquant_int8_matmul: (a [..., K] int8, w [N, K] int8, [a_scale [..., 1] or [1]*ndim], [w_scale [N]], [bias [N]])

int8_matmul_p = Primitive("jaxquant_int8_matmul")


def _mm_split(args, has_a_scale, has_w_scale, has_bias):
    it = iter(args)
    a, w = next(it), next(it)
    a_scale = next(it) if has_a_scale else None
    w_scale = next(it) if has_w_scale else None
    bias = next(it) if has_bias else None
    return a, w, a_scale, w_scale, bias


def _mm_abstract(*avals, has_a_scale, has_w_scale, has_bias, out_dtype, config, impl):
    return jax.core.ShapedArray(avals[0].shape[:-1] + (avals[1].shape[0],), out_dtype)


def _mm_lowering(platform):
    def rule(ctx, *args, has_a_scale, has_w_scale, has_bias, out_dtype, config, impl):
        use = backend.resolve(impl, platform)

        def fn(*a_):
            a, w, a_scale, w_scale, bias = _mm_split(a_, has_a_scale, has_w_scale, has_bias)
            lead, k = a.shape[:-1], a.shape[-1]
            m = math.prod(lead)
            a2 = jnp.reshape(a, (m, k))
            s2 = None
            if a_scale is not None:
                s2 = jnp.reshape(a_scale, (1, 1) if a_scale.size == 1 else (m, 1))
            if use == "reference":
                y = int8_matmul_reference(a2, w, s2, w_scale, bias, out_dtype=out_dtype)
            else:
                y = int8_matmul_kernel(a2, w, s2, w_scale, bias, out_dtype=out_dtype, config=config,
                                       interpret=use == "interpret")
            return jnp.reshape(y, lead + (w.shape[0],))

        return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)
    return rule


def _mm_batch(args, dims, *, has_a_scale, has_w_scale, has_bias, **params):
    flags = dict(params, has_a_scale=has_a_scale, has_w_scale=has_w_scale, has_bias=has_bias)
    n_act = 3 if has_a_scale else 2  # a, w, [a_scale]: the operands before the per-channel ones
    if dims[0] is None or dims[1] is not None or any(d is not None for d in dims[n_act:]):
        return _map_fallback(int8_matmul_p, args, dims, flags)
    a = jnp.moveaxis(args[0], dims[0], 0)  # fold the batch axis into the tokens
    new = [a, args[1]]
    if has_a_scale:
        s, sd = args[2], dims[2]
        s = jnp.moveaxis(s, sd, 0) if sd is not None else s[None]
        if sd is not None or s.size != 1:
            s = jnp.broadcast_to(s, a.shape[:-1] + (1,))
        new.append(s)
    new += list(args[n_act:])
    return int8_matmul_p.bind(*new, **flags), 0


register(int8_matmul_p, abstract_eval=_mm_abstract, lowering=_mm_lowering, batch=_mm_batch)


# ------------------------------------------------------------------------------------------
# Public functions.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one ``quantized_linear`` call (the custom_vjp closure is cached on it)."""

    has_bias: bool
    static: bool
    out_dtype: np.dtype
    config: Config | None
    impl: str


def _bind_linear(spec: _Spec, x, codes, w_scale, bias, act_scale):
    args = [x, codes, w_scale] + ([bias] if spec.has_bias else []) + ([act_scale] if spec.static else [])
    return quantized_linear_p.bind(*args, has_bias=spec.has_bias, static=spec.static, out_dtype=spec.out_dtype,
                                   config=spec.config, impl=spec.impl)


def _dx(dy, codes, w_scale, x_dtype):
    """STE backward: ``dy @ W_hat`` with ``W_hat = codes * w_scale[:, None]`` (in x's dtype, f32 accumulation)."""
    x_dtype = np.dtype(x_dtype)
    w_hat = codes.astype(jnp.float32) * jnp.reshape(w_scale, (-1, 1)).astype(jnp.float32)
    if x_dtype == np.float32:
        dyc, wc, prec = dy.astype(jnp.float32), w_hat, jax.lax.Precision.HIGHEST
    else:
        dyc, wc, prec = dy.astype(x_dtype), w_hat.astype(x_dtype), None
    dx = jax.lax.dot_general(dyc, wc, (((dyc.ndim - 1,), (0,)), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32)
    return dx.astype(x_dtype)


@functools.lru_cache(maxsize=None)
def _linear_fn(spec: _Spec):
    @jax.custom_vjp
    def f(x, codes, w_scale, bias, act_scale):
        return _bind_linear(spec, x, codes, w_scale, bias, act_scale)

    def fwd(x, codes, w_scale, bias, act_scale):
        return f(x, codes, w_scale, bias, act_scale), (codes, w_scale, bias, jnp.zeros((0,), x.dtype))

    def bwd(res, dy):
        codes, w_scale, bias, x_proto = res
        dx = _dx(dy, codes, w_scale, x_proto.dtype)
        db = None
        if bias is not None:
            db = jnp.sum(dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1))).astype(bias.dtype)
        return dx, None, None, db, None

    f.defvjp(fwd, bwd)
    return f


def _check_config(config):
    if config is not None and not isinstance(config, (Config, mg_k.Config)):
        raise TypeError("config: expected a jaxquant.pallas.int8_matmul.Config, a "
                        f"jaxquant.pallas.int8_matmul_mgpu.Config or None, got {config!r}")
    return config


def _out_dtype(out_dtype, default, *, allow_int32=False):
    if out_dtype is None:
        return np.dtype(default)
    try:
        dt = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"out_dtype: expected a dtype, got {out_dtype!r}") from None
    allowed = _OUT_DTYPES + ((np.dtype(np.int32),) if allow_int32 else ())
    if dt not in allowed:
        names = ", ".join(d.name for d in allowed)
        raise TypeError(f"out_dtype: expected one of {names}, got {dt.name}")
    return dt


def _vector(name, v, n, *, what, float_only=True):
    v = V.float_array(name, v) if float_only else V.as_array(name, v)
    if tuple(v.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},) ({what}), got shape {tuple(v.shape)}")
    return v


def _check_qweight(qweight, k):
    from jaxquant.weights import check_quantized_weight

    qw = check_quantized_weight("qweight", qweight, k=k)
    if qw.bits != 8:
        raise ValueError(f"qweight.bits: expected 8 for the W8A8 quantized_linear (4-bit weights: "
                         f"weight_only_linear), got {qw.bits}")
    if qw.group_size is not None:
        raise ValueError(f"qweight.group_size: expected None (one scale per output channel) for quantized_linear, "
                         f"got {qw.group_size}")
    if not qw.symmetric:
        raise ValueError("qweight.symmetric: expected True (zero point 0) for quantized_linear, got False")
    return qw


def quantized_linear(x, qweight, bias=None, *, out_dtype=None, act_scale=None, config: Config | None = None):
    """W8A8 linear layer: ``y = x @ W^T (+ bias)`` with int8 activations and weights.

    Args:
      x: float32 / float16 / bfloat16 activations ``[..., K]`` (any leading axes: tokens).
      qweight: a ``jaxquant.QuantizedWeight`` from ``quantize_weight(w, bits=8)`` (``w [N, K]``,
        symmetric, one float32 scale per output channel: ``codes`` int8 ``[N, K]``, ``scale [N]``).
      bias: optional float ``[N]``, added in float32 in the kernel's epilogue.
      out_dtype: float16 / bfloat16 / float32; default x's dtype.
      act_scale: None for dynamic symmetric per-token activation scales (computed from x), or a
        float32 scalar (> 0, finite) for a static per-tensor scale (SmoothQuant-static style).
      config: overrides the GEMM choice: a ``jaxquant.pallas.int8_matmul.Config`` (the Triton
        GEMM with that tile) or a ``jaxquant.pallas.int8_matmul_mgpu.Config`` (the Mosaic GPU GEMM,
        Hopper only: no bias, M / N / K multiples of its tile). Default: ``use_mgpu`` decides.

    Returns ``[..., N]`` in ``out_dtype``. Forward and backward math: the module docstring —
    ``y = (f32(sum_k q[m,k] codes[n,k]) * s[m]) * w_scale[n] + bias[n]`` with ``q`` the int8 codes
    of x; ``jax.grad`` gives ``dx = dy @ (codes * w_scale[:, None])`` (straight-through the
    activation quantizer) and ``dbias = sum(dy)``; the codes and scales get no gradient.
    """
    x = V.as_array("x", x)
    if np.dtype(x.dtype) not in _OUT_DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16 or float32 array, got a {np.dtype(x.dtype).name} array "
                        f"of shape {tuple(x.shape)}")
    if x.ndim < 1:
        raise ValueError(f"x: expected an array [..., K] of rank >= 1, got a scalar")
    k = x.shape[-1]
    qw = _check_qweight(qweight, k)
    n = qw.shape[0]
    if bias is not None:
        bias = _vector("bias", bias, n, what="one value per output channel N of qweight")
    if act_scale is not None:
        act_scale = V.float_array("act_scale", act_scale)
        if act_scale.size != 1 or act_scale.ndim > 1:
            raise ValueError(f"act_scale: expected a scalar (one static per-tensor scale), got shape "
                             f"{tuple(act_scale.shape)}")
        act_scale = jnp.reshape(act_scale, ()).astype(jnp.float32)
    spec = _Spec(bias is not None, act_scale is not None, _out_dtype(out_dtype, x.dtype), _check_config(config),
                 backend.current_implementation())
    return _linear_fn(spec)(x, qw.codes, qw.scale, bias, act_scale)


def int8_matmul(a, w, a_scale=None, w_scale=None, bias=None, *, out_dtype=None, config: Config | None = None):
    """The int8 GEMM on codes: ``epilogue(sum_k int32(a[..., k]) * int32(w[n, k]))``.

    Args:
      a: int8 ``[..., K]`` activation codes; w: int8 ``[N, K]`` weight codes (``y = a @ w^T``).
      a_scale: None, a float32 scalar (per tensor) or ``a.shape[:-1]`` (per token).
      w_scale: None or float32 ``[N]``; bias: None or float ``[N]``.
      out_dtype: default int32 (the exact accumulator) when there is no scale and no bias,
        float32 otherwise; int32 is only allowed without an epilogue.
      config: as in ``quantized_linear``.

    Epilogue: ``(f32(acc) * a_scale) * w_scale (+ f32(bias))`` in float32, inside the kernel.
    Not differentiable (integer inputs).
    """
    a = V.as_array("a", a)
    w = V.as_array("w", w)
    for name, arr in (("a", a), ("w", w)):
        if np.dtype(arr.dtype) != np.int8:
            raise TypeError(f"{name}: expected int8 codes, got a {np.dtype(arr.dtype).name} array of shape "
                            f"{tuple(arr.shape)}")
    if a.ndim < 1:
        raise ValueError("a: expected an array [..., K] of rank >= 1, got a scalar")
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-d weight [N, K], got shape {tuple(w.shape)}")
    k = a.shape[-1]
    if w.shape[1] != k:
        raise ValueError(f"w: expected shape (N, {k}) (K = the last axis of a, layout [N, K]), got shape "
                         f"{tuple(w.shape)}")
    n = w.shape[0]
    if a_scale is not None:
        a_scale = V.float_array("a_scale", a_scale)
        if a_scale.ndim == 0:
            a_scale = jnp.reshape(a_scale, (1,) * a.ndim)
        elif tuple(a_scale.shape) == tuple(a.shape[:-1]):
            a_scale = a_scale[..., None]
        else:
            raise ValueError(f"a_scale: expected a scalar or shape {tuple(a.shape[:-1])} (one per token of a), "
                             f"got shape {tuple(a_scale.shape)}")
        a_scale = a_scale.astype(jnp.float32)
    if w_scale is not None:
        w_scale = _vector("w_scale", w_scale, n, what="one scale per output channel N of w").astype(jnp.float32)
    if bias is not None:
        bias = _vector("bias", bias, n, what="one value per output channel N of w")
    has_ep = a_scale is not None or w_scale is not None or bias is not None
    dt = _out_dtype(out_dtype, np.float32 if has_ep else np.int32, allow_int32=not has_ep)
    args = [a, w] + [v for v in (a_scale, w_scale, bias) if v is not None]
    return int8_matmul_p.bind(*jax.lax.stop_gradient(args), has_a_scale=a_scale is not None,
                              has_w_scale=w_scale is not None, has_bias=bias is not None, out_dtype=dt,
                              config=_check_config(config), impl=backend.current_implementation())
