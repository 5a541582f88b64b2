"""Argument checks shared by the whole package: one message style, `` `name` must be …, got … ``.

A leaf module (no torch, no Lightning). Each check raises :class:`ValueError` naming the argument, what is allowed
and the value received, and returns the value (normalized where that is useful, e.g. ``float(x)``).
"""

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_name",
    "check_regexes",
    "choices",
]


def choices(values: Sequence[str]) -> str:
    """``'a', 'b', 'c'``: the allowed values as they appear in messages."""
    return ", ".join(repr(v) for v in values)


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """Raise unless ``value`` is one of ``allowed``."""
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {choices(allowed)}, got {value!r}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Raise unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False, none_means: str = "") -> int | None:
    """Raise unless ``value`` is an ``int >= minimum`` (or ``None`` where allowed); bools are refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        alt = f" or None{f' ({none_means})' if none_means else ''}" if allow_none else ""
        raise ValueError(f"`{name}` must be an int >= {minimum}{alt}, got {value!r}.")
    return int(value)


def check_float(
    name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, allow_none: bool = False, none_means: str = ""
) -> float | None:
    """Raise unless ``value`` is a finite real ``>= minimum`` (``> minimum`` if ``strict``), or an allowed ``None``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        alt = f" or None{f' ({none_means})' if none_means else ''}" if allow_none else ""
        raise ValueError(f"`{name}` must be a finite float {bound}{alt}, got {value!r}.")
    return float(value)


def check_regexes(name: str, value: Any) -> tuple[str, ...] | None:
    """Raise unless ``value`` is ``None``, a regex string or a list of regex strings that compile."""
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{name}` must be a regex string, a list of regex strings or None, got {value!r}.")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"`{name}` must hold valid regular expressions, got {pattern!r} ({err}).") from err
    return tuple(patterns)


def check_name(name: str, value: Any, *, allow_none: bool = True) -> str | None:
    """Raise unless ``value`` is a non-empty string without ``/`` (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value or "/" in value:
        alt = "None or " if allow_none else ""
        raise ValueError(f"`{name}` must be {alt}a non-empty string without '/', got {value!r}.")
    return value
