r"""The pairwise kernel :math:`g_k(c) = E[f(r) + f(-r) \mid c]` of the exact expected RP-CoMHE energy.

One job: build (closed forms for chordal ``s = 0`` and ``s = 2``, else a table of the quadrature of Fisher's density,
:mod:`lightning_comhe.functional._fisher`), cache and evaluate :math:`g_k` and its derivative.
:mod:`lightning_comhe.functional.expected` documents the mathematics and sums the kernel over the pairs of a set.
"""

import functools
import math
import numbers

import torch
from torch import Tensor

from lightning_comhe.functional import _fisher
from lightning_comhe.functional._checks import check_eps
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.functional.energy import PowerLike, parse_power

__all__ = ["ExpectedKernel", "expected_kernel"]


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
