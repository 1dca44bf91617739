"""Which implementation the primitives lower to.

=============  =====================================================================
``"auto"``     the default: the Pallas kernels when lowering for CUDA, the plain-jnp
               reference when lowering for the CPU
``"reference"`` the plain-jnp reference on every platform (e.g. to compare on a GPU)
``"pallas"``   the Pallas kernels; lowering for the CPU raises an error
``"interpret"`` the Pallas Triton kernels in Pallas interpret mode (slow; the CPU test tier)
=============  =====================================================================

float64 data: the kernels take float16 / bfloat16 / float32, so under ``"auto"`` float64 ops
lower to the XLA reference on CUDA too (``"pallas"`` raises for float64).

Select one with the context manager ``jaxquant.implementation(name)``. The choice is a jax
configuration state that is part of ``jax.jit``'s cache key and trace context (like
``jax.default_matmul_precision``), and it is thread-local: a function jitted under one
implementation is traced anew under another, and a thread's choice does not leak into another
thread's traces.
"""

from __future__ import annotations

import contextlib

import numpy as np
from jax._src import config as jax_config

__all__ = ["IMPLEMENTATIONS", "implementation", "current_implementation", "resolve"]

IMPLEMENTATIONS = ("auto", "reference", "pallas", "interpret")

# A jax config state (private API, stable since jax 0.4.3x): include_in_jit_key makes jax.jit
# re-trace when it changes; a plain contextvar was not part of the key, so a function jitted under
# "reference" silently kept that trace under "interpret".
_STATE = jax_config.enum_state(
    "jaxquant_implementation", IMPLEMENTATIONS, "auto",
    help="Which implementation jaxquant's primitives lower to (see jaxquant.implementation).",
    include_in_jit_key=True, include_in_trace_context=True)


def current_implementation() -> str:
    return _STATE.value


@contextlib.contextmanager
def implementation(name: str):
    """Context manager selecting the implementation for ops traced inside it (thread-local)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {name!r}")
    with _STATE(name):
        yield name


def resolve(impl: str, platform: str, avals=()) -> str:
    """What a primitive lowers to: ``"pallas"``, ``"interpret"`` or ``"reference"``.

    ``impl`` is the primitive's param, ``platform`` the lowering platform, ``avals`` the abstract
    values in and out (float64 data goes to XLA under ``"auto"``, see the module docstring).
    """
    use = impl
    if use == "auto":
        use = "pallas" if platform == "cuda" else "reference"
    if use == "pallas" and any(a is not None and np.dtype(a.dtype) == np.float64 for a in avals):
        if impl != "auto":
            raise NotImplementedError(
                "jaxquant: the Pallas kernels take float16/bfloat16/float32; float64 runs with "
                "implementation 'auto' (XLA on the GPU) or 'reference'")
        use = "reference"
    if use == "pallas" and platform != "cuda":
        raise NotImplementedError(
            f"jaxquant: implementation 'pallas' lowers only for CUDA, not for {platform!r}; use "
            "'auto', 'reference' or 'interpret'")
    return use
