"""Tuned kernel tables: one JSON file per device and kernel family, shipped in the wheel.

``jaxquant/tuned/<device>/<family>.json`` (``<device>``: ``h200``, ...) holds what the family's
heuristics read (tile tables measured with ``python -m jaxquant.bench --sweep``; each file says
what it was measured on in its ``"about"`` field). Nothing is tuned at import or at run time.

``table(family, device_kind)`` returns the parsed file for a device kind (e.g. "NVIDIA H200").
A GPU with no table of its own gets the default device's (the H200's: the same Hopper SM as the
H100), with one warning per (family, device kind). ``device_kind=None`` (no GPU: lowering for
CUDA on a CPU machine, interpret mode) gets the default silently.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import warnings

__all__ = ["DEFAULT_DEVICE", "device_dir", "table"]

DEFAULT_DEVICE = "h200"

# device kind (jax.Device.device_kind) -> folder under jaxquant/tuned
_DEVICES = {"NVIDIA H200": "h200"}


def device_dir(device_kind: str | None) -> str | None:
    """The tuned folder of a device kind, or None when it has none."""
    return _DEVICES.get(device_kind) if device_kind else DEFAULT_DEVICE


@functools.lru_cache(maxsize=None)
def _load(folder: str, family: str) -> dict:
    path = importlib.resources.files("jaxquant") / "tuned" / folder / f"{family}.json"
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=None)
def table(family: str, device_kind: str | None = None) -> dict:
    """The tuned data of ``family`` (e.g. "weight_only") for ``device_kind`` (see the module docstring)."""
    folder = device_dir(device_kind)
    if folder is None:
        warnings.warn(f"jaxquant: no tuned {family} table for {device_kind!r}; using the {DEFAULT_DEVICE} table "
                      f"(tiles may be slower than tuned ones)", stacklevel=2)
        folder = DEFAULT_DEVICE
    return _load(folder, family)
