"""Typed reads of config.json fields: every wrong type or value is a one-line DiffMambaError naming
the field as the file spells it (`field 'hidden_size' must be a whole number, got 64.7`).

JSON has one number type, so a whole float (64.0, 1e9) reads as an integer; nothing else is
converted: a string is never a number ("64") or a bool ("false"), a bool is never a number (true).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from ..errors import DiffMambaError

_REQUIRED = object()


def show(value: Any, limit: int = 60) -> str:
    """A JSON value as the file spells it, shortened, with its kind when that is the point."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if isinstance(value, str):
        return f"{text} (a string)"
    if isinstance(value, bool):
        return f"{text} (a bool)"
    return text


class Fields:
    """The fields of one JSON object; `prefix` names where it sits ("ssm_cfg.")."""

    def __init__(self, data: Mapping[str, Any], prefix: str = ""):
        self.data = data
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"'{self.prefix}{key}'"

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise DiffMambaError(f"config lacks the field {self.name(key)}")
        return default

    def fail(self, key: str, expected: str, value: Any):
        raise DiffMambaError(f"field {self.name(key)} must be {expected}, got {show(value)}")

    def int(self, key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> int:
        """A whole number >= minimum (a whole float such as 1e9 counts)."""
        value = self._get(key, default)
        expected = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, expected, value)
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                self.fail(key, expected, value)
            value = int(value)
        if value < minimum:
            self.fail(key, expected, value)
        return value

    def bool(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def float(self, key: str, default: Any = _REQUIRED, *, positive: bool = False) -> float:
        """A finite number (> 0 with positive=True)."""
        value = self._get(key, default)
        expected = "a positive finite number" if positive else "a finite number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, expected, value)
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            self.fail(key, expected, value)
        return value

    def object(self, key: str, default: Any = _REQUIRED) -> dict:
        value = self._get(key, default)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, "an object", value)
        return value


def decode_float(x: Any, what: str = "value") -> float:
    """A JSON number, or infinity / NaN as transformers writes it ({"__float__": "Infinity"})."""
    if isinstance(x, dict) and set(x) == {"__float__"} and isinstance(x["__float__"], str):
        try:
            return float(x["__float__"])
        except ValueError:
            pass
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise DiffMambaError(f"{what} must be a number, got {show(x)}")


def read_limit(value: Any, name: str = "time_step_limit") -> tuple[float, float]:
    """time_step_limit as written by transformers: absent, [0.0, Infinity] or [0.0, {"__float__": "Infinity"}];
    two numbers, neither NaN, 0 <= low <= high."""
    if value is None:
        return (0.0, math.inf)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DiffMambaError(f"field '{name}' must be a pair of numbers [low, high], got {show(value)}")
    lo, hi = (decode_float(v, f"field '{name}'") for v in value)
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo <= hi:
        raise DiffMambaError(f"field '{name}' must be [low, high] with 0 <= low <= high, got {show(list(value))}")
    return (lo, hi)
