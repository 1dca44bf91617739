"""Rules: which ``QuantConfig`` each layer of a model gets, chosen by its path.

A layer's path is its place in the module tree joined by ``/``: ``"attn/query"``, ``"mlp/up"``,
``"layers/0/attention/output"`` (nnx: attribute names and list indices; linen: the scope names,
automatic ones included, e.g. ``"Dense_0"``, ``"MlpBlock_0/Dense_1"``). Rules are tried in order and
the first that matches decides:

* ``Rule(pattern, config)``: matches when the regular expression ``pattern`` matches the whole
  path (``re.fullmatch``); ``config`` None keeps the matched layers float.
* ``Rule(fn)`` or a bare callable ``fn(path, module) -> QuantConfig | None``: always decides
  (None keeps the layer float).
* a ``QuantConfig`` alone stands for ``Rule(".*", config)``.

A layer no rule matches stays float.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Union

from jaxquant.flax.config import QuantConfig

__all__ = ["Rule", "QuantizationWarning", "as_rules", "match"]


class QuantizationWarning(UserWarning):
    """A layer ``quantize`` leaves float (or serves with another config than the rules ask), and why."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """``Rule(pattern, config)`` or ``Rule(fn)``: see the module docstring."""

    pattern: Union[str, "re.Pattern[str]", Callable[[str, Any], QuantConfig | None]]
    config: QuantConfig | None = None

    def __post_init__(self):
        if callable(self.pattern) and not isinstance(self.pattern, re.Pattern):
            if self.config is not None:
                raise TypeError("Rule(fn): a callable rule returns the config itself; do not pass config=")
            return
        if not isinstance(self.pattern, (str, re.Pattern)):
            raise TypeError(f"Rule.pattern: expected a regular expression (str or re.Pattern) or a callable "
                            f"(path, module) -> QuantConfig | None, got {type(self.pattern).__name__}")
        if isinstance(self.pattern, str):
            try:
                object.__setattr__(self, "pattern", re.compile(self.pattern))
            except re.error as e:
                raise ValueError(f"Rule.pattern: {self.pattern!r} is not a regular expression: {e}") from None
        if self.config is not None and not isinstance(self.config, QuantConfig):
            raise TypeError(f"Rule.config: expected a QuantConfig or None (keep float), got "
                            f"{type(self.config).__name__}")

    def decide(self, path: str, module) -> tuple[bool, QuantConfig | None]:
        """``(matched, config)`` for the layer at ``path``."""
        if isinstance(self.pattern, re.Pattern):
            return self.pattern.fullmatch(path) is not None, self.config
        config = self.pattern(path, module)
        if config is not None and not isinstance(config, QuantConfig):
            raise TypeError(f"rule {self.pattern!r} returned {config!r} for layer {path!r}: expected a QuantConfig "
                            "or None")
        return True, config

    def __repr__(self):
        p = self.pattern.pattern if isinstance(self.pattern, re.Pattern) else getattr(self.pattern, "__name__", "fn")
        return f"Rule({p!r}, {self.config})" if isinstance(self.pattern, re.Pattern) else f"Rule({p})"


def as_rules(rules) -> tuple[Rule, ...] | None:
    """Normalise ``rules``: None, a ``QuantConfig``, a ``Rule``, a callable, or a sequence of them."""
    if rules is None:
        return None
    if isinstance(rules, (QuantConfig, Rule)) or callable(rules):
        rules = [rules]
    out = []
    for r in rules:
        if isinstance(r, QuantConfig):
            r = Rule(".*", r)
        elif not isinstance(r, Rule) and callable(r):
            r = Rule(r)
        if not isinstance(r, Rule):
            raise TypeError(f"rules: expected Rule, QuantConfig or callable items, got {type(r).__name__}")
        out.append(r)
    return tuple(out)


def match(rules: tuple[Rule, ...], path: str, module) -> tuple[bool, QuantConfig | None]:
    """The first rule that matches ``path`` decides: ``(matched, config)``; ``(False, None)`` if none."""
    for r in rules:
        matched, config = r.decide(path, module)
        if matched:
            return True, config
    return False, None
