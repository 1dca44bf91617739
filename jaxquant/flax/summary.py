"""``summary(model)``: every quantizable layer of a model, its config (or why it is float), and bytes.

One row per ``nnx.Linear`` / ``LinearGeneral`` / ``Einsum`` (float, QAT or served) of an nnx model,
or per ``nn.Dense`` / ``DenseGeneral`` / ``Einsum`` of a linen model quantized with
``jaxquant.flax.quantize`` (``summary(qmodel, variables, *inputs)``: the layers are found by tracing)::

    path           kind           K x N      quantization  float bytes  bytes  note
    attn/query     LinearGeneral  64 x 64    W8A8               16,640  4,608
    mlp/down       Linear         100 x 64   float              25,856  25,856 W4A16-g128: K = 100 ...

``float bytes``: the float kernel + bias; ``bytes``: what the layer holds or, for a QAT layer, will
hold once served (codes + scales + zero points + bias + activation scale). ``str(s)`` is a plain
text table; ``s.print()`` prints it with ``rich`` when it is installed (and the output is a terminal).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import numpy as np
from flax import nnx

from jaxquant.flax import layers as L
from jaxquant.flax import linen as LQ
from jaxquant.flax.config import QuantConfig
from jaxquant.flax.geometry import Geometry, UnsupportedLayer
from jaxquant.flax.observe import path_str
from jaxquant.flax.quantize import FLOAT_NOTE

__all__ = ["summary", "Summary", "LayerRow", "served_nbytes"]


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One quantizable layer: ``state`` is ``"float"``, ``"qat"`` or ``"served"``."""

    path: str
    kind: str
    k: int | None
    n: int | None
    state: str
    config: QuantConfig | None
    note: str
    float_bytes: int
    bytes: int

    @property
    def quantization(self) -> str:
        if self.config is None:
            return "float"
        return f"{self.config} (QAT)" if self.state == "qat" else str(self.config)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The rows of ``summary`` and their totals."""

    rows: tuple[LayerRow, ...]

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    def _cells(self):
        head = ("path", "kind", "K x N", "quantization", "float bytes", "bytes", "note")
        body = [(r.path or "(model)", r.kind, "?" if r.k is None else f"{r.k} x {r.n}", r.quantization,
                 f"{r.float_bytes:,}", f"{r.bytes:,}", r.note) for r in self.rows]
        ratio = f"{self.bytes / self.float_bytes:.3f}x" if self.float_bytes else ""
        total = (f"total ({len(self.rows)} layers)", "", "", ratio, f"{self.float_bytes:,}", f"{self.bytes:,}", "")
        return head, body, total

    def __str__(self) -> str:
        head, body, total = self._cells()
        rows = [head] + body + [total]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        right = {4, 5}

        def line(r):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        sep = "  ".join("-" * w for w in widths)
        return "\n".join([line(head), sep] + [line(r) for r in body] + [sep, line(total)])

    def print(self, title: str | None = None) -> None:
        """Print the table: with ``rich`` when it is installed and the output is a terminal, else plain text."""
        if importlib.util.find_spec("rich") is None or not sys.stdout.isatty():
            if title:
                print(title)
            print(self)
            return
        from rich.console import Console   # optional dependency, present only when installed
        from rich.table import Table

        head, body, total = self._cells()
        table = Table(title=title)
        for i, h in enumerate(head):
            table.add_column(h, justify="right" if i in (4, 5) else "left")
        for r in body:
            table.add_row(*r)
        table.add_section()
        table.add_row(*total)
        Console().print(table)


def _size(a) -> int:
    return 0 if a is None else int(math.prod(a.shape) * np.dtype(a.dtype).itemsize)


def served_nbytes(geometry: Geometry, config: QuantConfig, bias_bytes: int) -> int:
    """Bytes a served layer holds: codes + scales (+ zero points) + bias (+ static act scale)."""
    n, k = geometry.n, geometry.k
    codes = n * k // 2 if config.weight_bits == 4 else n * k
    params = math.prod(L.param_shape(config, n, k))
    return (codes + 4 * params * (1 if config.weight_symmetric else 2) + bias_bytes
            + (4 if config.activations == "static" else 0))


def _nnx_row(path, node) -> LayerRow | None:
    bias = getattr(node, "bias", None)
    bias_bytes = _size(None if bias is None else bias.get_value())
    try:
        g = L.geometry_of(node)
    except UnsupportedLayer as e:
        size = _size(node.kernel.get_value()) + bias_bytes
        return LayerRow(path, type(node).__name__, None, None, "float", None, str(e), size, size)
    if g is None:
        return None
    if isinstance(node, L.QuantizedLayer):
        before = g.k * g.n * np.dtype(node.kernel_dtype).itemsize + bias_bytes
        now = node.nbytes + _size(None if node.act_scale is None else node.act_scale.get_value())
        return LayerRow(path, g.kind, g.k, g.n, "served", node.config, "", before, now)
    before = _size(node.kernel.get_value()) + bias_bytes
    if isinstance(node, L.QATLayer):
        if node.config.serving_kind == "fake":
            return LayerRow(path, g.kind, g.k, g.n, "qat", node.config, "simulated: no integer kernel serves it",
                            before, before)
        return LayerRow(path, g.kind, g.k, g.n, "qat", node.config, "bytes once served", before,
                        served_nbytes(g, node.config, bias_bytes))
    return LayerRow(path, g.kind, g.k, g.n, "float", None, getattr(node, FLOAT_NOTE, ""), before, before)


def summary(model, variables=None, *args, **kwargs) -> Summary:
    """The ``Summary`` of an nnx model, or of a linen model from ``quantize`` given its
    ``variables`` (only their float params' shapes are used) and example inputs."""
    if isinstance(model, LQ.LinenQuantized):
        if variables is None:
            raise TypeError("summary(linen_model, variables, *inputs): a linen model needs its variables and "
                            "example inputs to find its layers")
        rows = []
        for l in LQ.linen_layers(model, variables, *args, **kwargs):
            g = l.geometry
            itemsize = np.dtype(l.kernel_dtype).itemsize
            if g is None:
                rows.append(LayerRow(path_str(l.path), l.kind, None, None, "float", None, l.reason, 0, 0))
                continue
            bias_bytes = 0 if g.bias_shape is None else math.prod(g.bias_shape) * itemsize
            before = g.k * g.n * itemsize + bias_bytes
            if l.action == "float":
                rows.append(LayerRow(path_str(l.path), l.kind, g.k, g.n, "float", None, l.reason, before, before))
            elif l.action == "qat" and l.config.serving_kind == "fake":
                rows.append(LayerRow(path_str(l.path), l.kind, g.k, g.n, "qat", l.config, "simulated: no integer "
                                     "kernel serves it", before, before))
            else:
                state = "qat" if l.action == "qat" else "served"
                rows.append(LayerRow(path_str(l.path), l.kind, g.k, g.n, state, l.config,
                                     "bytes once served" if state == "qat" else "", before,
                                     served_nbytes(g, l.config, bias_bytes)))
        return Summary(tuple(rows))
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model: expected an nnx.Module or a quantized linen model, got {type(model).__name__}")
    rows = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            row = _nnx_row(path_str(path), node)
            if row is not None:
                rows.append(row)
    return Summary(tuple(rows))
