"""Which GPU runs: its device kind, whether it is a Hopper, its SM count.

Dispatch functions take a ``device_kind`` argument (``jaxquant.describe(..., device_kind=...)``
passes one); ``device_kind()`` is the visible GPU's, or None on a CPU machine.
"""

from __future__ import annotations

import jax

__all__ = ["NUM_SMS", "is_hopper", "gpu_device", "device_kind", "num_sms"]

NUM_SMS = 132  # H100 / H200 SXM: the persistent grid's size when no GPU is visible

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


