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

The inner fit of AP-CoMHE (:class:`~lightning_comhe.projections.AngleProjection`) uses the two helpers
:func:`angle_target` and :func:`angle_value_and_grad`: ``W`` is fixed during a fit, so :math:`C(W)` is computed
once per fit rather than once per inner step, and the value and :math:`\nabla_P L` come from a closed-form backward
(no autograd graph), with the projection in the ``P·Wᵀ`` orientation of
:func:`~lightning_comhe.functional.projection.project_sets`. They equal :func:`angle_objective` and its autograd
gradient up to float reassociation.

Cost notes: for ``d > N`` the eps-cosine is formed from the Gram ``W Wᵀ`` (its diagonal gives the norms), which
saves the passes over the ``N × d`` neurons that normalising them first would take; for ``d <= N`` the neurons are
normalised first (``N × d`` passes instead of ``N × N``). Both are the same expression up to float reassociation.
"""

import torch
from torch import Tensor

from lightning_comhe.functional._checks import check_eps, check_neurons, check_projection
from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.functional.projection import project_sets

__all__ = ["angle_objective", "angle_target", "angle_value_and_grad", "eps_cosine"]


def _eps_cosine(v: Tensor, eps: float) -> Tensor:
    """Eps-cosine matrix of ``v`` (..., N, d), already in the compute dtype with autocast disabled.

    For ``d > N`` from the Gram ``v vᵀ`` scaled by ``r_i r_j`` (``r = (diag + eps)^{-1/2}``; the outer product is
    formed first), else from the normalised rows. A BLAS GEMM need not give ``(i, j)`` and ``(j, i)`` the same
    rounding (blocked kernels accumulate the two in different orders), so the Gram's upper triangle is mirrored:
    the result is exactly symmetric on every CPU and GPU.
    """
    n, d = v.shape[-2], v.shape[-1]
    if d > n:
        gram = _symmetric(v @ v.transpose(-1, -2))
        r = (gram.diagonal(dim1=-2, dim2=-1) + eps).rsqrt()
        return gram * (r[..., :, None] * r[..., None, :])
    u = v / (v.pow(2).sum(-1, keepdim=True) + eps).sqrt()
    return _symmetric(u @ u.transpose(-1, -2))


def _symmetric(gram: Tensor) -> Tensor:
    """``gram`` with its strict lower triangle replaced by the mirrored upper one (exactly symmetric)."""
    return gram.triu() + gram.triu(1).transpose(-1, -2)


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
        return _eps_cosine(neurons.to(compute_dtype(neurons)), float(eps))


def _project(w: Tensor, p: Tensor) -> Tensor:
    """``W Pᵀ`` as ``(P Wᵀ)ᵀ`` (:func:`project_sets`, the faster orientation for small ``k``): ``(G, N, k)``, a view."""
    return project_sets(w, p).transpose(1, 2)


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
    check_projection(neurons, projection, "projection", per_set="")
    dtype = compute_dtype(neurons)
    with autocast_off(neurons.device):
        w = neurons.to(dtype)
        p = projection.to(dtype)
        batched = w.ndim == 3
        wb = w if batched else w[None]
        # a shared projection is expanded (no copy): every set runs the same batched matmul, so both forms round alike
        pb = p.expand(wb.shape[0], *p.shape[-2:]) if p.ndim == 2 else p
        diff = _eps_cosine(_project(wb, pb), float(eps)) - _eps_cosine(wb, float(eps))
        out = torch.linalg.vector_norm(diff, dim=(-2, -1))
        return out if batched else out[0]


def angle_target(neurons: Tensor, eps: float = 1e-4) -> Tensor:
    r"""The fixed half of the angle objective during a fit: :math:`C(W)`, detached, for :func:`angle_value_and_grad`.

    Args:
        neurons: ``(G, N, d)``; detached inside.
        eps: As in :func:`angle_objective`.

    Returns:
        ``(G, N, N)`` in the compute dtype of the neurons.

    Example::

        >>> w = torch.randn(2, 6, 9)
        >>> torch.allclose(angle_target(w), eps_cosine(w))
        True
    """
    with torch.no_grad(), autocast_off(neurons.device):
        return _eps_cosine(neurons.detach().to(compute_dtype(neurons)), float(eps))


def angle_value_and_grad(
    neurons: Tensor, target: Tensor, projection: Tensor, eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    r"""The angle objective :math:`L(W, P)` per set and its gradient :math:`\nabla_P L`, with ``W`` held fixed.

    The closed-form backward of :func:`angle_objective` with respect to ``P`` only (no autograd graph): with
    :math:`V = W P^\top`, :math:`U` its eps-normalised rows (norms :math:`n_i`), :math:`A = U U^\top` and
    :math:`D = A - C(W)`,

    .. math::

        \nabla_U L = \frac{2 D U}{L}, \qquad
        \nabla_V L = \frac{\nabla_U L - \operatorname{rowdot}(\nabla_U L, U)\, U}{n}, \qquad
        \nabla_P L = (\nabla_V L)^\top W,

    (``D`` is symmetric; a zero objective has a zero gradient, as autograd's norm). Equal to :func:`angle_objective`
    and its autograd gradient up to float reassociation.

    Args:
        neurons: ``(G, N, d)``, in the compute dtype (treated as constants).
        target: :func:`angle_target` of ``neurons``.
        projection: ``(G, k, d)``, in the compute dtype of ``neurons``.
        eps: As in :func:`angle_objective`.

    Returns:
        ``(value, grad)``: ``(G,)`` and ``(G, k, d)``, detached.

    Example::

        >>> w, p = torch.randn(2, 6, 9, dtype=torch.float64), torch.randn(2, 3, 9, dtype=torch.float64)
        >>> value, grad = angle_value_and_grad(w, angle_target(w), p)
        >>> leaf = p.clone().requires_grad_(True)
        >>> (ref,) = torch.autograd.grad(angle_objective(w, leaf).sum(), leaf)
        >>> torch.allclose(value, angle_objective(w, p)), torch.allclose(grad, ref)
        (True, True)
    """
    with torch.no_grad(), autocast_off(neurons.device):
        w = neurons.detach()
        v = _project(w, projection.detach())  # (G, N, k), a transposed view of (G, k, N)
        nrm2 = torch.linalg.vecdot(v, v) + eps
        inv = nrm2.rsqrt_()
        u = v * inv[..., None]
        diff = torch.bmm(u, u.transpose(1, 2)).sub_(target)
        value = torch.linalg.vector_norm(diff, dim=(-2, -1))
        scale = torch.where(value > 0, 2.0 / value, torch.zeros_like(value))
        g_u = torch.bmm(diff, u).mul_(scale[:, None, None])
        coef = torch.linalg.vecdot(g_u, u).neg_()
        g_v = torch.addcmul(g_u, u, coef[..., None]).mul_(inv[..., None])
        grad = torch.bmm(g_v.transpose(1, 2), w)
        return value, grad
