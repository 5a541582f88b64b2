r"""Orthogonality regularizers of neuron sets: soft orthogonality, orthonormality and SRIP.

These are the peer regularizers the CoMHE paper compares against (Lin et al., CVPR 2020, tables "Orthogonal",
"Orthnormal" and "SRIP"). This module is pure PyTorch. Neurons are the rows of ``weight.reshape(out, -1)``, so a set
is a matrix :math:`W \in \mathbb{R}^{N \times d}` (``N`` neurons of dimension ``d``), exactly as for the energies.

Which Gram matrix
-----------------
Bansal, Chen & Wang, "Can We Gain More from Orthogonality Regularizations in Training Deep CNNs?", NeurIPS 2018,
write the soft orthogonality (SO) penalty :math:`\lambda\|W^\top W - I\|_F^2` for a filter matrix whose *columns* are
the filters, i.e. the neuron Gram :math:`W W^\top` in our row convention. When a layer has more neurons than
dimensions (``N > d``), :math:`W W^\top` has rank at most ``d`` and can never be the identity; their released SRIP code
(``l2_reg_ortho`` in github.com/VITA-Group/Orthogonality-in-CNNs) therefore uses whichever Gram is *smaller*:
:math:`W W^\top` (``N × N``) when ``N <= d`` and :math:`W^\top W` (``d × d``) when ``N > d``. We follow that rule
everywhere (``G`` below, of size ``m = min(N, d)``), so the raw penalties can reach 0: rows orthonormal when
``N <= d``, a tight frame when ``N > d``. (On eps-normalized rows with ``N > d`` the floor is that of a unit-norm
tight frame, :math:`\hat W^\top \hat W = (N/d) I_d`.) For the Frobenius penalties the choice only shifts the value by a
constant, since :math:`\|W W^\top - I_N\|_F^2 = \|W^\top W - I_d\|_F^2 + (N - d)` for any ``W``:
gradients are identical. For the spectral penalty (SRIP) it matters: :math:`\sigma(W W^\top - I_N) \ge 1` whenever
``N > d``.

Penalties (per set; a batch ``(B, N, d)`` gives ``(B,)``):

* :func:`soft_orthogonality` (SO): :math:`\|G - I_m\|_F^2` on the raw rows (``normalize=False``, Bansal et al.'s
  choice) or on the eps-normalized rows :math:`\hat w_i = w_i / \sqrt{\|w_i\|^2 + \text{eps}}` (``normalize=True``).
* :func:`orthonormality`: :math:`\|\hat G - I_m\|_F^2` on the eps-normalized rows, i.e. it only acts on the
  directions of the neurons (like MHE) and not on their norms. With ``N <= d`` this is
  :math:`\sum_{i \ne j} \hat c_{ij}^2 + \sum_i (1 - \hat c_{ii})^2` with :math:`\hat c_{ii} = \|w_i\|^2 / (\|w_i\|^2 +
  \text{eps})`. See ``docs/peers.md`` for the reference it stands for.
* :func:`srip` (Bansal et al.'s SRIP): the spectral norm :math:`\sigma(G - I_m)`, estimated with power iteration from
  a persistent unit vector (:func:`srip_power_iteration`), as ``torch.nn.utils.spectral_norm`` does. The estimate
  :math:`\|(G - I) v\|` is differentiated with ``v`` held constant. ``squared=True`` gives the square, which is what
  the released code returns.

All computations run in float32 (float64 for float64 input) with autocast disabled, like the energies.
"""

from typing import Literal

import torch
from torch import Tensor

from lightning_comhe.functional._checks import check_eps, check_finite, check_neurons
from lightning_comhe.functional._device import autocast_off

__all__ = ["gram_residual", "gram_side", "orthonormality", "soft_orthogonality", "srip", "srip_power_iteration"]

GramSide = Literal["neurons", "features"]


def _check_finite(t: Tensor) -> None:
    check_finite(t, "neurons", "penalty")


def gram_side(num_neurons: int, dim: int) -> GramSide:
    """Which Gram matrix the penalties use: ``"neurons"`` (``W Wᵀ``) when ``N <= d``, else ``"features"`` (``WᵀW``).

    Example::

        >>> gram_side(16, 27), gram_side(64, 27)
        ('neurons', 'features')
    """
    return "neurons" if num_neurons <= dim else "features"


def _rows(neurons: Tensor, normalize: bool, eps: float) -> Tensor:
    """Neurons in the compute dtype, eps-normalized if asked, always batched ``(B, N, d)``."""
    dtype = torch.float64 if neurons.dtype == torch.float64 else torch.float32
    w = neurons.to(dtype)
    if w.ndim == 2:
        w = w[None]
    if normalize:
        w = w / (w.pow(2).sum(-1, keepdim=True) + eps).sqrt()
    return w


def _residual(w: Tensor) -> Tensor:
    """``G - I`` for batched rows ``w`` (B, N, d), with the smaller Gram."""
    n, d = w.shape[-2:]
    gram = w @ w.transpose(-1, -2) if gram_side(n, d) == "neurons" else w.transpose(-1, -2) @ w
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return gram - eye


def gram_residual(neurons: Tensor, *, normalize: bool = False, eps: float = 1e-4) -> Tensor:
    r"""The residual :math:`G - I_m` of the smaller Gram matrix of a neuron set (see the module docstring).

    Args:
        neurons: ``(N, d)`` (rows are neurons) or a batch ``(B, N, d)``.
        normalize: Use the eps-normalized rows :math:`w_i / \sqrt{\|w_i\|^2 + \text{eps}}`.
        eps: The constant inside the norm's square root (only used with ``normalize``).

    Returns:
        ``(m, m)`` or ``(B, m, m)`` with ``m = min(N, d)``, in the compute dtype.

    Example::

        >>> gram_residual(torch.eye(3)).abs().max().item()
        0.0
    """
    check_neurons(neurons)
    check_eps(eps)
    with autocast_off(neurons.device):
        out = _residual(_rows(neurons, normalize, float(eps)))
    return out if neurons.ndim == 3 else out[0]


def soft_orthogonality(
    neurons: Tensor, *, normalize: bool = False, eps: float = 1e-4, check_finite: bool = True
) -> Tensor:
    r"""Soft orthogonality (SO, Bansal et al., NeurIPS 2018): :math:`\|G - I_m\|_F^2`.

    ``G`` is :math:`W W^\top` when ``N <= d`` and :math:`W^\top W` otherwise (the smaller Gram; the two choices differ
    by the constant ``N - d`` and have the same gradient).

    Args:
        neurons: ``(N, d)`` (rows are neurons) or a batch ``(B, N, d)``.
        normalize: ``False`` (default, Bansal et al.): the raw rows, so the penalty also pulls every norm to 1.
            ``True``: the eps-normalized rows, so only the directions are regularized.
        eps: The constant inside the norm's square root (only used with ``normalize``).
        check_finite: Raise a ``ValueError`` on NaN/Inf input (a host synchronisation).

    Returns:
        A scalar for ``(N, d)`` input, else ``(B,)``, in float32 (float64 for float64 input).

    Raises:
        ValueError: For a bad shape or ``eps``, or non-finite input.
        TypeError: For a non-floating-point input.

    Example::

        >>> soft_orthogonality(torch.eye(4)).item()
        0.0
        >>> soft_orthogonality(2 * torch.eye(2)).item()  # two neurons of norm 2: (4 - 1)^2 * 2
        18.0
    """
    check_neurons(neurons)
    check_eps(eps)
    if check_finite:
        _check_finite(neurons)
    with autocast_off(neurons.device):
        out = _residual(_rows(neurons, normalize, float(eps))).pow(2).sum(dim=(-2, -1))
    return out if neurons.ndim == 3 else out[0]


def orthonormality(neurons: Tensor, *, eps: float = 1e-4, check_finite: bool = True) -> Tensor:
    r"""Orthonormality of the neuron directions: :math:`\|\hat G - I_m\|_F^2` on eps-normalized rows.

    Identical to ``soft_orthogonality(neurons, normalize=True)``; it is the penalty of the ``"orthonormal"``
    regularizer variant (see ``docs/peers.md``). It is invariant to the scale of each neuron (up to the ``eps``
    terms), as MHE is.

    Args:
        neurons: ``(N, d)`` or ``(B, N, d)``.
        eps: The constant inside the norm's square root.
        check_finite: Raise a ``ValueError`` on NaN/Inf input.

    Returns:
        A scalar, or ``(B,)``.

    Example::

        >>> w = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # orthogonal rows of any norm
        >>> orthonormality(w, eps=1e-12).item() < 1e-10
        True
    """
    return soft_orthogonality(neurons, normalize=True, eps=eps, check_finite=check_finite)


def _check_vectors(vectors: Tensor, batch: int, m: int, batched: bool) -> None:
    expected = (batch, m) if batched else (m,)
    if not isinstance(vectors, Tensor) or not vectors.is_floating_point():
        raise TypeError(f"`vectors` must be a floating-point torch.Tensor, got {type(vectors).__name__}.")
    if tuple(vectors.shape) != expected:
        raise ValueError(
            f"`vectors` must have shape {expected} (one vector of size m = min(N, d) = {m} per neuron set), "
            f"got {tuple(vectors.shape)}."
        )


def _normalize_vectors(v: Tensor) -> Tensor:
    norm = v.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, v / norm.clamp_min(torch.finfo(v.dtype).tiny), v)


def srip_power_iteration(
    neurons: Tensor,
    vectors: Tensor | None = None,
    iterations: int = 1,
    *,
    normalize: bool = False,
    eps: float = 1e-4,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Power iteration on :math:`M = G - I_m`: ``iterations`` steps of :math:`v \leftarrow M v / \|M v\|`.

    Runs without autograd on the detached neurons. :math:`M` is symmetric, so ``v`` converges to an eigenvector of
    the eigenvalue of largest magnitude, whose magnitude is the spectral norm. A vector with :math:`M v = 0` is left
    unchanged.

    Args:
        neurons: ``(N, d)`` or ``(B, N, d)``.
        vectors: The current unit vectors, ``(m,)`` or ``(B, m)`` with ``m = min(N, d)``. ``None``: start from
            standard normal vectors drawn from ``generator`` (on the CPU, then moved), normalized.
        iterations: Number of power-iteration steps (``>= 0``).
        normalize: Use the eps-normalized rows (as in :func:`srip`).
        eps: The constant inside the norm's square root.
        generator: The generator for the initial vectors (``None``: the global one).

    Returns:
        The new unit vectors, in the compute dtype and on the neurons' device.

    Raises:
        ValueError: For a bad shape, ``iterations`` or ``eps``.
    """
    check_neurons(neurons)
    check_eps(eps)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"`iterations` must be an int >= 0, got {iterations!r}.")
    batched = neurons.ndim == 3
    batch = neurons.shape[0] if batched else 1
    m = min(neurons.shape[-2:])
    with torch.no_grad(), autocast_off(neurons.device):
        w = _rows(neurons.detach(), normalize, float(eps))
        if vectors is None:
            v = torch.randn(batch, m, generator=generator, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        else:
            _check_vectors(vectors, batch, m, batched)
            v = vectors.detach().to(device=w.device, dtype=w.dtype).reshape(batch, m)
        v = _normalize_vectors(v)
        if iterations:
            residual = _residual(w)
            for _ in range(iterations):
                v = _normalize_vectors((residual @ v[..., None])[..., 0])
    return v if batched else v[0]


def srip(
    neurons: Tensor,
    vectors: Tensor,
    *,
    normalize: bool = False,
    squared: bool = False,
    eps: float = 1e-4,
    check_finite: bool = True,
) -> Tensor:
    r"""SRIP (Bansal et al., NeurIPS 2018): the spectral norm :math:`\sigma(G - I_m)`, estimated as :math:`\|M v\|`.

    ``v`` (``vectors``) comes from :func:`srip_power_iteration` and is treated as a constant, so the gradient is
    :math:`\nabla_W \|M(W) v\|`, which at convergence equals the gradient of the spectral norm itself. The released
    code (``l2_reg_ortho``) draws a fresh uniform vector at every step, does one power step and returns the *square*
    of the estimate; we keep the vector across steps (a warm start, as ``torch.nn.utils.spectral_norm`` does), so one
    step per optimizer step (two matrix-vector products, as in their code) tracks the top singular direction.

    Args:
        neurons: ``(N, d)`` or ``(B, N, d)``.
        vectors: Unit vectors ``(m,)`` or ``(B, m)``, ``m = min(N, d)``.
        normalize: Use the eps-normalized rows (default: the raw rows, as Bansal et al.).
        squared: Return :math:`\|M v\|^2` (the released code's value) instead of :math:`\|M v\|` (the paper's).
        eps: The constant inside the norm's square root (only used with ``normalize``).
        check_finite: Raise a ``ValueError`` on NaN/Inf input.

    Returns:
        A scalar, or ``(B,)``.

    Example::

        >>> w = torch.diag(torch.tensor([2.0, 1.0, 0.5]))
        >>> v = srip_power_iteration(w, torch.ones(3), iterations=50)
        >>> round(srip(w, v).item(), 4)  # max |s_i^2 - 1| = |4 - 1|
        3.0
    """
    check_neurons(neurons)
    check_eps(eps)
    if check_finite:
        _check_finite(neurons)
    batched = neurons.ndim == 3
    batch = neurons.shape[0] if batched else 1
    m = min(neurons.shape[-2:])
    _check_vectors(vectors, batch, m, batched)
    with autocast_off(neurons.device):
        w = _rows(neurons, normalize, float(eps))
        v = vectors.detach().to(device=w.device, dtype=w.dtype).reshape(batch, m)
        mv = (_residual(w) @ v[..., None])[..., 0]
        # vector_norm has a zero (not NaN) gradient at Mv = 0, e.g. for exactly orthonormal neurons.
        out = mv.pow(2).sum(-1) if squared else torch.linalg.vector_norm(mv, dim=-1)
    return out if batched else out[0]
