"""The ``jaxquant_fp8_matmul`` primitive: the fp8 GEMM with its scale epilogue, and its dispatch.

Operands: ``a [..., K]`` fp8 codes (``MAIN``: leading axes are tokens, folded into M), ``w [N, K]``
fp8 codes of the same format (``WEIGHT``), ``a_scale [..., L]`` float32 (``PARAM``; rowwise
``L = 1`` with a's leading axes or all ones (per tensor), blockwise ``L = ceil(K/128)``),
``w_scale`` float32 (``WEIGHT``; rowwise ``[N]`` or ``[1]``, blockwise ``[ceil(N/128),
ceil(K/128)]``), optional ``bias [N]`` (``WEIGHT``). Params: ``layout`` ("rowwise" / "blockwise"),
``out_dtype``, ``config``, ``impl``.

Dispatch (``plan``), once per call:

* the Mosaic GPU kernel (``jaxquant.pallas.fp8_matmul.mosaic``: warp-specialised, TMA-fed
  ``wgmma``) on Hopper for prefill shapes it ``supports`` (M, N, K multiples of its tile) that
  give at least ``mosaic.DISPATCH_MIN_TILES`` CTA tiles (``mosaic.worth_it``), or whenever a
  ``mosaic.Config`` is given;
* the Triton kernel (``jaxquant.pallas.fp8_matmul.triton``) otherwise: every shape, masked edges,
  split K at decode;
* the reference (``reference.py``) on the CPU (and with ``jaxquant.implementation("reference")``).

Neither kernel is bit-exact with the reference (tensor-core accumulation order and precision);
``reference.bound`` is the guarantee.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant.core import sharding as shd
from jaxquant.core.device import is_hopper, num_sms
from jaxquant.core.primitive import MAIN, PARAM, WEIGHT, Choice, Op, Operand
from jaxquant.pallas.fp8_matmul import mosaic as mg_k
from jaxquant.pallas.fp8_matmul import triton as tr_k
from jaxquant.primitives.fp8_matmul.reference import BLOCK, epilogue, fp8_matmul_reference

__all__ = ["fp8_matmul_op", "plan", "use_mosaic"]

PRECISION = ("fp8 codes multiplied exactly, summed in float32 promoted every 128 of K (tensor cores keep ~14 "
             "bits within a chunk); within (2**-9 + 2**-16) * sum|a w scales| + 2 eps(out) |y| of the float32 "
             "reference on Hopper; deterministic")


def use_mosaic(m, n, k, *, layout, config, device_kind, interpret) -> bool:
    """Whether the ``[m, k] x [n, k]`` fp8 GEMM runs the Mosaic GPU kernel (module docstring)."""
    if isinstance(config, mg_k.Config):
        if interpret:
            raise ValueError("config: a fp8_matmul.mosaic.Config has no interpret mode (Mosaic GPU runs on Hopper "
                             "GPUs only); use a jaxquant.pallas.fp8_matmul.triton.Config")
        if not mg_k.supports(m, n, k, layout=layout, config=config):
            raise ValueError(f"config: {config} needs {mg_k.scope(config, layout)}; got M={m}, N={n}, K={k}")
        return True
    if config is not None or interpret or not is_hopper(device_kind):
        return False
    cfg = mg_k.heuristics(m, n, k, layout=layout)
    return mg_k.supports(m, n, k, layout=layout, config=cfg) and mg_k.worth_it(m, n, cfg)


def plan(m, n, k, *, layout, config, device_kind, interpret) -> Choice:
    """The kernel and its config for an ``[m, k] x [n, k]`` fp8 GEMM."""
    if use_mosaic(m, n, k, layout=layout, config=config, device_kind=device_kind, interpret=interpret):
        return Choice("mosaic_gpu", config or mg_k.heuristics(m, n, k, layout=layout),
                      (f"jaxquant_fp8_gemm_{layout}_mgpu",))
    cfg = config or tr_k.heuristics(m, n, max(k, 32), layout=layout)
    bk = min(cfg.block_k, max(tr_k.MIN_BLOCK_K, tr_k.next_pow2(k))) if k else 32
    split = tr_k.effective_split(cfg.split_k, k, bk) if k else 1
    return Choice("triton", cfg, (f"jaxquant_fp8_matmul_{layout}",), interpret=interpret,
                  workspace_bytes=4 * split * m * n if split > 1 else 0)


def _flat(a):
    return math.prod(a.shape[:-1]), a.shape[-1]


def _operands(a, a_scale, layout):
    """2-d ``a [M, K]`` and ``a_scale`` ``[M, L]`` (or ``[1, 1]``: one per-tensor scale, rowwise)."""
    m, k = _flat(a)
    width = a_scale.shape[-1]
    if layout == "rowwise" and a_scale.size == 1:
        s2 = jnp.reshape(a_scale, (1, 1))
    else:
        s2 = jnp.reshape(jnp.broadcast_to(a_scale, a.shape[:-1] + (width,)), (m, width))
    return jnp.reshape(a, (m, k)), s2.astype(jnp.float32)


def _abstract(*, a, w, a_scale, w_scale, bias, layout, out_dtype, config, impl):
    return jax.core.ShapedArray(a.shape[:-1] + (w.shape[0],), out_dtype)


def _reference(*, a, w, a_scale, w_scale, bias, layout, out_dtype, config, impl):
    a2, s2 = _operands(a, a_scale, layout)
    y = fp8_matmul_reference(a2, w, s2, w_scale, bias, layout=layout, out_dtype=out_dtype)
    return jnp.reshape(y, a.shape[:-1] + (w.shape[0],))


def _dispatch(avals, params, *, device_kind, interpret):
    m, k = _flat(avals["a"])
    return plan(m, avals["w"].shape[0], k, layout=params["layout"], config=params["config"],
                device_kind=device_kind, interpret=interpret)


def _kernel(choice, *, a, w, a_scale, w_scale, bias, layout, out_dtype, config, impl):
    a2, s2 = _operands(a, a_scale, layout)
    if choice.implementation == "mosaic_gpu":
        y = mg_k.fp8_matmul_mgpu(a2, w, s2, w_scale, bias, layout=layout, out_dtype=out_dtype, config=choice.config,
                                 num_sms=num_sms())
    else:
        y = tr_k.fp8_matmul(a2, w, s2, w_scale, bias, layout=layout, out_dtype=out_dtype, config=choice.config,
                            interpret=choice.interpret)
    return jnp.reshape(y, a.shape[:-1] + (w.shape[0],))


# ------------------------------------------------------------------------------------------
# Sharding (docs/sharding.md)
# ------------------------------------------------------------------------------------------


def _sharding(avals, params):
    """Tokens and N local: each device runs the GEMM on its rows / its weight rows (with their
    scales and bias) in the one-device config: bit-exact. K split (row parallel): float32 partial
    sums per device (rowwise unscaled; blockwise with each 128-block's scales, as one device sums
    them), one float32 all-reduce of ``[M, N]``, then the epilogue (rowwise scales, bias, cast):
    within float32 reassociation of one device. Blockwise scales cover 128-wide blocks of K (and of
    N for the weight), so N and K split only into whole blocks per device; a split that would cut
    a block keeps that dimension whole (XLA gathers along it) and warns."""
    a, w, a_scale, w_scale = avals["a"], avals["w"], avals["a_scale"], avals["w_scale"]
    fm = shd.leading("m", a.ndim - 1)
    k, n = a.shape[-1], w.shape[0]
    if params["layout"] == "blockwise":
        # a dimension that is not whole blocks cannot be split evenly into whole blocks: its
        # scale blocks get a factor of their own and both stay whole
        ragged = tuple(d for d, size in (("k", k), ("n", n)) if size % BLOCK)
        kb, nb = ("kb" if "k" in ragged else "k"), ("nb" if "n" in ragged else "n")
        sa_last, fws = kb, (nb, kb)
        replicated = tuple(f for d in ragged for f in (d, d + "b"))
    else:
        sa_last, fws, replicated = "asl", (("n",) if w_scale.shape[0] == n else ("ws",)), ()
    operands = {"a": fm + ("k",), "w": ("n", "k"),
                "a_scale": shd.broadcast_factors(fm, a.shape[:-1], a_scale.shape[:-1], "as") + (sa_last,),
                "w_scale": fws}
    if avals["bias"] is not None:
        operands["bias"] = ("n",)
    return shd.Rule(operands, (fm + ("n",),), reduction=() if "k" in replicated else ("k",),
                    replicated=replicated, per_shard=_split_k, pin=functools.partial(_pin, params["layout"]),
                    check=functools.partial(_check_layout, params["layout"], k, n))


def _pin(layout, choice, avals):
    """Token- / N-split shards run the one-device kernel config (the same K chunks and split: the
    same float32 summation order, so the same bits), when it serves the shard's shape."""
    if choice.implementation == "triton":
        return choice.config
    m, k = _flat(avals["a"])
    if choice.implementation == "mosaic_gpu" and mg_k.supports(m, avals["w"].shape[0], k, layout=layout,
                                                               config=choice.config):
        return choice.config
    return None


def _check_layout(layout, k, n, uneven, mesh):
    """Blockwise: warn where the requested layout would cut the 128-wide scale blocks."""
    for dim, size in (("K", k), ("N", n)):
        axes = uneven.get(dim.lower())
        if layout != "blockwise" or not axes:
            continue
        parts = math.prod(mesh.shape[ax] for ax in axes)
        warnings.warn(
            f"fp8_matmul (blockwise): the layout splits {dim}={size} over mesh axes {axes} ({parts} devices), which "
            f"would cut the {BLOCK}-wide scale blocks ({dim} / {parts} = {size / parts:g}); {dim} is kept whole on "
            f"every device (XLA gathers the operands along it). Split {dim} into multiples of {BLOCK} per device "
            f"to keep the GEMM local.", stacklevel=2)


def _split_k(shard, arrays, params):
    """K split: float32 partial sums per device, summed across devices, then the epilogue."""
    a, layout = arrays["a"], params["layout"]
    if layout == "rowwise":  # unit scales: the kernel returns the unscaled float32 sum
        sa, sw = jnp.ones((1,) * a.ndim, jnp.float32), jnp.ones((1,), jnp.float32)
    else:  # each 128-block's partial sum scaled inside the GEMM, as on one device
        sa, sw = arrays["a_scale"], arrays["w_scale"]
    part = fp8_matmul_op(a, arrays["w"], sa, sw, None, layout=layout, out_dtype=np.dtype(np.float32), config=None,
                         impl=params["impl"])
    m, n = math.prod(a.shape[:-1]), arrays["w"].shape[0]
    acc = shard.psum(jnp.reshape(part, (m, n)), "k")
    _, s2 = _operands(a, arrays["a_scale"], layout)
    y = epilogue(acc, s2, arrays["w_scale"], arrays["bias"], layout=layout, out_dtype=params["out_dtype"])
    return jnp.reshape(y, a.shape[:-1] + (n,))


fp8_matmul_op = Op(
    "jaxquant_fp8_matmul",
    [Operand("a", MAIN), Operand("w", WEIGHT), Operand("a_scale", PARAM), Operand("w_scale", WEIGHT),
     Operand("bias", WEIGHT, optional=True)],
    abstract_eval=_abstract, reference=_reference, kernel=_kernel, dispatch=_dispatch, precision=PRECISION,
    sharding=_sharding)


def bind(a, w, a_scale, w_scale, bias=None, *, layout, out_dtype, config=None, impl="auto"):
    """Bind on validated operands (module docstring)."""
    return fp8_matmul_op(a, w, a_scale, w_scale, bias, layout=layout, out_dtype=np.dtype(out_dtype), config=config,
                         impl=impl)
