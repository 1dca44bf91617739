"""Helpers of the sharding tests (imported by test_sharding_*.py): meshes over 8 CPU devices
(tests/conftest.py asks XLA for them), sharded arguments, and a runner that compares a sharded
``jax.jit`` with one device and counts the collectives of the compiled module."""

import dataclasses

import numpy as np
import pytest
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxquant as jq
from jaxquant.core.describe import collectives

IMPLS = ["reference", "interpret"]  # the plain-jnp path and the Pallas kernels (interpret mode)


@dataclasses.dataclass
class Run:
    out: object  # the sharded result
    one: object  # the same function on one device
    collectives: dict  # kind -> (count, bytes) of the compiled sharded module

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.collectives.values())

    @property
    def count(self) -> int:
        return sum(n for n, _ in self.collectives.values())


class Harness:
    def __init__(self):
        devices = jax.devices("cpu")
        if len(devices) < 8:
            pytest.skip("needs 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
        self.devices = devices[:8]
        self.mesh = Mesh(np.array(self.devices), ("m",))
        self.mesh2x4 = Mesh(np.array(self.devices).reshape(2, 4), ("data", "model"))

    def put(self, a, *spec, mesh=None):
        return jax.device_put(a, NamedSharding(mesh or self.mesh, P(*spec)))

    def laid_out(self, arr, spec, mesh=None) -> bool:
        """Whether ``arr`` is sharded as ``spec`` (trailing Nones ignored)."""
        return arr.sharding.is_equivalent_to(NamedSharding(mesh or self.mesh, spec), arr.ndim)

    def put_weight(self, qw, *spec, mesh=None):
        """A QuantizedWeight with codes (and group-wise scales / zero points) laid out as ``spec``
        over ``[N, K]``; per-channel scales ``[N]`` follow the N entry."""
        return jax.tree.map(lambda a: self.put(a, *spec[:a.ndim], mesh=mesh), qw)

    def run(self, f, *args, impl, single=None) -> Run:
        """``f(*args)`` under ``jax.jit`` on the arguments' shardings, and ``single`` (default
        ``f``) on one device."""
        single = single or f
        with jq.implementation(impl):
            jf = jax.jit(lambda *a: f(*a))
            text = jf.lower(*args).compile().as_text()
            out = jf(*args)
            one = jax.jit(lambda *a: single(*a))(*jax.device_put(args, self.devices[0]))
        return Run(out, one, collectives(text))


@pytest.fixture(scope="module")
def h():
    return Harness()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param
