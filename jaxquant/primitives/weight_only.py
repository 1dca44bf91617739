"""``weight_only_linear``: W4A16 / W8A16 linear layers over a ``QuantizedWeight`` (``y = x @ W^T``).

The primitive ``jaxquant_weight_only_linear`` takes ``x [..., K]``, the weight's ``codes``,
``scale``, optional ``zero_point`` and optional ``bias [N]``, and returns ``y [..., N]`` in
x's dtype. Lowering: CUDA -> the fused dequant-matmul Pallas kernel: ``jaxquant.pallas.weight_only``
(Triton; one ``pallas_call``, plus one small XLA reduction when K is split) or, for prefill on
Hopper, ``jaxquant.pallas.weight_only_mgpu`` (Mosaic GPU; ``use_mgpu`` decides); CPU -> the
plain-jnp reference below (``jaxquant.backend`` overrides the choice).
Batching: a batched ``x`` folds its batch axis into the leading (M) dimensions, so ``vmap``
is still one kernel launch; a batched weight maps the op over the weights (``lax.map``).

Reference (the spec of the forward)::

    W = (q - zp) * scale                     float32 [N, K] (jaxquant.weights.dequantize_weight)
    y = (dot(x.astype(f32), W^T, precision=HIGHEST, accumulate f32) + bias.astype(f32)).astype(x.dtype)

Backward (``custom_vjp``, for LoRA / QLoRA fine-tuning over frozen quantized weights)::

    dx    = dy @ W                           XLA: W dequantized to x's dtype (float32 for float32
                                             x), float32 accumulation, cast to x's dtype
    dbias = sum(dy over the leading axes)    in bias's dtype
    codes, scale, zero_point: no gradient (frozen; zero cotangents)
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

from jaxquant import backend
from jaxquant import weights as W
from jaxquant.pallas import weight_only as kernels
from jaxquant.pallas import weight_only_mgpu as wm_k
from jaxquant.pallas.mgpu_common import device_kind as _device_kind, is_hopper, num_sms as _num_sms
from jaxquant.primitives._register import register

__all__ = ["weight_only_linear", "weight_only_linear_p", "reference_weight_only_linear", "use_mgpu", "kernel_config"]

_X_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))

weight_only_linear_p = Primitive("jaxquant_weight_only_linear")


def reference_weight_only_linear(x, codes, scale, zero_point, bias, *, bits, group_size, symmetric):
    """The plain-jnp spec (module docstring): dequantize to float32, float32 dot, bias, cast."""
    w = W.dequantize_weight_raw(codes, scale, zero_point, bits=bits, group_size=group_size, symmetric=symmetric,
                                dtype=jnp.float32)
    y = jax.lax.dot_general(x.astype(jnp.float32), w, (((x.ndim - 1,), (1,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _split(args, has_zp, has_bias):
    x, codes, scale = args[:3]
    rest = list(args[3:])
    zp = rest.pop(0) if has_zp else None
    bias = rest.pop(0) if has_bias else None
    return x, codes, scale, zp, bias


def _abstract_eval(x, codes, scale, *rest, bits, group_size, symmetric, k, has_zp, has_bias, config, impl):
    return jax.core.ShapedArray(x.shape[:-1] + (codes.shape[0],), x.dtype)


def _lowering(platform):
    def rule(ctx, *args, bits, group_size, symmetric, k, has_zp, has_bias, config, impl):
        use = backend.resolve(impl, platform)

        def fn(*a):
            x, codes, scale, zp, bias = _split(a, has_zp, has_bias)
            if use == "reference" or not kernels.supports(bits, group_size):
                # (groups smaller than the kernel's MIN_GROUP: XLA's dequantize-then-dot)
                return reference_weight_only_linear(x, codes, scale, zp, bias, bits=bits, group_size=group_size,
                                                    symmetric=symmetric)
            lead = x.shape[:-1]
            m = math.prod(lead)
            x2 = jnp.reshape(x, (m, k))
            interpret = use == "interpret"
            mgpu = use_mgpu(m, codes.shape[0], k, bits=bits, group_size=group_size, x_dtype=x.dtype, config=config,
                            device_kind=None if interpret else _device_kind(), interpret=interpret)
            if mgpu:
                y = wm_k.weight_only_matmul_mgpu(x2, codes, scale, zp, bias, bits=bits, group_size=group_size,
                                                 symmetric=symmetric, k=k, config=config, num_sms=_num_sms())
            else:
                y = kernels.weight_only_matmul(x2, codes, scale, zp, bias, bits=bits, group_size=group_size,
                                               symmetric=symmetric, k=k, config=config, interpret=interpret)
            return jnp.reshape(y, lead + (codes.shape[0],))

        return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)
    return rule


def use_mgpu(m, n, k, *, bits, group_size, x_dtype, config, device_kind, interpret) -> bool:
    """Whether an ``[m, k] x [n, k]`` weight-only matmul runs the Mosaic GPU kernel
    (``jaxquant.pallas.weight_only_mgpu``) rather than the Triton one.

    An explicit ``weight_only_mgpu.Config`` always does (the problem must fit it: else a
    ValueError naming ``config``). With no config: on Hopper (``device_kind`` names an H100 / H200
    / H800 / H20), for M >= ``weight_only_mgpu.MIN_M`` (decode keeps the Triton kernel's split-K
    tiles, which stream the weights on every SM) when the kernel supports the problem (bfloat16
    x, bits 4 / 8, per channel or groups of 64 / 128 / 256, N a multiple of its CTA rows, K of
    128) and its tiles number at least ``weight_only_mgpu.MIN_TILES`` (else Triton's split K
    fills the GPU better: M = 128 on N = 4096 was 0.63x bf16 with Triton, 0.50x here). Otherwise
    Triton.
    """
    if m == 0 or n == 0 or k == 0:
        return False  # an empty problem: no kernel runs (the Triton path returns zeros / the bias)
    if isinstance(config, wm_k.Config):
        if interpret:
            raise ValueError("config: a weight_only_mgpu.Config has no interpret mode (Mosaic GPU runs on Hopper "
                             "GPUs only); use a jaxquant.pallas.weight_only.Config")
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
    (a ``weight_only_mgpu.Config`` or a ``weight_only.Config``): what benchmarks report."""
    if use_mgpu(m, n, k, bits=bits, group_size=group_size, x_dtype=x_dtype, config=None, device_kind=device_kind,
                interpret=False):
        return wm_k.heuristics(m, n, k, bits, group_size)
    return kernels.heuristics(m, n, k, bits, group_size)


def _batch(args, dims, **params):
    x, *wargs = args
    dx, *wdims = dims
    if all(d is None for d in wdims):
        # fold the batch axis of x into its leading (M) dimensions
        return weight_only_linear_p.bind(jnp.moveaxis(x, dx, 0), *wargs, **params), 0
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [jnp.broadcast_to(a[None], (size,) + a.shape) if d is None else jnp.moveaxis(a, d, 0)
             for a, d in zip(args, dims)]
    return jax.lax.map(lambda t: weight_only_linear_p.bind(*t, **params), tuple(moved)), 0


register(weight_only_linear_p, abstract_eval=_abstract_eval, lowering=_lowering, batch=_batch)


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static facts of one call (hashable: the custom_vjp closure is cached on it)."""

    bits: int
    group_size: int | None
    symmetric: bool
    shape: tuple
    has_zp: bool
    has_bias: bool
    config: kernels.Config | wm_k.Config | None
    impl: str


def _bind(spec: _Spec, x, codes, scale, zp, bias):
    args = [x, codes, scale] + ([zp] if spec.has_zp else []) + ([bias] if spec.has_bias else [])
    return weight_only_linear_p.bind(*args, bits=spec.bits, group_size=spec.group_size, symmetric=spec.symmetric,
                                     k=spec.shape[1], has_zp=spec.has_zp, has_bias=spec.has_bias,
                                     config=spec.config, impl=spec.impl)


@functools.lru_cache(maxsize=None)
def _linear_fn(spec: _Spec):
    @jax.custom_vjp
    def f(x, codes, scale, zp, bias):
        return _bind(spec, x, codes, scale, zp, bias)

    def fwd(x, codes, scale, zp, bias):
        return f(x, codes, scale, zp, bias), (x, codes, scale, zp, bias)

    def bwd(res, dy):
        x, codes, scale, zp, bias = res
        wdt = jnp.float32 if np.dtype(x.dtype) == np.float32 else x.dtype
        w = W.dequantize_weight_raw(codes, scale, zp, bits=spec.bits, group_size=spec.group_size,
                                    symmetric=spec.symmetric, dtype=wdt)
        dx = jax.lax.dot_general(dy.astype(wdt), w, (((dy.ndim - 1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(x.dtype)
        db = None
        if bias is not None:
            db = jnp.sum(dy.astype(jnp.float32), axis=tuple(range(dy.ndim - 1))).astype(bias.dtype)
        return dx, None, None, None, db

    f.defvjp(fwd, bwd)
    return f


def weight_only_linear(x, qweight, bias=None, *, config: kernels.Config | wm_k.Config | None = None):
    """``y = x @ dequant(qweight)^T (+ bias)``, in x's dtype, with the dequantization fused in the matmul.

    Args:
      x: float16 / bfloat16 / float32 activations ``[..., K]`` (any leading dims, vmappable).
      qweight: a ``jaxquant.QuantizedWeight`` of shape ``(N, K)`` (bits 4 or 8, any group size,
        symmetric or not) from ``jaxquant.quantize_weight``.
      bias: optional float ``[N]``, added in float32 before the cast.
      config: a ``jaxquant.pallas.weight_only.Config`` (the Triton kernel) or a
        ``jaxquant.pallas.weight_only_mgpu.Config`` (the Hopper prefill kernel) overriding the
        heuristics, which pick the kernel (``use_mgpu``) and its tile.

    Forward: on a GPU one Pallas kernel streams the packed codes and dequantizes them in
    registers (float32 accumulation): on Hopper with bfloat16 x and prefill shapes (``use_mgpu``)
    the warp-specialised Mosaic GPU kernel, else the Triton kernel; on the CPU the reference
    dequantize-then-``dot``.
    Groups smaller than ``jaxquant.pallas.weight_only.MIN_GROUP`` (32 for int4, 16 for int8) take
    XLA's dequantize-then-dot. float32 x on a GPU follows ``jax.default_matmul_precision`` as XLA's float32 matmuls do there:
    TF32 tensor-core products by default, ~float32 (three TF32 products) under
    ``jax.default_matmul_precision("float32")`` (``jaxquant.pallas.weight_only.float32_dot_algorithm``).
    Backward (``custom_vjp``): ``dx = dy @ dequant(W)`` (XLA), ``dbias = sum(dy)``; the
    quantized weight is frozen (no gradient). Math and layout: ``jaxquant.weights`` and
    ``jaxquant.pallas.weight_only``.
    """
    if not (isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval")):
        if isinstance(x, (list, tuple, float, int)):
            x = jnp.asarray(x)
        else:
            raise TypeError(f"x: expected an array, got {type(x).__name__}")
    if np.dtype(x.dtype) not in _X_DTYPES:
        raise TypeError(f"x: expected a float16, bfloat16 or float32 array, got {np.dtype(x.dtype).name} "
                        f"of shape {tuple(x.shape)}")
    if x.ndim < 1:
        raise ValueError(f"x: expected shape [..., K] (rank >= 1), got a scalar")
    qweight = W.check_quantized_weight("qweight", qweight)
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: expected the last axis to be K = {k} (qweight of shape (N, K) = {qweight.shape}), "
                         f"got x of shape {tuple(x.shape)}")
    if bias is not None:
        if not hasattr(bias, "dtype"):
            bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating) or np.dtype(bias.dtype) == np.float64:
            raise TypeError(f"bias: expected a float16, bfloat16 or float32 array, got {np.dtype(bias.dtype).name}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias: expected shape ({n},) (N of qweight {qweight.shape}), got {tuple(bias.shape)}")
    if config is not None and not isinstance(config, (kernels.Config, wm_k.Config)):
        raise TypeError(f"config: expected a jaxquant.pallas.weight_only.Config, a "
                        f"jaxquant.pallas.weight_only_mgpu.Config or None, got {config!r}")
    spec = _Spec(qweight.bits, qweight.group_size, qweight.symmetric, qweight.shape,
                 qweight.zero_point is not None, bias is not None, config, backend.current_implementation())
    return _linear_fn(spec)(x, qweight.codes, qweight.scale, qweight.zero_point, bias)
