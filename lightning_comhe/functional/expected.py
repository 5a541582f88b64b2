r"""The exact expectation of RP-CoMHE: the mean over infinitely many Gaussian projections, in closed form.

RP-CoMHE (``projected_energy(W, P, half_space=True)`` with Gaussian ``P``, as in rmlin/CoMHE) averages the
half-space energy of projected neurons over ``C`` random ``k × d`` projections. For ``P`` with i.i.d. ``N(0, 1)``
entries, the cosine :math:`r` of ``Pu`` and ``Pv`` depends only on the cosine :math:`c` of ``u`` and ``v``: it is
distributed as the sample correlation of ``n = k + 1`` draws of a bivariate normal with correlation :math:`c`
(Fisher's law; the uncentred correlation of ``k`` draws has the law of the centred one of ``k + 1``). So the
``C → ∞`` mean is a full-space energy with the pairwise kernel

.. math::

    g_k(c) = E\big[f(r) + f(-r) \mid c\big], \qquad
    \bar E_k(W) = \frac{2\sum_{i<j} g_k(c_{ij}) + N f(-1)}{N(2N-1)},

where ``f`` is the library's pairwise term (chordal :math:`(2-2c)^{-s/2}` or :math:`-\log(2-2c)`, angular
:math:`A^{-s}` or :math:`-\log A` with :math:`A = \arccos(c)/\pi + \text{eps}`). It costs one full-space energy:
no projection matmuls, no sampling noise, no random state (for ``s = 2`` about the time of half-space MHE; the
tabulated powers take 2 to 5 times that, still less than RP-CoMHE with the official C = 20, k = 40). Since
``r | -c`` is distributed as ``-r | c``, :math:`g_k(c) = H(\theta) f(c) + H(\pi - \theta) f(-c)` with
:math:`\theta = \arccos c` and the smooth, bounded one-sided ratio :math:`H(\theta) = E[f(r) \mid c]/f(c)`
(``s > 0``; for ``s = 0`` the difference :math:`E[f(r) \mid c] - f(c)`), so :math:`g_k` is even in ``c``.

Closed forms. Chordal ``s = 2`` (the official RP-CoMHE):
:math:`g_k(c) = \frac{k - 2 + 2c^2}{(k-3)(1 - c^2)} = \frac{k}{k-3}\big(f(c) + f(-c)\big) - \frac{2}{k-3}`, i.e. the
correction ratio :math:`h_k(c) = g_k(c)/(f(c) + f(-c)) = (k - 2 + 2c^2)/(k - 3)`, and the expected gradient is exactly
``k/(k-3)`` times the half-space one. Chordal ``s = 0``:
:math:`g_k(c) = f(c) + f(-c) + \psi(k/2) - \psi((k-1)/2)` (a constant shift: the expected gradient is exactly the
half-space one). Otherwise ``H`` is computed at construction by quadrature of Fisher's density and tabulated (C¹
cubic Hermite, relative error ~1e-10 in float64; see :mod:`lightning_comhe.functional._fisher`).

The expectation is finite if and only if ``k > s + 1`` (near :math:`r = 1` the density is
:math:`\propto (1 - r)^{(k-3)/2}` and the term :math:`\propto (1 - r)^{-s/2}`); the angular terms are the same up
to eps, which keeps them finite but eps-dominated, so both raise below the bound. The Monte Carlo variance of
RP-CoMHE is finite only for ``k > 2s + 1`` (``k > 2s + 3`` for its gradient).

The official eps: the law of ``r`` is conditional on the exact full-space cosine; here it is conditioned on the
eps-cosine :math:`c_{ij} = \langle w_i, w_j\rangle/(n_i n_j)`, :math:`n_i = \sqrt{\|w_i\|^2 + \text{eps}}`, and the
eps of the projected norms is dropped (:math:`\|Pw\|^2 \approx k\|w\|^2 \gg` eps). The half-space terms
:math:`f(\pm c)` use the library's semantics: :math:`2 \mp 2c` raised to the exact lower bound
:math:`\text{eps}/n_i^2 + \text{eps}/n_j^2` with the derivative of the unclamped expression (as in
:mod:`lightning_comhe.functional.energy`), and the angular :math:`A` keeps its ``+ eps``. The self pairs
:math:`(w_i, -w_i)` have :math:`r = -1` exactly, so each contributes the constant :math:`f(-1)`
(:math:`4^{-s/2}`, :math:`-\log 4`, :math:`(1 + \text{eps})^{-s}` or :math:`-\log(1 + \text{eps})`); in
``projected_energy`` the same pair has :math:`1 + r = \text{eps}/(\|Pw_i\|^2 + \text{eps})`, a difference of the
order of that projected-norm eps.
"""

import torch
from torch import Tensor

from lightning_comhe.functional._checks import check_finite as _check_finite
from lightning_comhe.functional._checks import check_neurons
from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.functional._expected_kernel import ExpectedKernel, expected_kernel
from lightning_comhe.functional._tiled import eps_normalize
from lightning_comhe.functional.energy import PowerLike

__all__ = ["ExpectedKernel", "expected_kernel", "expected_projected_energy"]

# Gram elements per tile (sets × rows × columns); each tile holds ~20 temporaries of this size.
_TILE_ELEMENTS = 1 << 16


def _tile_sums(u: Tensor, q: Tensor, kernel: ExpectedKernel, rows: int, need_grad: bool):
    """Per-set ``Σ_{i<j} g(c_ij)`` (B,) and, if asked, its gradient with respect to ``u`` (B, N, d); no graph."""
    bsz, n, _ = u.shape
    total = u.new_zeros(bsz)
    grad = torch.zeros_like(u) if need_grad else None
    idx = torch.arange(n, device=u.device)
    for r0 in range(0, n - 1, rows):
        r1 = min(r0 + rows, n)
        ur, uc = u[:, r0:r1], u[:, r0:]
        drop = idx[r0:][None, :] <= idx[r0:r1][:, None]  # keep the strict upper triangle
        c = torch.bmm(ur, uc.transpose(1, 2)).masked_fill_(drop, 0.0)
        value, dterm = kernel._pair(c, q[:, r0:r1, None] + q[:, None, r0:], need_grad)
        total += value.masked_fill_(drop, 0.0).sum(dim=(1, 2))
        if grad is not None:
            dterm = dterm.masked_fill_(drop, 0.0)
            grad[:, r0:r1] += torch.bmm(dterm, uc)
            grad[:, r0:] += torch.bmm(dterm.transpose(1, 2), ur)
    return total, grad


def _differentiable_grad(u: Tensor, q: Tensor, kernel: ExpectedKernel, rows: int, scale: Tensor) -> Tensor:
    """The gradient of the pair sums, built out of place from differentiable ops (double backward)."""
    bsz, n, _ = u.shape
    idx = torch.arange(n, device=u.device)
    grad = torch.zeros_like(u)
    for r0 in range(0, n - 1, rows):
        r1 = min(r0 + rows, n)
        ur, uc = u[:, r0:r1], u[:, r0:]
        keep = idx[r0:][None, :] > idx[r0:r1][:, None]
        c = torch.where(keep, torch.bmm(ur, uc.transpose(1, 2)), 0.0)
        _, dterm = kernel._pair(c, q[:, r0:r1, None] + q[:, None, r0:], True)
        w = torch.where(keep, dterm, 0.0) * scale[:, None, None]
        grad = grad + torch.nn.functional.pad(torch.bmm(w, uc), (0, 0, r0, n - r1))
        grad = grad + torch.nn.functional.pad(torch.bmm(w.transpose(1, 2), ur), (0, 0, r0, 0))
    return grad


class _ExpectedPairSum(torch.autograd.Function):
    """``Σ_{i<j} g(c_ij)`` per set from the eps-normalized neurons ``u`` and the bound halves ``q`` (constants).

    Memory O(B·tile + B·N·d): the forward pass forms the gradient tile by tile, backward only scales it; double
    backward recomputes the tiles from differentiable ops.
    """

    @staticmethod
    def forward(ctx, u: Tensor, q: Tensor, kernel: ExpectedKernel, rows: int, need_grad: bool) -> Tensor:
        total, grad = _tile_sums(u, q, kernel, rows, need_grad)
        ctx.save_for_backward(u, q, grad)
        ctx.kernel, ctx.rows = kernel, rows
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, q, grad = ctx.saved_tensors
        if torch.is_grad_enabled():
            grad = _differentiable_grad(u, q, ctx.kernel, ctx.rows, grad_out)
        else:
            if grad is None:  # the forward ran under no_grad
                grad = _tile_sums(u, q, ctx.kernel, ctx.rows, True)[1]
            grad = grad * grad_out[:, None, None]
        return grad, None, None, None, None


def expected_projected_energy(
    neurons: Tensor,
    projection_dim: int,
    power: PowerLike = 2,
    *,
    angular: bool = False,
    eps: float = 1e-4,
    check_finite: bool = True,
) -> Tensor:
    r"""The exact ``C → ∞`` mean of RP-CoMHE: :math:`E_P[\,\text{projected\_energy}(W, P, \text{half\_space=True})]`.

    The expectation is over projections ``P`` of shape ``(C, k, d)`` with i.i.d. ``N(0, 1)`` entries (the official
    RP-CoMHE draws), computed as the full-space energy

    .. math::

        \bar E_k(W) = \frac{2\sum_{i<j} g_k(c_{ij}) + N f(-1)}{N(2N-1)}, \qquad
        g_k(c) = E\big[f(r) + f(-r) \mid c\big],

    with the eps-cosines :math:`c_{ij}` and the kernel of :func:`expected_kernel` (derivation, eps semantics and
    the self pairs: see the module docstring). Chordal ``s = 2`` (the official RP-CoMHE) is exactly
    ``k/(k - 3)`` times half-space MHE, minus a constant (:math:`g_k = (k(f(c) + f(-c)) - 2)/(k - 3)`).

    The energy is computed in float32 (float64 for float64 input) with autocast disabled, in tiles of Gram rows
    (memory O(N·tile + N·d)); it is differentiable twice.

    Args:
        neurons: ``(N, d)``, one neuron per row, or ``(G, N, d)`` for G equally shaped sets. ``N >= 2``.
        projection_dim: The projected dimension ``k`` (official RP-CoMHE: 40); must be ``> s + 1``.
        power: ``0``, any float ``> 0``, or the official strings ``"0"``, ``"1"``, ``"2"``, ``"a0"``, ``"a1"``,
            ``"a2"``.
        angular: Use the angular distance (an ``"a"`` string forces it).
        eps: The constant inside each norm's square root, also added to the normalized angle. Must be ``> 0``.
        check_finite: Raise a ``ValueError`` if ``neurons`` holds NaN or Inf (a host synchronisation).

    Returns:
        A scalar for ``(N, d)`` input, or a ``(G,)`` tensor, in the compute dtype.

    Raises:
        ValueError: For a bad shape, argument or non-finite input, or ``projection_dim <= s + 1``.
        TypeError: For a non-floating-point input.

    Example::

        >>> import torch
        >>> from lightning_comhe.functional.energy import hyperspherical_energy
        >>> w = torch.eye(3, dtype=torch.float64)  # orthogonal: every c_ij = 0, so g_k(0) = (k - 2)/(k - 3)
        >>> e = expected_projected_energy(w, 40)
        >>> round(e.item(), 6), round((e / hyperspherical_energy(w, half_space=True)).item(), 6)
        (0.460811, 1.024018)
    """
    check_neurons(neurons, "neurons", min_neurons=2)
    kernel = expected_kernel(projection_dim, power, angular, eps)  # validates power, eps and k > s + 1; cached
    if check_finite:
        _check_finite(neurons, "neurons", "expected projected energy")
    with autocast_off(neurons.device):
        v = neurons.to(compute_dtype(neurons))
        batched = v.ndim == 3
        v = v if batched else v[None]
        bsz, n, _ = v.shape
        u, nrm2, e = eps_normalize(v, eps, fused=False)  # rescales rows whose squared norm would overflow
        q = (nrm2.reciprocal() * e).detach()
        rows = max(1, min(n, _TILE_ELEMENTS // max(1, bsz * n)))
        need_grad = u.requires_grad and torch.is_grad_enabled()
        pair_sum = _ExpectedPairSum.apply(u, q, kernel, rows, need_grad)
        energy = (2 * pair_sum + n * kernel.self_term()) / (n * (2 * n - 1))
    return energy if batched else energy[0]
