"""Input validation shared by the functional core: one message per kind of bad input, naming the argument."""

import math

import torch
from torch import Tensor

__all__ = ["check_eps", "check_finite", "check_neurons", "check_projection"]


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


def check_projection(neurons: Tensor, projection: Tensor, name: str, per_set: str) -> None:
    """``projection`` of shape ``(*per, k, d)`` or ``(G, *per, k, d)``, ``k >= 1``, ``d`` the neurons', ``G`` theirs.

    Args:
        neurons: ``(N, d)`` or ``(G, N, d)``.
        projection: The tensor to check.
        name: Its argument name, for the messages.
        per_set: The axes between ``G`` and ``(k, d)``: ``""`` (one projection per set) or ``"C"`` (``C`` of them).

    Raises:
        TypeError: If ``projection`` is not a floating-point tensor.
        ValueError: If its shape does not fit ``neurons``.
    """
    if not isinstance(projection, Tensor) or not projection.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor, got {type(projection).__name__}.")
    axes = [per_set] if per_set else []
    single, batched = ", ".join([*axes, "k", "d"]), ", ".join(["G", *axes, "k", "d"])
    d, ndim = neurons.shape[-1], len(axes) + 2
    if projection.ndim not in (ndim, ndim + 1) or projection.shape[-1] != d or projection.shape[-2] < 1:
        raise ValueError(
            f"`{name}` must have shape ({single}) or ({batched}) with k >= 1 and d = {d} (the neuron dimension), "
            f"got {tuple(projection.shape)}."
        )
    if projection.ndim == ndim + 1 and (neurons.ndim != 3 or projection.shape[0] != neurons.shape[0]):
        raise ValueError(
            f"`{name}` of shape ({batched}) must come with `neurons` of shape (G, N, d) and the same G, got "
            f"{name} {tuple(projection.shape)} and neurons {tuple(neurons.shape)}."
        )
