"""The W8A8 primitives ``jaxquant_quantized_linear`` and ``jaxquant_int8_matmul`` and their dispatch.

Kernel path of ``quantized_linear``: the fused per-token quantization kernel
(``jaxquant.pallas.dynamic.triton``; a static scale: ``jaxquant.pallas.affine.triton``) writes
int8 codes + scales, then the GEMM applies the epilogue in registers — the int32 ``[M, N]``
accumulator never reaches device memory. The GEMM is the Triton kernel
(``jaxquant.pallas.int8_matmul.triton``: any shape, masked edges, split K at decode) or, on Hopper
for prefill shapes that fit its tile and have no bias, the Mosaic GPU kernel
(``jaxquant.pallas.int8_matmul.mosaic``: warp-specialised, TMA-fed; ``use_mgpu`` decides). Both
are bit-exact with the reference epilogue. For ``M <= fused_quantize_max_m(device)`` one Triton
kernel quantizes the activation tiles itself (one launch, ``Choice.variant == "fused"``); on the
H200 that measured slower at every M, so it is off there (``linear_kernel(..., fuse=True)``
forces it). ``plan_linear`` / ``plan_gemm`` make these choices once per call.

Batching (``vmap``) folds batch dimensions of x into M (one launch); a batched weight maps the
op over the batch (``lax.map``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran
from jaxquant.core import sharding as shd
from jaxquant.core.device import device_kind as _device_kind, is_hopper, num_sms
from jaxquant.core.numerics import int8_epilogue
from jaxquant.core.primitive import PARAM, WEIGHT, Choice, Op, Operand
from jaxquant.pallas.affine import triton as affine_k
from jaxquant.pallas.dynamic import triton as dynamic_k
from jaxquant.pallas.int8_matmul import mosaic as mg_k
from jaxquant.pallas.int8_matmul import triton as mm_k
from jaxquant.primitives.affine import primitive as affine_p
from jaxquant.primitives.dynamic.primitive import global_row_qparams
from jaxquant.primitives.int8_matmul.reference import QMAX, QMIN, int8_matmul_reference, linear_reference

__all__ = ["quantized_linear_op", "int8_matmul_op", "use_mgpu", "gemm_config", "plan_linear", "plan_gemm",
           "linear_kernel", "int8_matmul_kernel"]

PRECISION = ("bit-exact with jaxquant's reference: exact int32 accumulation, float32 epilogue "
             "(f32(acc) * s_a) * w_scale + bias with two roundings; deterministic")


# ------------------------------------------------------------------------------------------
# Choosing the GEMM (once per call)
# ------------------------------------------------------------------------------------------


def use_mgpu(m, n, k, *, has_a_scale, has_w_scale, out_dtype, config, device_kind, interpret,
             has_bias=False) -> bool:
    """Whether the int8 GEMM of an ``[m, k] x [n, k]`` problem runs the Mosaic GPU kernel.

    An explicit ``int8_matmul.mosaic.Config`` always does (its shape must fit it). With no config:
    on Hopper (``device_kind`` names an H100 / H200 / H800 / H20), with both scales (a float
    epilogue) and no bias, when the shape is a multiple of its tile and gives at least
    ``mosaic.MIN_TILES`` CTA tiles (below that the Triton kernel's smaller tiles keep more SMs
    busy). Otherwise Triton.

    No bias: Mosaic GPU contracts the epilogue's ``(y * w_scale) + bias`` into one FMA, which
    under cancellation moved float32 results by up to ~3e5 ulps from the reference's two roundings
    on an H200; the Triton kernel keeps them apart (``mul.rn``) and stays bit-exact, so a layer
    with a bias runs there.
    """
    if isinstance(config, mg_k.Config):
        if interpret:
            raise ValueError("config: an int8_matmul.mosaic.Config has no interpret mode (Mosaic GPU runs on "
                             "Hopper GPUs only); use a jaxquant.pallas.int8_matmul.triton.Config")
        if not (has_a_scale and has_w_scale and np.dtype(out_dtype) != np.int32):
            raise ValueError("config: an int8_matmul.mosaic.Config needs the float epilogue (a_scale and w_scale)")
        if has_bias:
            raise ValueError("config: an int8_matmul.mosaic.Config takes no bias (its epilogue would contract "
                             "the bias add into an FMA: not bit-exact); use a jaxquant.pallas.int8_matmul.triton.Config")
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


def plan_gemm(m, n, k, *, has_a_scale, has_w_scale, has_bias, out_dtype, config, device_kind, interpret,
              a_mode="int8") -> Choice:
    """The GEMM kernel and its config for an ``[m, k] x [n, k]`` problem (``a_mode``: the Triton
    kernel's activation input, see ``int8_matmul.triton``)."""
    if a_mode == "int8" and use_mgpu(m, n, k, has_a_scale=has_a_scale, has_w_scale=has_w_scale,
                                     out_dtype=out_dtype, config=config, device_kind=device_kind,
                                     interpret=interpret, has_bias=has_bias):
        return Choice("mosaic_gpu", config or mg_k.heuristics(m, n, k), ("jaxquant_w8a8_gemm_mgpu",))
    cfg = config or mm_k.heuristics(m, n, k or 16, device_kind=device_kind)  # (K = 0 runs as 16 zeros)
    split = mm_k.effective_split(cfg.split_k, k, min(cfg.block_k, max(mm_k.MIN_BLOCK_K, mm_k.next_pow2(k))),
                                 a_mode, m) if k else 1
    return Choice("triton", cfg, (f"jaxquant_int8_matmul_{a_mode}",), interpret=interpret,
                  workspace_bytes=4 * split * m * n if split > 1 else 0)


def gemm_config(m, n, k, *, device_kind, has_bias=False, out_dtype=np.float32):
    """The GEMM tile ``quantized_linear`` picks for ``[m, k] x [n, k]`` with no explicit config
    (an ``int8_matmul.mosaic.Config`` or an ``int8_matmul.triton.Config``): what benchmarks report."""
    return plan_gemm(m, n, k, has_a_scale=True, has_w_scale=True, has_bias=has_bias, out_dtype=out_dtype,
                     config=None, device_kind=device_kind, interpret=False).config


def plan_linear(m, n, k, *, has_bias, static, out_dtype, config, device_kind, interpret, fuse=None) -> Choice:
    """``quantized_linear``'s kernels for an ``[m, k]`` activation and an ``[n, k]`` weight."""
    if fuse is None:
        fuse = m <= mm_k.fused_quantize_max_m(device_kind) and not isinstance(config, mg_k.Config)
    if fuse and isinstance(config, mg_k.Config):
        raise ValueError("config: the Mosaic GPU GEMM (int8_matmul.mosaic.Config) takes int8 activations; "
                         "fuse=True needs a jaxquant.pallas.int8_matmul.triton.Config or None")
    mode = "static" if static else "dynamic"
    if fuse and m * k <= mm_k.MAX_ELEMENTS:
        gemm = plan_gemm(m, n, k, has_a_scale=True, has_w_scale=True, has_bias=has_bias, out_dtype=out_dtype,
                         config=config, device_kind=device_kind, interpret=interpret, a_mode=mode)
        return dataclasses.replace(gemm, variant="fused")
    gemm = plan_gemm(m, n, k, has_a_scale=True, has_w_scale=True, has_bias=has_bias, out_dtype=out_dtype,
                     config=config, device_kind=device_kind, interpret=interpret)
    quant = "jaxquant_quantize" if static else "jaxquant_dynamic_quantize"
    return dataclasses.replace(gemm, kernels=(quant,) + gemm.kernels,
                               workspace_bytes=gemm.workspace_bytes + m * k + 4 * m)


# ------------------------------------------------------------------------------------------
# Kernel paths (CUDA, or Pallas interpret mode)
# ------------------------------------------------------------------------------------------


def _row_chunks(m, per_row_elems):
    """Row ranges keeping every per-call array under 2**31 elements (module limit of the kernels)."""
    step = max(1, mm_k.MAX_ELEMENTS // max(1, per_row_elems))
    return [(r, min(m, r + step)) for r in range(0, m, step)]


def _split_n(fn, w, w_scale, bias, n, k):
    """Run ``fn(w, w_scale, bias) -> [M, n_chunk]`` on column chunks of the weight, concatenated."""
    step = max(1, mm_k.MAX_ELEMENTS // max(1, k))
    chunks = [(c, min(n, c + step)) for c in range(0, n, step)]
    if len(chunks) == 1:
        return fn(w, w_scale, bias)
    outs = [fn(w[c0:c1], None if w_scale is None else w_scale[c0:c1], None if bias is None else bias[c0:c1])
            for c0, c1 in chunks]
    return jnp.concatenate(outs, axis=1)


def _gemm(q, w, s, ws, b, *, out_dtype, choice: Choice, a_mode="int8"):
    """The GEMM with its epilogue, as ``choice`` says (Mosaic GPU or Triton)."""
    if choice.implementation == "mosaic_gpu":
        return mg_k.int8_matmul_mgpu(q, w, s, ws, out_dtype=out_dtype, config=choice.config, num_sms=num_sms())
    return mm_k.int8_matmul(q, w, a_scale=s, w_scale=ws, bias=b, a_mode=a_mode, out_dtype=out_dtype,
                            config=choice.config, interpret=choice.interpret)


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
                  device_kind=None, fuse=None, choice: Choice | None = None):
    """``quantized_linear`` on ``x2 [M, K]`` with the Pallas kernels (see the module docstring).

    ``choice``: the plan (``plan_linear``); by default made here from ``config``, ``device_kind``
    and ``fuse`` (quantize the activation inside the GEMM kernel; default
    ``M <= fused_quantize_max_m(device)``, measured per device).
    """
    m, k = x2.shape
    n = codes.shape[0]
    if choice is None:
        dk = device_kind if device_kind is not None else (None if interpret else _device_kind())
        choice = plan_linear(m, n, k, has_bias=bias is not None, static=act_scale is not None, out_dtype=out_dtype,
                             config=config, device_kind=dk, interpret=interpret, fuse=fuse)
    if choice.variant == "fused":
        mode = "dynamic" if act_scale is None else "static"
        a_s = None if act_scale is None else jnp.reshape(act_scale, (1, 1)).astype(jnp.float32)
        return _split_n(lambda w, ws, b: _gemm(x2, w, a_s, ws, b, out_dtype=out_dtype, choice=choice, a_mode=mode),
                        codes, w_scale, bias, n, k)
    outs = []
    for r0, r1 in _row_chunks(m, max(k, n)):
        xr = x2 if (r0, r1) == (0, m) else x2[r0:r1]
        q, s = _quantize_rows_kernel(xr, act_scale, choice.interpret)
        outs.append(_split_n(lambda w, ws, b: _gemm(q, w, s, ws, b, out_dtype=out_dtype, choice=choice),
                             codes, w_scale, bias, n, k))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


def int8_matmul_kernel(a2, w, a_scale2=None, w_scale=None, bias=None, *, out_dtype, choice: Choice):
    m, k = a2.shape
    n = w.shape[0]
    outs = []
    for r0, r1 in _row_chunks(m, max(k, n)):
        ar = a2 if (r0, r1) == (0, m) else a2[r0:r1]
        sr = a_scale2
        if a_scale2 is not None and a_scale2.shape[0] != 1 and (r0, r1) != (0, m):
            sr = a_scale2[r0:r1]
        outs.append(_split_n(lambda w_, ws, b: _gemm(ar, w_, sr, ws, b, out_dtype=out_dtype, choice=choice),
                             w, w_scale, bias, n, k))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


# ------------------------------------------------------------------------------------------
# jaxquant_quantized_linear: (x [..., K] float, codes [N, K] int8, w_scale [N], [bias [N]], [act_scale []])
# ------------------------------------------------------------------------------------------


def _flat(x):
    return math.prod(x.shape[:-1]), x.shape[-1]


def _ql_abstract(*, x, codes, w_scale, bias, act_scale, out_dtype, config, impl):
    return jax.core.ShapedArray(x.shape[:-1] + (codes.shape[0],), out_dtype)


def _ql_reference(*, x, codes, w_scale, bias, act_scale, out_dtype, config, impl):
    m, k = _flat(x)
    y = linear_reference(jnp.reshape(x, (m, k)), codes, w_scale, bias, act_scale, out_dtype=out_dtype)
    return jnp.reshape(y, x.shape[:-1] + (codes.shape[0],))


def _ql_dispatch(avals, params, *, device_kind, interpret):
    m, k = _flat(avals["x"])
    return plan_linear(m, avals["codes"].shape[0], k, has_bias=avals["bias"] is not None,
                       static=avals["act_scale"] is not None, out_dtype=params["out_dtype"], config=params["config"],
                       device_kind=device_kind, interpret=interpret)


def _ql_kernel(choice, *, x, codes, w_scale, bias, act_scale, out_dtype, config, impl):
    m, k = _flat(x)
    y = linear_kernel(jnp.reshape(x, (m, k)), codes, w_scale, bias, act_scale, out_dtype=out_dtype, choice=choice)
    return jnp.reshape(y, x.shape[:-1] + (codes.shape[0],))


def _gemm_factors(lead_ndim):
    fm = shd.leading("m", lead_ndim)
    return fm + ("k",), ("n", "k"), fm + ("n",)


def _vector_factors(aval, name):
    return None if aval is None else (("n",) if aval.ndim == 1 else shd.leading(name, aval.ndim))


def _ql_sharding(avals, params):
    """Tokens and N local (output split over N with the weight); K split (row parallel): the
    per-token amax all-reduced (max), activation codes and int8 GEMM on the local K, int32
    accumulators summed across devices (exact), then the epilogue: bit-exact with one device."""
    fx, fw, fy = _gemm_factors(avals["x"].ndim - 1)
    operands = {"x": fx, "codes": fw, "w_scale": _vector_factors(avals["w_scale"], "ws")}
    if avals["bias"] is not None:
        operands["bias"] = _vector_factors(avals["bias"], "b")
    if avals["act_scale"] is not None:
        operands["act_scale"] = shd.leading("as", avals["act_scale"].ndim)
    return shd.Rule(operands, (fy,), reduction=("k",), per_shard=_ql_split_k)


def _int32_partials(shard, a2, w, impl):
    acc = int8_matmul_op(a2, w, None, None, None, out_dtype=np.dtype(np.int32), config=None, impl=impl)
    return shard.psum(acc, "k")  # int32: exact in any order


def _ql_split_k(shard, arrays, params):
    x, act_scale, impl = arrays["x"], arrays["act_scale"], params["impl"]
    m, k = _flat(x)
    x2 = jnp.reshape(x, (m, k))
    if act_scale is None:
        s, zp = global_row_qparams(shard, x2, "k", qmin=QMIN, qmax=QMAX, symmetric=True, out_dtype=np.int8,
                                   impl=impl)
    else:
        s, zp = jnp.reshape(act_scale, (1, 1)).astype(jnp.float32), None
    q = affine_p.bind("quantize", x2, scale=s, zero_point=zp, qmin=QMIN, qmax=QMAX, out_dtype=np.int8, impl=impl)
    acc = _int32_partials(shard, q, arrays["codes"], impl)
    y = int8_epilogue(acc, s, arrays["w_scale"], arrays["bias"], params["out_dtype"])
    return jnp.reshape(y, x.shape[:-1] + (y.shape[-1],))


quantized_linear_op = Op(
    "jaxquant_quantized_linear",
    [Operand("x"), Operand("codes", WEIGHT), Operand("w_scale", WEIGHT), Operand("bias", WEIGHT, optional=True),
     Operand("act_scale", WEIGHT, optional=True)],
    abstract_eval=_ql_abstract, reference=_ql_reference, kernel=_ql_kernel, dispatch=_ql_dispatch,
    precision=PRECISION, sharding=_ql_sharding)


# ------------------------------------------------------------------------------------------
# jaxquant_int8_matmul: (a [..., K] int8, w [N, K] int8, [a_scale [..., 1] or [1]*ndim], [w_scale [N]], [bias [N]])
# ------------------------------------------------------------------------------------------


def _mm_abstract(*, a, w, a_scale, w_scale, bias, out_dtype, config, impl):
    return jax.core.ShapedArray(a.shape[:-1] + (w.shape[0],), out_dtype)


def _mm_operands(a, a_scale):
    m, k = _flat(a)
    s2 = None
    if a_scale is not None:
        s2 = jnp.reshape(a_scale, (1, 1)) if a_scale.size == 1 else jnp.reshape(
            jnp.broadcast_to(a_scale, a.shape[:-1] + (1,)), (m, 1))
    return jnp.reshape(a, (m, k)), s2


def _mm_reference(*, a, w, a_scale, w_scale, bias, out_dtype, config, impl):
    a2, s2 = _mm_operands(a, a_scale)
    y = int8_matmul_reference(a2, w, s2, w_scale, bias, out_dtype=out_dtype)
    return jnp.reshape(y, a.shape[:-1] + (w.shape[0],))


def _mm_dispatch(avals, params, *, device_kind, interpret):
    m, k = _flat(avals["a"])
    return plan_gemm(m, avals["w"].shape[0], k, has_a_scale=avals["a_scale"] is not None,
                     has_w_scale=avals["w_scale"] is not None, has_bias=avals["bias"] is not None,
                     out_dtype=params["out_dtype"], config=params["config"], device_kind=device_kind,
                     interpret=interpret)


def _mm_kernel(choice, *, a, w, a_scale, w_scale, bias, out_dtype, config, impl):
    a2, s2 = _mm_operands(a, a_scale)
    y = int8_matmul_kernel(a2, w, s2, w_scale, bias, out_dtype=out_dtype, choice=choice)
    return jnp.reshape(y, a.shape[:-1] + (w.shape[0],))


def _mm_sharding(avals, params):
    """As ``quantized_linear``: tokens and N local; K split: int32 partial accumulators summed
    across devices (exact), then the epilogue."""
    fa, fw, fy = _gemm_factors(avals["a"].ndim - 1)
    operands = {"a": fa, "w": fw}
    if avals["a_scale"] is not None:
        operands["a_scale"] = shd.broadcast_factors(fa, avals["a"].shape, avals["a_scale"].shape, "as")
    for name in ("w_scale", "bias"):
        if avals[name] is not None:
            operands[name] = _vector_factors(avals[name], name)
    return shd.Rule(operands, (fy,), reduction=("k",), per_shard=_mm_split_k)


def _mm_split_k(shard, arrays, params):
    a = arrays["a"]
    a2, s2 = _mm_operands(a, arrays["a_scale"])
    acc = _int32_partials(shard, a2, arrays["w"], params["impl"])
    y = int8_epilogue(acc, s2, arrays["w_scale"], arrays["bias"], params["out_dtype"])
    return jnp.reshape(y, a.shape[:-1] + (y.shape[-1],))


int8_matmul_op = Op(
    "jaxquant_int8_matmul",
    [Operand("a"), Operand("w", WEIGHT), Operand("a_scale", PARAM, optional=True),
     Operand("w_scale", WEIGHT, optional=True), Operand("bias", WEIGHT, optional=True)],
    abstract_eval=_mm_abstract, reference=_mm_reference, kernel=_mm_kernel, dispatch=_mm_dispatch,
    precision=PRECISION, sharding=_mm_sharding)
