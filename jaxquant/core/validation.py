"""Trace-time argument checks. Every error names the argument, what was expected and what was given."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from jaxquant import granularity as gran

FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
INT_CODE_DTYPES = tuple(np.dtype(d) for d in (jnp.int8, jnp.uint8, jnp.int16, jnp.int32))
# Largest integer magnitude every float code dtype represents exactly.
_FLOAT_EXACT = {np.dtype(jnp.float16): 2**11, np.dtype(jnp.bfloat16): 2**8,
                np.dtype(jnp.float32): 2**24, np.dtype(jnp.float64): 2**53}


def _desc(x) -> str:
    return f"{np.dtype(x.dtype).name} array of shape {tuple(x.shape)}"


def as_array(name: str, x):
    if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "aval"):
        return x
    if isinstance(x, (int, float, np.number, list, tuple)):
        return jnp.asarray(x)
    raise TypeError(f"{name}: expected an array, got {type(x).__name__}")


def float_array(name: str, x):
    x = as_array(name, x)
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 array, got a {_desc(x)}")
    return x


def int_array(name: str, x):
    x = as_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer array, got a {_desc(x)}")
    return x


def code_dtype(name: str, dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name}: expected a dtype, got {dtype!r}") from None
    if dt not in INT_CODE_DTYPES + FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected an integer container (int8, uint8, int16, int32) or a float dtype for "
            f"real-valued codes, got {dt.name}")
    return dt


def _ordered_ints(qmin, qmax):
    for n, v in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{n}: expected a Python int, got {v!r}")
    qmin, qmax = int(qmin), int(qmax)
    if qmin > qmax:
        raise ValueError(f"qmin/qmax: expected qmin <= qmax, got qmin={qmin}, qmax={qmax}")
    return qmin, qmax


def code_range(dtype: np.dtype, qmin, qmax, *, dtype_name: str = "dtype"):
    """Validate (qmin, qmax) against the code dtype; fill defaults for integer containers."""
    if dtype in INT_CODE_DTYPES:
        info = np.iinfo(dtype)
        qmin = int(info.min) if qmin is None else qmin
        qmax = int(info.max) if qmax is None else qmax
        lo, hi = int(info.min), int(info.max)
    else:
        if qmin is None or qmax is None:
            raise ValueError(
                f"qmin/qmax: required when {dtype_name} is a float dtype ({dtype.name}); got qmin={qmin!r}, "
                f"qmax={qmax!r}")
        lo, hi = -_FLOAT_EXACT[dtype], _FLOAT_EXACT[dtype]
    qmin, qmax = _ordered_ints(qmin, qmax)
    if qmin < lo or qmax > hi:
        raise ValueError(
            f"qmin/qmax: the range [{qmin}, {qmax}] does not fit {dtype_name}={dtype.name} "
            f"(representable codes: [{lo}, {hi}])")
    return qmin, qmax


def free_range(qmin, qmax):
    """(qmin, qmax) for ops with no code dtype (fake_quantize, quantize_backward): any ints."""
    qmin, qmax = _ordered_ints(qmin, qmax)
    if max(abs(qmin), abs(qmax)) > 2**24:
        raise ValueError(f"qmin/qmax: expected |qmin|, |qmax| <= 2**24 (exact in float32), got [{qmin}, {qmax}]")
    return qmin, qmax


def concrete(x):
    """x as a numpy array when its value is known at trace time (not a tracer), else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def positive_scale(name: str, scale):
    """A scale must be finite and > 0. Checked when its value is known at trace time (eager calls,
    constants under jit); a traced scale cannot be checked and follows the op's formula (docs/numerics.md:
    e.g. a zero scale saturates every non-zero code). Returns ``scale``."""
    v = concrete(scale)
    if v is not None and v.size:
        vf = v.astype(np.float64)
        bad = ~(np.isfinite(vf) & (vf > 0))
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0]) if v.ndim else ()
            raise ValueError(f"{name}: expected finite values > 0, got {vf[idx] if v.ndim else float(vf)}"
                             f"{f' at index {idx}' if v.ndim else ''} ({int(bad.sum())} of {v.size} invalid)")
    return scale


def params(x, scale, zero_point, granularity, *, x_name: str = "x"):
    """Check scale / zero point against x and the granularity. Returns (scale, zero_point)."""
    gran.check_granularity(granularity, x.shape, arg=x_name)
    expected = gran.param_shape(granularity, x.shape)
    scale = positive_scale("scale", float_array("scale", scale))
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale: expected shape {expected} for {granularity!r} on {x_name} of shape {tuple(x.shape)}, "
            f"got shape {tuple(scale.shape)}")
    if zero_point is not None:
        zero_point = int_array("zero_point", zero_point)
        if tuple(zero_point.shape) != expected:
            raise ValueError(
                f"zero_point: expected shape {expected} for {granularity!r} on {x_name} of shape "
                f"{tuple(x.shape)}, got shape {tuple(zero_point.shape)}")
    return scale, zero_point


def same_shape(name: str, a, ref_name: str, ref):
    if tuple(a.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: expected the shape of {ref_name} {tuple(ref.shape)}, got {tuple(a.shape)}")


ACTIVATION_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))


def activation(name: str, x):
    """A float16 / bfloat16 / float32 array ``[..., K]`` (the activations of a linear layer)."""
    x = as_array(name, x)
    if np.dtype(x.dtype) not in ACTIVATION_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16 or float32 array, got a {_desc(x)}")
    if x.ndim < 1:
        raise ValueError(f"{name}: expected an array [..., K] of rank >= 1, got a scalar")
    return x


def vector(name: str, v, n: int, *, what: str):
    """A float array of shape ``(n,)`` (a bias or per-channel scale; ``what`` says what n counts)."""
    v = float_array(name, v)
    if tuple(v.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},) ({what}), got shape {tuple(v.shape)}")
    return v


def config(name: str, value, *classes):
    """None or an instance of one of the kernel ``Config`` classes."""
    if value is not None and not isinstance(value, classes):
        names = ", a ".join(f"{c.__module__}.{c.__qualname__}" for c in classes)
        raise TypeError(f"{name}: expected a {names} or None, got {value!r}")
    return value
