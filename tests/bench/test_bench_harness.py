"""The benchmark harness's chain sizing (``jaxquant.bench.harness.chain_layers``): a pure rule.

A chain of decode layers must stream enough weights that the host's dispatch of the one jitted
call does not bound it (per-layer time against chain length, measured on an H200, jax 0.11.2,
2026-11-21): >= MIN_CHAIN_BYTES of bf16 weights, between CHAIN_LAYERS and MAX_CHAIN_LAYERS
layers; the CPU smoke run keeps CHAIN_LAYERS.
"""

from __future__ import annotations

import math

import pytest

from jaxquant.bench import harness


@pytest.mark.parametrize("n, k", [(4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096), (256, 128), (1, 1)])
def test_chain_layers_streams_enough_weights(n, k):
    per_layer = n * k * 2  # bf16
    layers = harness.chain_layers(per_layer)
    assert harness.CHAIN_LAYERS <= layers <= harness.MAX_CHAIN_LAYERS
    if layers < harness.MAX_CHAIN_LAYERS:
        assert layers * per_layer >= harness.MIN_CHAIN_BYTES or layers == harness.CHAIN_LAYERS
    if layers > harness.CHAIN_LAYERS:  # the fewest that reach the bytes
        assert (layers - 1) * per_layer < harness.MIN_CHAIN_BYTES
    assert harness.chain_layers(per_layer, quick=True) == harness.CHAIN_LAYERS


def test_chain_layers_on_the_perf_shapes():
    # 4096x4096 (32 MiB of bf16 weights) takes 16 layers; the larger layers of docs/performance.md 4-5
    assert harness.chain_layers(4096 * 4096 * 2) == 16
    assert harness.chain_layers(8192 * 8192 * 2) == harness.CHAIN_LAYERS
    assert harness.chain_layers(4096 * 14336 * 2) == math.ceil(harness.MIN_CHAIN_BYTES / (4096 * 14336 * 2))
    assert harness.chain_layers(1) == harness.MAX_CHAIN_LAYERS
