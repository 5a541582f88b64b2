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

import functools
import math
import numbers

import torch
from torch import Tensor

from lightning_comhe.functional import _fisher
from lightning_comhe.functional._checks import check_eps, check_neurons
from lightning_comhe.functional._checks import check_finite as _check_finite
from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.functional._tiled import eps_normalize
from lightning_comhe.functional.energy import PowerLike, parse_power

__all__ = ["ExpectedKernel", "expected_kernel", "expected_projected_energy"]

# Gram elements per tile (sets × rows × columns); each tile holds ~20 temporaries of this size.
_TILE_ELEMENTS = 1 << 16


def _floor(x: Tensor, b: Tensor) -> Tensor:
    """``max(x, b)`` with the derivative of ``x`` (the eps bound only undoes rounding), as in ``energy``."""
    y = torch.maximum(x, b)
    if x.requires_grad:
        y = y.detach() + (x - x.detach())
    return y


def _digamma_shifted(x: float) -> float:
    """``ψ(x) + γ`` for an integer or half-integer ``x >= 1/2``: ψ(x + 1) = ψ(x) + 1/x, ψ(1/2) + γ = -2 log 2."""
    if float(x).is_integer():
        return math.fsum(1.0 / j for j in range(1, int(x)))
    return -2.0 * math.log(2.0) + math.fsum(1.0 / (j + 0.5) for j in range(int(x - 0.5)))


def _digamma_gap(k: int) -> float:
    """``ψ(k/2) - ψ((k-1)/2)``, the c-independent shift ``E[-log(1-r²) | c] + log(1-c²)`` (a Wishart log-det)."""
    return _digamma_shifted(k / 2) - _digamma_shifted((k - 1) / 2)


class ExpectedKernel:
    r"""The pairwise kernel :math:`g_k` of the expected RP-CoMHE energy (see the module docstring).

    Build it with :func:`expected_kernel`. Calling it evaluates :math:`g_k(c)`; ``c`` may be a tensor (float64 stays
    float64, other dtypes compute in float32) or anything ``torch.as_tensor`` accepts (float64). Values at
    :math:`|c| = 1` are the limits (``inf`` where the chordal term diverges).

    Attributes:
        projection_dim: ``k``.
        s: The exponent.
        angular: Whether the angular distance is used.
        eps: The eps inside the angular :math:`A` (``None`` for the chordal terms, which do not depend on it).
    """

    def __init__(self, projection_dim: int, s: float, angular: bool, eps: float) -> None:
        self.projection_dim, self.s, self.angular = projection_dim, s, angular
        self.eps = eps if angular else None
        self._eps = float(eps) if angular else 0.0
        self._closed = not angular and s in (0.0, 2.0)
        self._table = None if self._closed else _fisher.build_table(projection_dim, s, angular, self._eps)
        self._gap = _digamma_gap(projection_dim) if not angular and s == 0 else 0.0
        self._coef: dict[tuple[torch.dtype, torch.device], tuple[Tensor, ...]] = {}

    def __repr__(self) -> str:
        eps = f", eps={self.eps!r}" if self.angular else ""
        return f"ExpectedKernel(projection_dim={self.projection_dim}, s={self.s}, angular={self.angular}{eps})"

    def __call__(self, c: Tensor | float) -> Tensor:
        """:meth:`term`."""
        return self.term(c)

    # ---- public evaluation (no eps floor) ---------------------------------------------------------------------
    def term(self, c: Tensor | float) -> Tensor:
        r""":math:`g_k(c) = E[f(r) + f(-r) \mid c]`."""
        c = self._as_tensor(c)
        return self._pair(c, torch.zeros_like(c), need_grad=False)[0]

    def derivative(self, c: Tensor | float) -> Tensor:
        r""":math:`g_k'(c)`, exact up to the table's interpolation error (C¹, consistent with :meth:`term`)."""
        c = self._as_tensor(c)
        return self._pair(c, torch.zeros_like(c), need_grad=True)[1]

    def correction(self, c: Tensor | float) -> Tensor:
        r"""The correction of the half-space term, even in ``c``, smooth and bounded up to :math:`|c| = 1`.

        It is the ratio :math:`h_k(c) = g_k(c)/(f(c) + f(-c))` for ``s > 0`` and the difference
        :math:`g_k(c) - f(c) - f(-c)` for ``s = 0``.
        """
        c = self._as_tensor(c)
        k, s = self.projection_dim, self.s
        if self._closed:
            return (k - 2 + 2 * c * c) / (k - 3) if s == 2 else torch.full_like(c, self._gap)
        dp, dm = 2 - 2 * c, 2 + 2 * c
        theta, theta_m = 2 * torch.atan2(dp.sqrt(), dm.sqrt()), 2 * torch.atan2(dm.sqrt(), dp.sqrt())
        hp, _ = self._lookup(theta, theta_m)
        hm, _ = self._lookup(theta_m, theta)
        if s == 0:
            return hp + hm
        if self.angular:  # the weights f(±c)/(f(c) + f(-c)), finite at |c| = 1
            ap, am = theta / math.pi + self._eps, theta_m / math.pi + self._eps
            wp, wm = 1 / (1 + (ap / am).pow(s)), 1 / (1 + (am / ap).pow(s))
        else:
            wp, wm = 1 / (1 + (dp / dm).pow(s / 2)), 1 / (1 + (dm / dp).pow(s / 2))
        return hp * wp + hm * wm

    # ---- internals ----------------------------------------------------------------------------------------------
    @staticmethod
    def _as_tensor(c: Tensor | float) -> Tensor:
        if isinstance(c, Tensor):
            return c.to(compute_dtype(c)) if c.is_floating_point() else c.to(torch.float64)
        return torch.as_tensor(c, dtype=torch.float64)

    def self_term(self) -> float:
        """:math:`f(-1)`, the term of each self pair :math:`(w_i, -w_i)`."""
        x = 1.0 + self._eps if self.angular else 4.0
        return -math.log(x) if self.s == 0 else x ** (-self.s if self.angular else -self.s / 2)

    def _lookup(self, theta: Tensor, theta_m: Tensor) -> tuple[Tensor, Tensor]:
        """``H(θ)`` and ``dH/dθ`` from the table; ``theta_m = π - θ`` (computed without cancellation).

        The cubic of interval ``j`` is evaluated at ``t = (τ - τ_j)/dtau`` by fused multiply-adds; the in-place
        steps act on fresh temporaries whose backward does not need them, so the lookup stays differentiable.
        """
        tab = self._table
        key = (theta.dtype, theta.device)
        if key not in self._coef:
            coef = torch.as_tensor(tab.coef, dtype=theta.dtype, device=theta.device)
            self._coef[key] = tuple(coef[:, j].contiguous() for j in range(4))
        ta, tb = theta + tab.a, theta_m + tab.b
        x = torch.log(ta / tb).sub_(tab.tau0).mul_(1 / tab.dtau)
        xf = torch.floor(x.detach()).clamp_(0, tab.coef.shape[0] - 1)
        idx = xf.long()
        t = x - xf
        a0, a1, a2, a3 = (c.take(idx) for c in self._coef[key])
        inner = torch.addcmul(a2, t, a3)  # a2 + a3 t
        value = torch.addcmul(a0, t, torch.addcmul(a1, t, inner))
        slope = torch.addcmul(a1, t, torch.addcmul(inner, t, a3).add_(inner))  # a1 + (2 a2 + 3 a3 t) t
        # dτ/dθ = 1/(θ + a) + 1/(π - θ + b) = (π + a + b) / ((θ + a)(π - θ + b))
        return value, slope / (ta * tb).mul_(tab.dtau / (math.pi + tab.a + tab.b))

    def _pair(self, c: Tensor, b: Tensor, need_grad: bool = True) -> tuple[Tensor, Tensor | None]:
        """``g_k(c)`` with the eps bound ``b`` on ``2 ∓ 2c``, and ``dg_k/dc``; plain, twice-differentiable ops."""
        k, s, eps = self.projection_dim, self.s, self._eps
        dp, dm = _floor(2 - 2 * c, b), _floor(2 + 2 * c, b)
        if self._closed:  # chordal s = 0 or 2
            if s == 0:
                value = self._gap - (torch.log(dp) + torch.log(dm))  # (symmetric sums: exactly even in c)
                return value, (2 / dp - 2 / dm) if need_grad else None
            fp, fm = 1 / dp, 1 / dm  # g = (k (f(c) + f(-c)) - 2)/(k - 3): the half-space term, rescaled
            value = (fp + fm).mul_(k / (k - 3)).sub_(2 / (k - 3))
            return value, (fp * fp - fm * fm).mul_(2 * k / (k - 3)) if need_grad else None
        rp, rm = dp.sqrt(), dm.sqrt()
        theta, theta_m = 2 * torch.atan2(rp, rm), 2 * torch.atan2(rm, rp)
        jac = 2 / (rp * rm)  # -dθ/dc
        if self.angular:
            ap, am = theta / math.pi + eps, theta_m / math.pi + eps
            if s == 0:
                fp, fm, dfp, dfm = -torch.log(ap), -torch.log(am), jac / (math.pi * ap), -jac / (math.pi * am)
            else:
                fp, fm = ap.pow(-s), am.pow(-s)
                dfp, dfm = (s / math.pi) * jac * fp / ap, -(s / math.pi) * jac * fm / am
        elif s == 0:  # (chordal s = 0 is a closed form; kept for the table's tests)
            fp, fm, dfp, dfm = -torch.log(dp), -torch.log(dm), 2 / dp, -2 / dm
        else:
            fp, fm = dp.pow(-s / 2), dm.pow(-s / 2)
            dfp, dfm = s * fp / dp, -s * fm / dm
        hp, hp1 = self._lookup(theta, theta_m)
        hm, hm1 = self._lookup(theta_m, theta)
        if s == 0:
            value = (fp + fm) + (hp + hm)
            return value, (dfp + dfm - jac * (hp1 - hm1)) if need_grad else None
        value = hp * fp + hm * fm
        return value, (hp * dfp + hm * dfm - jac * (hp1 * fp - hm1 * fm)) if need_grad else None


@functools.lru_cache(maxsize=64)
def _cached_kernel(projection_dim: int, s: float, angular: bool, eps: float) -> ExpectedKernel:
    return ExpectedKernel(projection_dim, s, angular, eps)


def _check_projection_dim(projection_dim: int, s: float, angular: bool) -> None:
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, numbers.Integral) or projection_dim < 1:
        raise ValueError(f"`projection_dim` must be an int >= 1, got {projection_dim!r}.")
    if projection_dim <= s + 1:
        why = (
            "the angular terms are finite only through eps and grow like eps^-(s+1-k)"
            if angular
            else "the expected projected energy diverges"
        )
        raise ValueError(
            f"`projection_dim` must be > s + 1 = {s + 1:g} for power s = {s:g} ({why}), got {projection_dim}."
        )


def expected_kernel(
    projection_dim: int, power: PowerLike = 2, angular: bool = False, eps: float = 1e-4
) -> ExpectedKernel:
    r"""The pairwise kernel :math:`g_k` of :func:`expected_projected_energy`, for plotting and inspection.

    Kernels are cached by ``(projection_dim, s, angular, eps)`` (``eps`` only for the angular terms). Building one
    takes ~50 ms (a quadrature of Fisher's density at ~1000 angles and a 4096-interval table); the chordal powers
    ``0`` and ``2`` are closed forms.

    Args:
        projection_dim: The projected dimension ``k``; must be ``> s + 1``.
        power: See :func:`lightning_comhe.functional.energy.hyperspherical_energy`.
        angular: Use the angular distance (an ``"a"`` power string forces it).
        eps: The eps inside the angular :math:`A` (unused by the chordal terms). Must be ``> 0``.

    Returns:
        An :class:`ExpectedKernel`: ``kernel(c)`` or ``kernel.term(c)`` is :math:`g_k(c)`, ``kernel.derivative(c)``
        is :math:`g_k'(c)` and ``kernel.correction(c)`` the correction of the half-space term.

    Raises:
        ValueError: For a bad argument, or ``projection_dim <= s + 1`` (the expectation diverges).

    Example::

        >>> h = expected_kernel(40)  # s = 2: h_k(c) = (k - 2 + 2c²)/(k - 3)
        >>> [round(v, 4) for v in h.correction(torch.tensor([0.0, 0.99], dtype=torch.float64)).tolist()]
        [1.027, 1.08]
        >>> g = expected_kernel(10, "a1")
        >>> bool(torch.allclose(g(torch.tensor(0.3)), g(torch.tensor(-0.3))))
        True
    """
    s, angular = parse_power(power, angular)
    check_eps(eps)
    _check_projection_dim(projection_dim, s, angular)
    return _cached_kernel(int(projection_dim), s, angular, float(eps) if angular else 0.0)


# ---------------------------------------------------------------------------------------------------------------
# The energy: a sum over i < j in tiles of Gram rows, with the gradient formed in the forward pass
# ---------------------------------------------------------------------------------------------------------------


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
    s, angular = parse_power(power, angular)
    check_eps(eps)
    _check_projection_dim(projection_dim, s, angular)
    if check_finite:
        _check_finite(neurons, "neurons", "expected projected energy")
    kernel = _cached_kernel(int(projection_dim), s, angular, float(eps) if angular else 0.0)
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
