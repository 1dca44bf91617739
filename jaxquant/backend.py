"""Which implementation the primitives lower to.

=============  =====================================================================
``"auto"``     the default: the Pallas kernel when lowering for CUDA, the plain-jnp
               reference (``jaxquant.reference``) when lowering for the CPU
``"reference"`` the plain-jnp reference on every platform (e.g. to compare on a GPU)
``"pallas"``   the Pallas kernel; lowering for the CPU raises an error
``"interpret"`` the Pallas kernel in Pallas interpret mode (slow; the CPU test tier)
=============  =====================================================================

float64 data: the Triton kernels are not bit-exact in float64 yet, so under ``"auto"`` float64
ops lower to the XLA reference on CUDA too (``"pallas"`` raises for float64).

Select one with the context manager ``jaxquant.implementation(name)``. The choice is read when a
function is *traced*: a function already compiled by ``jax.jit`` keeps what it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np

__all__ = ["IMPLEMENTATIONS", "implementation", "current_implementation", "resolve"]

IMPLEMENTATIONS = ("auto", "reference", "pallas", "interpret")
_current = contextvars.ContextVar("jaxquant_implementation", default="auto")


def current_implementation() -> str:
    return _current.get()


@contextlib.contextmanager
def implementation(name: str):
    """Context manager selecting the implementation for ops traced inside it."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {name!r}")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)


def resolve(impl: str, platform: str, avals=()) -> str:
    """What a primitive lowers to: ``"pallas"``, ``"interpret"`` or ``"reference"``.

    ``impl`` is the primitive's param, ``platform`` the lowering platform, ``avals`` the abstract
    values in and out (float64 data goes to XLA under ``"auto"``, see the module docstring).
    """
    use = impl
    if use == "auto":
        use = "pallas" if platform == "cuda" else "reference"
    if use == "pallas" and any(np.dtype(a.dtype) == np.float64 for a in avals):
        if impl != "auto":
            raise NotImplementedError(
                "jaxquant: the Pallas Triton kernels take float16/bfloat16/float32; float64 runs with "
                "implementation 'auto' (XLA on the GPU) or 'reference'")
        use = "reference"
    if use == "pallas" and platform != "cuda":
        raise NotImplementedError(
            f"jaxquant: implementation 'pallas' lowers only for CUDA, not for {platform!r}; use "
            "'auto', 'reference' or 'interpret'")
    return use
