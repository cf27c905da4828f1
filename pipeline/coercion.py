"""Strict conversion of one raw option value (a CLI string, a dict value) to a config field's type."""

from __future__ import annotations

import math
from typing import Any


def coerce_value(typ: Any, value: Any) -> Any:
    """Convert and type-check a value for a field of type ``typ``; strict: no silent truncation.

    Args:
        typ: the field's type (bool, int, float or str).
        value: the raw value.

    Returns:
        The converted value.

    Raises:
        ValueError: a value of the wrong kind, or a type no config field has; the message names the value, so a
            caller coercing a secret must not show it (``pipeline.config`` redacts those).
    """
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"expected a boolean, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ValueError(f"expected a finite number, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    raise ValueError(f"unsupported field type {typ}")
