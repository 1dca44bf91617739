"""The ``jaxquant_weight_only_linear`` primitive and its dispatch.

Operands: ``x [..., K]`` (``MAIN``), the weight's ``codes``, ``scale``, optional ``zero_point``
and optional ``bias [N]`` (``WEIGHT``); result ``y [..., N]`` in x's dtype. ``dispatch`` picks,
once per call:

* the Mosaic GPU prefill kernel (``jaxquant.pallas.weight_only.mosaic``) on Hopper for bfloat16 x
  at prefill shapes (``use_mgpu``), or for an explicit ``weight_only.mosaic.Config``;
* else the Triton kernel (``jaxquant.pallas.weight_only.triton``: one ``pallas_call``, plus one
  small XLA reduction of float32 partials when K is split);
* XLA's dequantize-then-dot (the reference) for groups smaller than the kernel's ``MIN_GROUP``.

Batching: a batched ``x`` folds its batch axis into the leading (M) dimensions (one launch); a
batched weight maps the op over the weights (``lax.map``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant.core import sharding as shd
from jaxquant.core.device import is_hopper, num_sms
from jaxquant.core.primitive import REFERENCE, WEIGHT, Choice, Op, Operand
from jaxquant.pallas.weight_only import mosaic as wm_k
from jaxquant.pallas.weight_only import triton as kernels
from jaxquant.primitives.weight_only.reference import weight_only_linear_reference

__all__ = ["weight_only_linear_op", "dispatch", "use_mgpu", "kernel_config"]

PRECISION = ("float32 accumulation of the exactly dequantized weights: within a float32 summation bound "
             "of jaxquant's reference (not bit-exact; the Triton and Mosaic GPU kernels sum in different "
             "orders); deterministic")


def use_mgpu(m, n, k, *, bits, group_size, x_dtype, config, device_kind, interpret) -> bool:
    """Whether an ``[m, k] x [n, k]`` weight-only matmul runs the Mosaic GPU kernel rather than Triton.

    An explicit ``weight_only.mosaic.Config`` always does (the problem must fit it: else a
    ValueError naming ``config``). With no config: on Hopper (``device_kind`` names an H100 / H200
    / H800 / H20), for M >= ``mosaic.MIN_M`` (decode keeps the Triton kernel's split-K tiles,
    which stream the weights on every SM) when the kernel supports the problem (bfloat16 x, bits
    4 / 8, per channel or groups of 64 / 128 / 256, N a multiple of its CTA rows, K of 128) and its
    tiles number at least ``mosaic.MIN_TILES`` (else Triton's split K fills the GPU better:
    M = 128 on N = 4096 was 0.63x bf16 with Triton, 0.50x here). Otherwise Triton.
    """
    if m == 0 or n == 0 or k == 0:
        return False  # an empty problem: no kernel runs (the Triton path returns zeros / the bias)
    if isinstance(config, wm_k.Config):
        if interpret:
            raise ValueError("config: a weight_only.mosaic.Config has no interpret mode (Mosaic GPU runs on Hopper "
                             "GPUs only); use a jaxquant.pallas.weight_only.triton.Config")
        if not wm_k.supports(m, n, k, bits, group_size, x_dtype, config=config):
            raise ValueError(f"config: {config} needs {wm_k.scope(config)}; got x {np.dtype(x_dtype).name}, "
                             f"bits={bits}, group_size={group_size}, M={m}, N={n}, K={k}")
        return True
    if config is not None or interpret or not is_hopper(device_kind) or m < wm_k.MIN_M:
        return False
    cfg = wm_k.heuristics(m, n, k, bits, group_size)
    return wm_k.supports(m, n, k, bits, group_size, x_dtype, config=cfg) and wm_k.enough_tiles(m, n, cfg)


def kernel_config(m, n, k, *, bits, group_size, x_dtype, device_kind):
    """The kernel tile ``weight_only_linear`` picks with no explicit config on ``device_kind``
    (a ``weight_only.mosaic.Config`` or a ``weight_only.triton.Config``): what benchmarks report."""
    if use_mgpu(m, n, k, bits=bits, group_size=group_size, x_dtype=x_dtype, config=None, device_kind=device_kind,
                interpret=False):
        return wm_k.heuristics(m, n, k, bits, group_size)
    return kernels.heuristics(m, n, k, bits, group_size, device_kind=device_kind)


def _abstract_eval(*, x, codes, scale, zero_point, bias, bits, group_size, symmetric, k, config, impl):
    return jax.core.ShapedArray(x.shape[:-1] + (codes.shape[0],), x.dtype)


def _reference(*, x, codes, scale, zero_point, bias, bits, group_size, symmetric, k, config, impl):
    return weight_only_linear_reference(x, codes, scale, zero_point, bias, bits=bits, group_size=group_size,
                                        symmetric=symmetric)


def dispatch(avals, params, *, device_kind, interpret):
    """The kernel and its config for one call (see the module docstring)."""
    bits, group_size, k, config = params["bits"], params["group_size"], params["k"], params["config"]
    if not kernels.supports(bits, group_size):
        return REFERENCE  # groups below MIN_GROUP: XLA's dequantize-then-dot
    x = avals["x"]
    m, n = math.prod(x.shape[:-1]), avals["codes"].shape[0]
    if m == 0 or n == 0 or k == 0:
        return Choice("triton", config, (), interpret=interpret)  # no kernel: zeros / the bias
    if use_mgpu(m, n, k, bits=bits, group_size=group_size, x_dtype=x.dtype, config=config, device_kind=device_kind,
                interpret=interpret):
        cfg = config or wm_k.heuristics(m, n, k, bits, group_size)
        return Choice("mosaic_gpu", cfg, (f"jaxquant_weight_only_w{bits}_mgpu",))
    cfg = config or kernels.heuristics(m, n, k, bits, group_size, device_kind=device_kind)
    _, split = kernels.k_plan(cfg, k, bits, group_size)
    return Choice("triton", cfg, (f"jaxquant_weight_only_w{bits}",), interpret=interpret,
                  workspace_bytes=4 * split * m * n if split > 1 else 0)


def _kernel(choice, *, x, codes, scale, zero_point, bias, bits, group_size, symmetric, k, config, impl):
    lead = x.shape[:-1]
    x2 = jnp.reshape(x, (math.prod(lead), k))
    if choice.implementation == "mosaic_gpu":
        y = wm_k.weight_only_matmul_mgpu(x2, codes, scale, zero_point, bias, bits=bits, group_size=group_size,
                                         symmetric=symmetric, k=k, config=choice.config, num_sms=num_sms())
    else:
        y = kernels.weight_only_matmul(x2, codes, scale, zero_point, bias, bits=bits, group_size=group_size,
                                       symmetric=symmetric, k=k, config=choice.config, interpret=choice.interpret)
    return jnp.reshape(y, lead + (codes.shape[0],))


def _sharding(avals, params):
    """Tokens and N local (output split over N with the weight). K split (row parallel): each
    device runs the kernel on its K block with float32 output, the partials are summed across
    devices (one float32 all-reduce of ``[M, N]``), then the bias is added and the sum cast to x's
    dtype: within a float32 summation bound of one device (docs/sharding.md). K may only be
    split where every device holds whole groups (and whole int4 bytes)."""
    fm = shd.leading("m", avals["x"].ndim - 1)
    fk = ("n", "k") if avals["scale"].ndim == 2 else ("n",)
    operands = {"x": fm + ("k",), "codes": ("n", "k"), "scale": fk}
    if avals["zero_point"] is not None:
        operands["zero_point"] = fk
    if avals["bias"] is not None:
        operands["bias"] = ("n",)
    check = functools.partial(_check_layout, params["k"], params["bits"], params["group_size"])
    return shd.Rule(operands, (fm + ("n",),), reduction=("k",), per_shard=_split_k, check=check,
                     pin=functools.partial(_pin, params["bits"], params["group_size"]))


def _pin(bits, group_size, choice, avals):
    """Token- / N-split shards run the one-device kernel config (the same K blocks and split: the
    same float32 summation order, so the same bits), when it serves the shard's shape."""
    if choice.implementation == "triton":
        return choice.config
    if choice.implementation == "mosaic_gpu":
        x, n = avals["x"], avals["codes"].shape[0]
        if wm_k.supports(math.prod(x.shape[:-1]), n, x.shape[-1], bits, group_size, x.dtype, config=choice.config):
            return choice.config
    return None


def _check_layout(k, bits, group_size, uneven, mesh):
    if "k" not in uneven:
        return
    axes = uneven["k"]
    n = math.prod(mesh.shape[a] for a in axes)
    unit = f"groups of {group_size}" if group_size else ("int4 byte pairs" if bits == 4 else "columns")
    raise ValueError(
        f"weight_only_linear: the layout splits K={k} over mesh axes {axes} ({n} devices), which would cut "
        f"the weight's {unit} (codes [N, {k * bits // 8}], K // n = {k / n:g}); each device must hold whole "
        f"groups: shard K over a multiple-of-{group_size or 2} block per device, or keep K whole "
        f"(replicate it / shard N instead)")


def _split_k(shard, arrays, params):
    x = arrays["x"]
    k = x.shape[-1]
    # float32 x: the kernel then returns float32 partials. bfloat16 / float16 values are exact in
    # float32 (and in TF32), so each product is what the one-device kernel computes.
    y = weight_only_linear_op(x.astype(jnp.float32), arrays["codes"], arrays["scale"], arrays["zero_point"], None,
                              bits=params["bits"], group_size=params["group_size"], symmetric=params["symmetric"],
                              k=k, config=None, impl=params["impl"])
    y = shard.psum(y, "k")
    if arrays["bias"] is not None:
        y = y + arrays["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


weight_only_linear_op = Op(
    "jaxquant_weight_only_linear",
    [Operand("x"), Operand("codes", WEIGHT), Operand("scale", WEIGHT), Operand("zero_point", WEIGHT, optional=True),
     Operand("bias", WEIGHT, optional=True)],
    abstract_eval=_abstract_eval, reference=_reference, kernel=_kernel, dispatch=dispatch, precision=PRECISION,
    sharding=_sharding)
