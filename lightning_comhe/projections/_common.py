"""Checks and state-dict helpers shared by the projection classes (module-local type checks, one message style)."""

import warnings
from typing import Any

from torch import Tensor

__all__ = ["STATE_VERSION", "check_key", "check_sets", "check_state", "warn_config"]

#: Version of the projection classes' ``state_dict()`` format.
STATE_VERSION = 1


def check_key(key: Any) -> str:
    """Raise unless ``key`` is a ``str``."""
    if not isinstance(key, str):
        raise ValueError(f"`key` must be a str, got {key!r} of type {type(key).__name__}.")
    return key


def check_sets(neurons: Any) -> None:
    """Raise unless ``neurons`` is a floating-point ``(G, N, d)`` tensor with ``N >= 2`` and ``d >= 1``."""
    if not isinstance(neurons, Tensor) or not neurons.is_floating_point():
        raise ValueError(f"`neurons` must be a floating-point torch.Tensor, got {type(neurons).__name__}.")
    if neurons.ndim != 3 or neurons.shape[1] < 2 or neurons.shape[2] < 1:
        raise ValueError(
            "`neurons` must have shape (G, N, d): G equally shaped sets of N >= 2 neurons (rows) of dimension "
            f"d >= 1, got shape {tuple(neurons.shape)}."
        )


def check_state(state: Any, kind: str) -> dict[str, Any]:
    """Raise unless ``state`` is a ``state_dict()`` of the class named ``kind``."""
    if not isinstance(state, dict) or "config" not in state or "entries" not in state:
        raise ValueError(
            f"`state_dict` must be a {kind} state dict (with keys 'config' and 'entries'), got {type(state).__name__}."
        )
    if state.get("type", kind) != kind:
        raise ValueError(f"`state_dict` must be saved by {kind!r}, got one saved by {state.get('type')!r}.")
    return state


def warn_config(owner: str, saved: dict[str, Any], current: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Warn about the ``fields`` whose saved value differs from the current configuration (which is kept)."""
    diff = [f"{f}={saved[f]!r} (now {current[f]!r})" for f in fields if f in saved and saved[f] != current[f]]
    if diff:
        warnings.warn(
            f"{owner}.load_state_dict: the state was saved with {', '.join(diff)}; the current configuration is kept.",
            stacklevel=3,
        )
