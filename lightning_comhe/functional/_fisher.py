r"""Exact law of a projected cosine (private numerics of :mod:`lightning_comhe.functional.expected`).

For unit vectors at angle :math:`\theta` and a Gaussian ``k × d`` projection, the angle :math:`\varphi` between the
projected vectors follows Fisher's law of the sample correlation :math:`r = \cos\varphi` with ``n = k + 1``:

.. math::

    p(\varphi \mid \theta) = \frac{(k-1)\,\Gamma(k)}{\sqrt{2\pi}\,\Gamma(k+\tfrac12)}
        \sin^k\theta \,\sin^{k-2}\varphi\,(1 - \cos\theta\cos\varphi)^{-(k-1/2)}\,
        {}_2F_1\big(\tfrac12, \tfrac12; k + \tfrac12; \tfrac{1 + \cos\theta\cos\varphi}{2}\big).

This module computes, in float64 numpy, the one-sided expectation :math:`K(\theta) = E[\rho(\varphi, \theta)]` of
the ratio :math:`\rho = f(\cos\varphi)/f(\cos\theta)` (``s > 0``) or of the difference
:math:`\rho = f(\cos\varphi) - f(\cos\theta)` (``s = 0``), where ``f`` is the pairwise energy term, and tabulates it
for evaluation by cubic Hermite interpolation.

* Quadrature: the variable :math:`\ell = \log w`, :math:`w = \tan(\varphi/2)/\tan(\theta/2)`, makes the law
  scale-free at both ends (:math:`\theta \to 0, \pi`: the profile of :math:`w` tends to a fixed ratio of chi
  variables), and the tails decay like :math:`e^{-(k-1-s)|\ell|}`; the substitution :math:`\ell = \sigma\sinh t` and
  the trapezoidal rule in ``t`` (double-exponential quadrature) give about 1e-13 with ~60 to 100 nodes.
* :math:`{}_2F_1(\tfrac12,\tfrac12;k+\tfrac12;z)`: its Maclaurin series for ``z <= 3/4``; otherwise the connection
  formula at ``1 - z``, whose second branch is again the same function (Euler's transformation), both converging
  at least like :math:`4^{-m}`.
* Table: ``K`` at Chebyshev nodes of panels of the variable :math:`\tau = \log((\theta + a)/(\pi - \theta + b))`,
  graded towards both ends, where ``K`` has weak non-analytic terms such as :math:`(\pi-\theta)^2\log(\pi-\theta)`
  (``a = b = 1e-4``; ``a = 1e-4·π·eps`` for the angular terms, whose eps makes ``K`` vary on the scale
  :math:`\theta \sim \pi\,\text{eps}`), then values and
  derivatives of the panel interpolants at ``_INTERVALS + 1`` equispaced nodes in ``τ``, as the coefficients of a
  C¹ cubic per interval.
"""

import math
from typing import NamedTuple

import numpy as np
from numpy.polynomial import chebyshev as _cheb

__all__ = ["Table", "build_table", "hyp2f1_half", "ratio_expectation"]

_STEP = 0.1  # trapezoidal step in t
_PANEL_WIDTH = 0.6  # panel width in τ
_PANEL_NODES = 24
_INTERVALS = 4096
_OFFSET = 1e-4  # grading of the table towards θ = 0 and θ = π (the offsets `a`, `b`)


class Table(NamedTuple):
    """A cubic Hermite table of ``K`` on ``τ = log((θ + a)/(π - θ + b))``, ``τ ∈ [tau0, tau0 + dtau·M]``.

    ``coef[j]`` (shape ``(M, 4)``) holds the cubic ``c0 + c1 t + c2 t² + c3 t³`` of interval ``j`` in the local
    variable ``t = (τ - τ_j)/dtau ∈ [0, 1]``.
    """

    a: float
    b: float
    tau0: float
    dtau: float
    coef: np.ndarray


def _maclaurin(k: int, x: np.ndarray, nterms: int) -> np.ndarray:
    """Σ_m (1/2)_m² / ((k+1/2)_m m!) x^m, i.e. 2F1(1/2, 1/2; k + 1/2; x)."""
    term = np.ones_like(x)
    total = np.ones_like(x)
    for m in range(nterms):
        term = term * ((m + 0.5) ** 2 / ((m + k + 0.5) * (m + 1))) * x
        total = total + term
    return total


def hyp2f1_half(k: int, y: np.ndarray) -> np.ndarray:
    """``2F1(1/2, 1/2; k + 1/2; 1 - y)`` for ``y ∈ [0, 1]`` and an integer ``k >= 1`` (relative error ~1e-14).

    For ``1 - y <= 3/4`` the Maclaurin series; otherwise the connection formula at ``y`` (``c - a - b = k - 1/2`` is
    not an integer, so there is no logarithmic case):
    ``F(1-y) = A_k 2F1(1/2, 1/2; 3/2 - k; y) + (-1)^k (y / (1-y))^(k-1/2) F(y)``,
    with ``A_k = Γ(k+1/2)Γ(k-1/2)/Γ(k)²`` and the second branch rewritten by Euler's transformation.
    """
    y = np.asarray(y, dtype=np.float64)
    z = 1.0 - y
    out = np.empty_like(y)
    near = y < 0.25
    out[~near] = _maclaurin(k, z[~near], 128)
    if near.any():
        yy = y[near]
        term = np.ones_like(yy)
        s1 = np.ones_like(yy)
        for m in range(min(k, 40) + 40):
            term = term * ((m + 0.5) ** 2 / ((m + 1.5 - k) * (m + 1))) * yy
            s1 = s1 + term
        a_k = math.exp(math.lgamma(k + 0.5) + math.lgamma(k - 0.5) - 2.0 * math.lgamma(k)) if k > 0 else 0.0
        out[near] = a_k * s1 + (-1) ** k * (yy / (1.0 - yy)) ** (k - 0.5) * _maclaurin(k, yy, 40)
    return out


def ratio_expectation(theta: np.ndarray, k: int, s: float, angular: bool, eps: float) -> np.ndarray:
    r"""``K(θ) = E[ρ(φ, θ)]`` under Fisher's law, for ``θ ∈ (0, π)`` (float64, relative error ~1e-13).

    ``ρ`` is :math:`(\sin(\varphi/2)/\sin(\theta/2))^{-s}` (chordal) or
    :math:`((\varphi + \pi\,\text{eps})/(\theta + \pi\,\text{eps}))^{-s}` (angular) for ``s > 0``; for ``s = 0``
    it is the difference of the terms, minus the logarithm of the angular ratio or twice that of the chordal one.
    Requires ``k > s + 1``.
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1, 1)
    sigma = min(1.0, 2.0 / math.sqrt(k))
    beta = max(k - 1.0 - s, 1e-3)  # decay rate of the slower tail, in ℓ
    n = int(math.ceil(math.asinh(max(50.0 / (beta * sigma), 8.0)) / _STEP))
    t = np.arange(-n, n + 1) * _STEP
    ell = (sigma * np.sinh(t))[None, :]
    jac = (sigma * np.cosh(t) * _STEP)[None, :]
    half = theta / 2
    tan_half = np.tan(half)
    wt = np.exp(ell) * tan_half  # tan(φ/2)
    phi = 2.0 * np.arctan(wt)
    log_sin_phi = math.log(2.0) + np.log(wt) - np.log1p(wt * wt)  # dφ/dℓ = sin φ
    one_minus = np.sin(half - phi / 2) ** 2 + np.sin(half + phi / 2) ** 2  # 1 - cos θ cos φ, without cancellation
    log_c = math.log(k - 1.0) + math.lgamma(k) - 0.5 * math.log(2.0 * math.pi) - math.lgamma(k + 0.5)
    log_p = (
        log_c
        + k * np.log(np.sin(theta))
        + (k - 1) * log_sin_phi
        - (k - 0.5) * np.log(one_minus)
        + np.log(hyp2f1_half(k, one_minus / 2))
    )
    weight = np.exp(log_p) * jac
    if angular:
        log_ratio = np.log((phi + math.pi * eps) / (theta + math.pi * eps))
    else:  # sin(φ/2)/sin(θ/2) = w / (cos(θ/2) sqrt(1 + w² tan²(θ/2)))
        log_ratio = ell - np.log(np.cos(half)) - 0.5 * np.log1p(wt * wt)
    if s == 0:  # f = -log D = -2 log(2 sin(φ/2)) (chordal) or -log A (angular)
        rho = -log_ratio if angular else -2.0 * log_ratio
    else:  # f = (2 sin(φ/2))^-s or A^-s
        rho = np.exp(-s * log_ratio)
    # the ratio estimator cancels the (tiny) quadrature error of the total mass
    return (weight * rho).sum(1) / weight.sum(1)


def _panel_nodes(lo: float, hi: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    return x, lo + (hi - lo) * (x + 1.0) / 2.0


def build_table(k: int, s: float, angular: bool, eps: float) -> Table:
    """The cubic Hermite table of ``K`` on ``θ ∈ [0, π]`` (see the module docstring); ``k > s + 1``."""
    a = min(math.pi * eps, 1.0) * _OFFSET if angular else _OFFSET
    b = _OFFSET
    tau0, tau1 = math.log(a / (math.pi + b)), math.log((math.pi + a) / b)
    panels = max(1, math.ceil((tau1 - tau0) / _PANEL_WIDTH))
    edges = np.linspace(tau0, tau1, panels + 1)
    x, taus = zip(*(_panel_nodes(edges[p], edges[p + 1], _PANEL_NODES) for p in range(panels)), strict=True)
    values = ratio_expectation(_theta_of_tau(np.concatenate(taus), a, b), k, s, angular, eps).reshape(panels, -1)
    series = [_cheb.chebfit(x[p], values[p], _PANEL_NODES - 1) for p in range(panels)]
    dtau = (tau1 - tau0) / _INTERVALS
    nodes = tau0 + dtau * np.arange(_INTERVALS + 1)
    which = np.minimum(((nodes - tau0) / (tau1 - tau0) * panels).astype(int), panels - 1)
    v = np.empty_like(nodes)
    d = np.empty_like(nodes)  # dK/dτ
    for p in range(panels):
        sel = which == p
        half_width = (edges[p + 1] - edges[p]) / 2.0
        xs = (nodes[sel] - edges[p]) / half_width - 1.0
        v[sel] = _cheb.chebval(xs, series[p])
        d[sel] = _cheb.chebval(xs, _cheb.chebder(series[p])) / half_width
    v0, v1, d0, d1 = v[:-1], v[1:], d[:-1] * dtau, d[1:] * dtau
    coef = np.stack([v0, d0, 3.0 * (v1 - v0) - 2.0 * d0 - d1, 2.0 * (v0 - v1) + d0 + d1], axis=1)
    return Table(a=a, b=b, tau0=tau0, dtau=dtau, coef=coef)


def _theta_of_tau(tau: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inverse of ``τ = log((θ + a)/(π - θ + b))``."""
    e = np.exp(-np.abs(tau))
    return np.where(tau < 0, (e * (math.pi + b) - a) / (1.0 + e), ((math.pi + b) - a * e) / (1.0 + e))
