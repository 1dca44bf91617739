"""Registration shared by every jaxquant primitive.

``register(p, ...)`` gives a primitive its eager implementation (the primitive bound under
``jax.jit``, one cached jitted function per set of params), abstract evaluation, a lowering per
platform (``lowering(platform)`` returns the rule; ``jaxquant.backend.resolve`` picks Pallas,
interpret mode or the reference inside it) and its batching rule.
"""

from __future__ import annotations

import functools

import jax
from jax.interpreters import batching, mlir

PLATFORMS = ("cpu", "cuda")


def register(p, *, abstract_eval, lowering, batch):
    @functools.lru_cache(maxsize=None)
    def jitted(**params):
        return jax.jit(lambda *a: p.bind(*a, **params))

    p.def_impl(lambda *args, **params: jitted(**params)(*args))
    p.def_abstract_eval(abstract_eval)
    for platform in PLATFORMS:
        mlir.register_lowering(p, lowering(platform), platform=platform)
    batching.primitive_batchers[p] = batch
    return p
