"""Input validation shared by the functional core: one message per kind of bad input, naming the argument."""

import math

import torch
from torch import Tensor

__all__ = ["check_eps", "check_finite", "check_neurons"]


def check_neurons(neurons: Tensor, name: str = "neurons", min_neurons: int = 1) -> None:
    """Raise unless ``neurons`` is a floating-point ``(N, d)`` or ``(G, N, d)`` tensor with ``N >= min_neurons``."""
    if not isinstance(neurons, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(neurons).__name__}.")
    if not neurons.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {neurons.dtype}.")
    if neurons.ndim not in (2, 3):
        raise ValueError(
            f"`{name}` must have shape (N, d) or (G, N, d) with one neuron per row, got shape {tuple(neurons.shape)}."
        )
    if neurons.shape[-2] < min_neurons:
        plural = "s" if min_neurons > 1 else ""
        pair = " to have a pair" if min_neurons == 2 else ""
        raise ValueError(
            f"`{name}` must hold at least {min_neurons} neuron{plural} (rows) per set{pair}, "
            f"got shape {tuple(neurons.shape)}."
        )
    if neurons.shape[-1] < 1:
        raise ValueError(f"`{name}` must have neuron dimension d >= 1, got shape {tuple(neurons.shape)}.")


def check_eps(eps: float, name: str = "eps") -> None:
    """Raise unless ``eps`` is a finite real number ``> 0``."""
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"`{name}` must be a finite float > 0, got {eps!r}.")


def check_finite(t: Tensor, name: str, quantity: str) -> None:
    """Raise if ``t`` holds NaN or Inf (a host sync: call it outside training loops, or skip it there)."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"`{name}` must be finite, got NaN or Inf values (shape {tuple(t.shape)}); the {quantity} is undefined. "
            "Check the model's weights, or pass check_finite=False to skip this check inside training loops."
        )
