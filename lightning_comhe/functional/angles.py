r"""Angle-preservation quantities of projected neurons (AP-CoMHE).

This module is pure PyTorch. It provides the eps-cosine matrix of a neuron set and the angle-preservation
objective of angle-preserving CoMHE (Lin et al., CVPR 2020) with the exact semantics of the official code
(rmlin/CoMHE ``angle_projection``):

* cosines use ``n_i = sqrt(‖w_i‖² + eps)`` as each norm (``eps`` inside the square root), as every official energy
  does, so :math:`C(W)_{ij} = \langle w_i, w_j\rangle / (n_i n_j)` and even the diagonal is slightly below 1;
* the objective is the Frobenius norm (not its square) of the difference of the **full** ``N × N`` cosine matrices
  of the projected and the original neurons, diagonal and both triangles included:
  :math:`L(W, P) = \|C(W P^\top) - C(W)\|_F`.

Both functions compute in float32 (float64 for float64 input) with autocast disabled, and are differentiable twice
(the second-order look-ahead of AP-CoMHE differentiates :math:`\nabla_P L` with respect to ``W``).
"""

import torch
from torch import Tensor

from lightning_comhe.functional._checks import check_eps, check_neurons
from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional.energy import _compute_dtype

__all__ = ["angle_objective", "eps_cosine"]


def _eps_cosine(v: Tensor, eps: float) -> Tensor:
    """Eps-cosine matrix of ``v`` (..., N, k), already in the compute dtype with autocast disabled."""
    u = v / (v.pow(2).sum(-1, keepdim=True) + eps).sqrt()
    return u @ u.transpose(-1, -2)


def eps_cosine(neurons: Tensor, eps: float = 1e-4) -> Tensor:
    r"""Full eps-cosine matrix of a set of neurons, as in the official MHE / CoMHE code.

    .. math::

        C(W)_{ij} = \frac{\langle w_i, w_j\rangle}{n_i\, n_j}, \qquad n_i = \sqrt{\|w_i\|^2 + \text{eps}}

    The diagonal is :math:`\|w_i\|^2 / (\|w_i\|^2 + \text{eps}) < 1`, and a zero neuron has a zero row and column.

    Args:
        neurons: ``(N, d)``, one neuron per row, or a batch ``(G, N, d)`` of equally shaped sets.
        eps: The constant inside each norm's square root. Must be ``> 0``.

    Returns:
        ``(N, N)`` or ``(G, N, N)``, in float32 (float64 for float64 input).

    Raises:
        ValueError: For a bad shape or ``eps``.
        TypeError: For a non-tensor or non-floating-point input.

    Example::

        >>> import torch
        >>> c = eps_cosine(torch.tensor([[3.0, 4.0], [4.0, -3.0]]))
        >>> c.shape, round(c[0, 1].item(), 6), round(c[0, 0].item(), 6)  # orthogonal; 25 / (25 + 1e-4)
        (torch.Size([2, 2]), 0.0, 0.999996)
    """
    check_neurons(neurons)
    check_eps(eps)
    with autocast_off(neurons.device):
        return _eps_cosine(neurons.to(_compute_dtype(neurons)), float(eps))


def angle_objective(neurons: Tensor, projection: Tensor, eps: float = 1e-4) -> Tensor:
    r"""Angle-preservation objective of AP-CoMHE: how far a projection moves the neurons' cosines.

    .. math::

        L(W, P) = \big\| C(W P^\top) - C(W) \big\|_F
                = \Big(\sum_{i, j = 1}^{N} \big(C(W P^\top)_{ij} - C(W)_{ij}\big)^2\Big)^{1/2}

    with :math:`C` the eps-cosine matrix of :func:`eps_cosine`, :math:`W \in \mathbb{R}^{N \times d}` the neurons
    (rows) and :math:`P \in \mathbb{R}^{k \times d}` the projection, so the projected neurons are the rows of
    :math:`W P^\top`. As in the official code (``tf.norm`` of the cosine difference) the norm is **not** squared,
    and the diagonal and both triangles are included. The projection is cast to the compute dtype of the neurons
    (float32, or float64 for float64 neurons), and gradients flow to both arguments (twice differentiable).

    Args:
        neurons: ``(N, d)``, or ``(G, N, d)`` for G equally shaped sets.
        projection: ``(k, d)``; with ``(G, N, d)`` neurons either ``(G, k, d)`` (one projection per set) or
            ``(k, d)`` (shared by every set).
        eps: The constant inside each norm's square root (original and projected neurons). Must be ``> 0``.

    Returns:
        A scalar for ``(N, d)`` neurons, else a ``(G,)`` tensor.

    Raises:
        ValueError: If the shapes do not match or ``eps`` is bad.
        TypeError: For a non-tensor or non-floating-point input.

    Example::

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(32, 72, generator=g)
        >>> float(angle_objective(w, torch.eye(72)))  # the identity preserves every cosine
        0.0
        >>> p = torch.randn(4, 30, 72, generator=g)
        >>> angle_objective(w.expand(4, 32, 72), p).shape
        torch.Size([4])
    """
    check_neurons(neurons)
    check_eps(eps)
    if not isinstance(projection, Tensor) or not projection.is_floating_point():
        raise TypeError(f"`projection` must be a floating-point torch.Tensor; got {type(projection).__name__}.")
    d = neurons.shape[-1]
    if projection.ndim not in (2, 3) or projection.shape[-1] != d or projection.shape[-2] < 1:
        raise ValueError(
            f"`projection` must have shape (k, d) or (G, k, d) with k >= 1 and d = {d} (the neuron dimension); "
            f"got {tuple(projection.shape)}."
        )
    if projection.ndim == 3 and (neurons.ndim != 3 or projection.shape[0] != neurons.shape[0]):
        raise ValueError(
            f"`projection` of shape (G, k, d) = {tuple(projection.shape)} needs `neurons` of shape (G, N, d) with the "
            f"same G; got {tuple(neurons.shape)}."
        )
    dtype = _compute_dtype(neurons)
    with autocast_off(neurons.device):
        w = neurons.to(dtype)
        p = projection.to(dtype)
        projected = w @ p.transpose(-1, -2)  # (..., N, k)
        diff = _eps_cosine(projected, float(eps)) - _eps_cosine(w, float(eps))
        return torch.linalg.vector_norm(diff, dim=(-2, -1))
