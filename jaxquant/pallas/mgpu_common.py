"""Pieces shared by the GPU kernels and their dispatch (the SM count also sizes the Triton split-K
grids; the rest serves the Mosaic GPU kernels): which GPU runs (is it a
Hopper, how many SMs has it), the persistent grid and the tiled TMA store."""

from __future__ import annotations

import jax

NUM_SMS = 132  # H100 / H200 SXM: the persistent grid's size when no GPU is visible
SMEM_BUDGET = 220 * 1024  # of the 227 KiB a CTA may use on Hopper (scales and barriers need a little)

_HOPPER = ("H100", "H200", "H800", "H20", "GH200")


def is_hopper(kind) -> bool:
    """Whether a device kind (e.g. "NVIDIA H200") names a Hopper GPU, where Mosaic GPU's wgmma runs."""
    return bool(kind) and any(h in kind.split() for h in _HOPPER)


def gpu_device():
    """The first visible GPU device, or None (a CPU machine, e.g. lowering for CUDA there)."""
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return None
    return devs[0] if devs else None


def device_kind():
    """The visible GPU's device kind, or None."""
    gpu = gpu_device()
    return gpu.device_kind if gpu is not None else None


def num_sms() -> int:
    """Streaming multiprocessors of the GPU in use (a persistent kernel's grid); ``NUM_SMS`` when no
    GPU is visible (CUDA lowering on a CPU machine)."""
    gpu = gpu_device()
    return int(getattr(gpu, "core_count", 0) or NUM_SMS) if gpu is not None else NUM_SMS


def store_tiles(y, o_smem, wg, dst, epi: int):
    """Write registers ``y [rows, cols]`` to global memory in ``cols / epi`` column tiles.

    Each tile goes through ``o_smem[wg, slot]`` (two slots a warpgroup, so one tile's TMA store
    overlaps the next tile's copy into shared memory) to ``dst(e)``, the global-memory window of
    tile ``e``. Waits first for this warpgroup's previous stores to have read their buffers.
    """
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for e in range(y.shape[1] // epi):
        slot = e % 2
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        o_smem[wg, slot] = y[:, e * epi:(e + 1) * epi]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg, slot], dst(e))
