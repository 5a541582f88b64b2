r"""The pairwise terms of the energies, their derivatives, and the eps floor.

A leaf module (it imports only ``torch``). ``c`` is always a tile of eps-cosines
:math:`c_{ij} = \langle w_i, w_j\rangle / (n_i n_j)` with :math:`n_i = \sqrt{\|w_i\|^2 + \text{eps}}`, and ``b`` the
matching tile of exact lower bounds of :math:`2 \mp 2c`. For every power ``s >= 0`` the term of a pair is

* chordal: :math:`D^{-s/2}` (``s > 0``) or :math:`-\log D` (``s = 0``) of the squared chord :math:`D = 2 - 2c`;
* angular: :math:`A^{-s}` or :math:`-\log A` of :math:`A = \arccos(c)/\pi + \text{eps}`;
* half-space: :math:`2 f(c) + 2 f(-c)` (the pairs :math:`(w_i, w_j)` and :math:`(w_i, -w_j)` of :math:`[W; -W]`).

Numerical safety: :math:`2 \mp 2c_{ij} = \|\hat w_i \mp \hat w_j\|^2 + \text{eps}/n_i^2 + \text{eps}/n_j^2`, so the
squared chord is bounded below by :math:`b_{ij} = \text{eps}/n_i^2 + \text{eps}/n_j^2 > 0`. Values that floating
point cancellation pushes below this exact bound are raised to it, which keeps values and gradients finite for
duplicate, antipodal, zero and near-zero neurons. The floor only undoes rounding, so the derivative of the unclamped
expression is kept there (straight-through, :func:`straight_through_floor`): an exact duplicate pair keeps its
(large, radial) gradient, as in the official code, instead of losing it to the clamp. The angle is computed as
:math:`\theta = 2\,\mathrm{atan2}(\sqrt{D^+}, \sqrt{D^-})`, which equals :math:`\arccos c` and has a finite gradient
at :math:`c = \pm 1`.

Two evaluations: the reference formulas (:func:`reference_terms`, :func:`reference_terms_and_grad`; plain autograd,
twice differentiable, also the body of the compiled tiles) and, where the eps floor provably cannot bind (checked
per tile, on CPU, by :func:`floor_may_bind`), a few fused in-place passes over the tile (half-space ``s = 2``:
``1/(0.5 - 0.5c²)``). :func:`pair_terms` and :func:`pair_terms_and_grad` pick between them.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Bound",
    "LazyBound",
    "Scratch",
    "angle_dterm",
    "angle_term",
    "bound_tensor",
    "chord_dterm",
    "chord_term",
    "floor_may_bind",
    "pair_terms",
    "pair_terms_and_grad",
    "reference_terms",
    "reference_terms_and_grad",
    "straight_through_floor",
]


# ---------------------------------------------------------------------------------------------------------------
# Pairwise terms. `c` is a tile of eps-cosines, `b` the matching tile of exact lower bounds of 2 ∓ 2c.
# ---------------------------------------------------------------------------------------------------------------


def chord_term(d: Tensor, s: float) -> Tensor:
    """The chordal term of a squared chord ``d``: ``d^(-s/2)``, or ``-log d`` for ``s = 0``."""
    return -torch.log(d) if s == 0 else d.pow(-s / 2)


def chord_dterm(d: Tensor, s: float) -> Tensor:
    """Derivative of :func:`chord_term` with respect to ``d``."""
    return -1.0 / d if s == 0 else d.pow(-s / 2 - 1) * (-s / 2)


def angle_term(a: Tensor, s: float) -> Tensor:
    """The angular term of a shifted normalized angle ``a = θ/π + eps``: ``a^(-s)``, or ``-log a`` for ``s = 0``."""
    return -torch.log(a) if s == 0 else a.pow(-s)


def angle_dterm(a: Tensor, s: float) -> Tensor:
    """Derivative of :func:`angle_term` with respect to ``a``."""
    return -1.0 / a if s == 0 else a.pow(-s - 1) * (-s)


def straight_through_floor(x: Tensor, b: Tensor) -> Tensor:
    """``max(x, b)`` in value with the derivative of ``x`` (straight-through): the floor only undoes rounding."""
    y = torch.maximum(x, b)  # propagates NaN (check_finite=False with NaN input gives NaN, not a finite value)
    if x.requires_grad:
        y = y.detach() + (x - x.detach())  # x - x is exactly 0, so the value is unchanged
    return y


class LazyBound(NamedTuple):
    """The bound tile ``b = q_rows + q_cols`` (``(B, r, 1)`` and ``(B, 1, m)``), not materialised.

    ``max`` is ``max b`` when known (``None``: computed on demand).
    """

    q_rows: Tensor
    q_cols: Tensor
    max: float | None = None


Bound = Tensor | LazyBound


def bound_tensor(b: Bound) -> Tensor:
    """The bound tile as a tensor."""
    return b.q_rows + b.q_cols if isinstance(b, LazyBound) else b


def pair_terms(
    c: Tensor,
    b: Bound,
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    *,
    inplace: bool = False,
    scratch: "Scratch | None" = None,
) -> Tensor:
    """Per-pair energy terms. Half-space: ``2 f(c) + 2 f(-c)``.

    The reference formula is plain autograd (twice differentiable). With ``inplace=True`` and no gradient recorded,
    ``c`` is scratch: when the eps floor provably cannot bind anywhere in the tile (checked on CPU with one read
    pass; see :func:`floor_may_bind`), the terms are computed in place by a few fused passes, else by the
    reference formula. ``b`` may be given lazily as ``(q_rows, q_cols)``.
    """
    fast = inplace and not (c.requires_grad and torch.is_grad_enabled())
    if fast and not floor_may_bind(c, b, half_space or angular):
        return _fast_terms_(c, s, angular, half_space, eps, scratch or Scratch(c))
    return reference_terms(c, bound_tensor(b), s, angular, half_space, eps)


def reference_terms(c: Tensor, b: Tensor, s: float, angular: bool, half_space: bool, eps: float) -> Tensor:
    """Per-pair terms by the reference formula (plain autograd, floor always applied): ``b`` is the bound tile."""
    dp = straight_through_floor(2 - 2 * c, b)
    if half_space or angular:
        dm = straight_through_floor(2 + 2 * c, b)
    if not angular:
        out = chord_term(dp, s)
        if half_space:
            out = 2 * out + 2 * chord_term(dm, s)
        return out
    theta = 2 * torch.atan2(dp.sqrt(), dm.sqrt()) / math.pi  # in [0, 1]
    out = angle_term(theta + eps, s)
    if half_space:
        out = 2 * out + 2 * angle_term((1 - theta) + eps, s)
    return out


def pair_terms_and_grad(
    c: Tensor,
    b: Bound,
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    need_value: bool,
    *,
    inplace: bool = False,
    scratch: "Scratch | None" = None,
) -> tuple[Tensor | None, Tensor]:
    """Per-pair terms (optional) and their derivative with respect to ``c``; same semantics as `pair_terms`.

    With ``inplace=True`` and no gradient recorded, ``c`` is scratch and the results are computed in place when the
    floor cannot bind (see :func:`pair_terms`); ``scratch`` provides extra tile buffers.
    """
    fast = inplace and not (c.requires_grad and torch.is_grad_enabled())
    if fast and not floor_may_bind(c, b, half_space or angular):
        scratch = scratch or Scratch(c)
        if need_value:
            return _fast_terms_and_dterms_(c, s, angular, half_space, eps, scratch)
        return None, _fast_dterms_(c, s, angular, half_space, eps, scratch)
    return reference_terms_and_grad(c, bound_tensor(b), s, angular, half_space, eps, need_value)


def reference_terms_and_grad(
    c: Tensor, b: Tensor, s: float, angular: bool, half_space: bool, eps: float, need_value: bool
) -> tuple[Tensor | None, Tensor]:
    """Per-pair terms (if ``need_value``) and their derivative with respect to ``c``, by the reference formula."""
    dp = straight_through_floor(2 - 2 * c, b)
    if half_space or angular:
        dm = straight_through_floor(2 + 2 * c, b)
    value = None
    if not angular:
        # d/dc f(2 - 2c) = -2 g'(D+) ; d/dc f(2 + 2c) = +2 g'(D-)
        grad = chord_dterm(dp, s) * -2.0
        if need_value:
            value = chord_term(dp, s)
        if half_space:
            grad = 2 * grad + 4 * chord_dterm(dm, s)
            if need_value:
                value = 2 * value + 2 * chord_term(dm, s)
        return value, grad
    ra, rb = dp.sqrt(), dm.sqrt()
    theta = 2 * torch.atan2(ra, rb) / math.pi
    # dθ/dc for θ = 2 atan2(√D+, √D-), divided by π: -1/(π sqrt(1 - c²)) = -2/(π √D+ √D-).
    dtheta = (-2.0 / math.pi) / (ra * rb)
    grad = angle_dterm(theta + eps, s) * dtheta
    if need_value:
        value = angle_term(theta + eps, s)
    if half_space:
        # θ(-c) = 1 - θ(c) (normalized angle), so d/dc f(1 - θ) = -f'(1 - θ) dθ/dc.
        grad = 2 * grad - 2 * angle_dterm((1 - theta) + eps, s) * dtheta
        if need_value:
            value = 2 * value + 2 * angle_term((1 - theta) + eps, s)
    return value, grad


# ---------------------------------------------------------------------------------------------------------------
# Fast in-place tile evaluation (no autograd). Valid only where the floor does not bind, which `floor_may_bind`
# establishes exactly: then max(2 ∓ 2c, b) = 2 ∓ 2c in floating point, and the terms are algebraic rewrites of the
# reference formula with every constant factor folded into an existing pass (e.g. half-space s = 2:
# 2/(2 - 2c) + 2/(2 + 2c) = 1/(0.5 - 0.5c²), one addcmul and one reciprocal).
# ---------------------------------------------------------------------------------------------------------------


_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def _const(value: float, like: Tensor) -> Tensor:
    """A cached 0-dim tensor (the ``input`` of fused ops such as ``addcmul``), so tiles do not allocate scalars."""
    key = (float(value), like.dtype, like.device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 4096:
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.full((), float(value), dtype=like.dtype, device=like.device)
    return t


class Scratch:
    """Reusable flat tile buffers (slot -> storage), so that tiles do not allocate (and page-fault) every time."""

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.bufs: dict[int, Tensor] = {}

    def get(self, slot: int, shape: tuple[int, ...]) -> Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(slot)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[slot] = torch.empty(numel, dtype=self.like.dtype, device=self.like.device)
        return buf[:numel].view(shape)


def floor_may_bind(c: Tensor, b: Bound, uses_minus: bool) -> bool:
    """Whether ``max(2 - 2c, b)`` (and ``max(2 + 2c, b)``) may differ from its first argument anywhere in the tile.

    Exact and conservative: with ``B = max b`` (from the per-row and per-column halves when ``b`` is lazy), the floor
    cannot bind if ``2 - 2 max c >= B`` (and ``2 + 2 min c >= B``), because rounding is monotone. This reads the tile
    once and synchronises with the host, so on accelerators it answers ``True`` (the exact floor is always applied).
    NaN answers ``True``.
    """
    if c.device.type != "cpu":
        return True
    if isinstance(b, LazyBound):
        bmax = b.max if b.max is not None else float(b.q_rows.max()) + float(b.q_cols.max())
    else:
        bmax = float(b.max())
    if uses_minus:
        lo, hi = torch.aminmax(c)
        return not (2.0 - 2.0 * float(hi) >= bmax and 2.0 + 2.0 * float(lo) >= bmax)
    return not (2.0 - 2.0 * float(c.max()) >= bmax)


def _fast_terms_(c: Tensor, s: float, angular: bool, half_space: bool, eps: float, scratch: Scratch) -> Tensor:
    """The reference terms where the floor does not bind, computed in place in ``c`` (plus one buffer at most)."""
    shape = tuple(c.shape)
    if not angular:
        if half_space:
            if s == 2:  # 2/(2-2c) + 2/(2+2c) = 1/(0.5 - 0.5 c²)
                return torch.addcmul(_const(0.5, c), c, c, value=-0.5, out=c).reciprocal_()
            if s == 0:  # -2 log(2-2c) - 2 log(2+2c) = -2 log(4 - 4c²)
                return torch.addcmul(_const(4, c), c, c, value=-4.0, out=c).log_().mul_(-2.0)
            a = 2.0 * 2.0 ** (-2.0 / s)  # 2 D^(-s/2) = (αD)^(-s/2) with α = 2^(-2/s)
            dp = torch.sub(_const(a, c), c, alpha=a, out=scratch.get(7, shape))
            dm = torch.add(_const(a, c), c, alpha=a, out=c)
            return dp.pow_(-s / 2).add_(dm.pow_(-s / 2))
        d = torch.sub(_const(2, c), c, alpha=2.0, out=c)
        if s == 0:
            return d.log_().neg_()
        return d.reciprocal_() if s == 2 else d.pow_(-s / 2)
    # θ/π = arccos(c)/π where the floor does not bind (2 atan2(√D+, √D-) = arccos c); a = θ/π + eps.
    c.acos_()
    if not half_space:
        a = torch.add(_const(eps, c), c, alpha=1.0 / math.pi, out=c)
        if s == 0:
            return a.log_().neg_()
        return a.reciprocal_() if s == 1 else a.pow_(-s)
    if s == 0:  # -2 log a - 2 log a' = -2 log(a a'), a' = 1 - θ/π + eps
        a = torch.add(_const(eps, c), c, alpha=1.0 / math.pi, out=c)
        a2 = torch.sub(_const(1.0 + 2.0 * eps, c), a, out=scratch.get(7, shape))
        return a.mul_(a2).log_().mul_(-2.0)
    g = 2.0 ** (-1.0 / s)  # 2 a^(-s) = (g a)^(-s)
    a = torch.add(_const(g * eps, c), c, alpha=g / math.pi, out=c)
    a2 = torch.sub(_const(g * (1.0 + 2.0 * eps), c), a, out=scratch.get(7, shape))
    return a.pow_(-s).add_(a2.pow_(-s))


def _fast_dterms_(c: Tensor, s: float, angular: bool, half_space: bool, eps: float, scratch: Scratch) -> Tensor:
    """d(terms)/dc where the floor does not bind, in place in ``c`` (plus scratch buffers)."""
    shape = tuple(c.shape)
    if not angular:
        if half_space:
            if s == 2:  # d/dc 2/(1-c²) = 4c/(1-c²)² = c/(0.5 - 0.5c²)²
                m = torch.addcmul(_const(0.5, c), c, c, value=-0.5, out=scratch.get(1, shape))
                return c.div_(m.square_())
            if s == 0:  # d/dc -2 log(1-c²) = 4c/(1-c²) = c/(0.25 - 0.25c²)
                m = torch.addcmul(_const(0.25, c), c, c, value=-0.25, out=scratch.get(1, shape))
                return c.div_(m)
            p = -s / 2 - 1  # 2s (D+^p - D-^p) with 2s folded: (βD)^p = 2s D^p, β = (2s)^(1/p)
            beta = (2.0 * s) ** (1.0 / p)
            x = torch.sub(_const(2 * beta, c), c, alpha=2 * beta, out=scratch.get(1, shape))
            y = torch.add(_const(2 * beta, c), c, alpha=2 * beta, out=c)
            return x.pow_(p).sub_(y.pow_(p))
        if s == 0:  # d/dc -log(2-2c) = 1/(1-c)
            return torch.sub(_const(1.0, c), c, out=c).reciprocal_()
        p = -s / 2 - 1  # d/dc (2-2c)^(-s/2) = s (2-2c)^p = (β(2-2c))^p, β = s^(1/p)
        beta = s ** (1.0 / p)
        return torch.sub(_const(2 * beta, c), c, alpha=2 * beta, out=c).pow_(p)
    # dθ/dc (θ normalized by π) = -1/(π √(1-c²)); every angular derivative carries it: r = k/(π√(1-c²)).
    factor = 2.0 if half_space else 1.0
    pf2 = (math.pi / factor) ** 2
    r = torch.addcmul(_const(pf2, c), c, c, value=-pf2, out=scratch.get(1, shape))
    r.rsqrt_()  # factor / (π √(1-c²))
    c.acos_()
    if s == 0:  # h'(a) = -1/a: grad = (1/a [- 1/a']) · factor/(π√(1-c²))
        a = torch.add(_const(eps, c), c, alpha=1.0 / math.pi, out=c)
        if half_space:
            a2 = torch.sub(_const(1.0 + 2.0 * eps, c), a, out=scratch.get(2, shape))
            a.reciprocal_().sub_(a2.reciprocal_())
        else:
            a.reciprocal_()
        return a.mul_(r)
    p = -s - 1  # h'(a) = -s a^p: grad = s (a^p [- a'^p]) · factor/(π√(1-c²)); (γa)^p = s a^p, γ = s^(1/p)
    gam = s ** (1.0 / p)
    a = torch.add(_const(gam * eps, c), c, alpha=gam / math.pi, out=c)
    if half_space:
        a2 = torch.sub(_const(gam * (1.0 + 2.0 * eps), c), a, out=scratch.get(2, shape))
        a.pow_(p).sub_(a2.pow_(p))
    else:
        a.pow_(p)
    return a.mul_(r)


def _fast_terms_and_dterms_(
    c: Tensor, s: float, angular: bool, half_space: bool, eps: float, scratch: Scratch
) -> tuple[Tensor, Tensor]:
    """Terms and d(terms)/dc where the floor does not bind, sharing passes where the algebra allows."""
    shape = tuple(c.shape)
    if not angular and s == 2:
        if half_space:  # value r = 1/(0.5 - 0.5c²), derivative c r²
            r = torch.addcmul(_const(0.5, c), c, c, value=-0.5, out=scratch.get(6, shape)).reciprocal_()
            return r, c.mul_(r).mul_(r)
        v = torch.sub(_const(2, c), c, alpha=2.0, out=c).reciprocal_()  # value 1/(2-2c), derivative 2 v²
        return v, torch.addcmul(_const(0.0, c), v, v, value=2.0, out=scratch.get(6, shape))
    if not angular and s == 0 and half_space:  # value -2 log(16 y), derivative c/y, y = 0.25 - 0.25c²
        y = torch.addcmul(_const(0.25, c), c, c, value=-0.25, out=scratch.get(6, shape))
        c.div_(y)
        return y.log_().add_(math.log(16.0)).mul_(-2.0), c
    if angular:
        return _fast_angular_terms_and_dterms_(c, s, half_space, eps, scratch)
    value = _fast_terms_(scratch.get(6, shape).copy_(c), s, angular, half_space, eps, scratch)
    return value, _fast_dterms_(c, s, angular, half_space, eps, scratch)


def _fast_angular_terms_and_dterms_(
    c: Tensor, s: float, half_space: bool, eps: float, scratch: Scratch
) -> tuple[Tensor, Tensor]:
    """Angular terms h(a) [+ h(a')] and their derivative, with one arccos.

    Here a = arccos(c)/π + eps, a' = 1 + 2eps - a, h(x) = x^-s or -log x, and dθ/dc = -1/(π√(1-c²)).
    """
    shape = tuple(c.shape)
    # r = k/(π√(1-c²)) with the constant k of the derivative folded in (k = s, or 1 for s = 0; doubled for half space)
    kk = (2.0 if half_space else 1.0) * (s if s > 0 else 1.0)
    pf2 = (math.pi / kk) ** 2
    r = torch.addcmul(_const(pf2, c), c, c, value=-pf2, out=scratch.get(1, shape)).rsqrt_()
    c.acos_()
    a = torch.add(_const(eps, c), c, alpha=1.0 / math.pi, out=c)
    if not half_space:
        if s == 0:  # value -log a, derivative r/a
            return torch.log(a, out=scratch.get(6, shape)).neg_(), r.div_(a)
        v = torch.pow(a, -s, out=scratch.get(6, shape))  # value a^-s, derivative s a^(-s-1) = s (v/a)
        return v, torch.div(v, a, out=a).mul_(r)
    a2 = torch.sub(_const(1.0 + 2.0 * eps, c), a, out=scratch.get(2, shape))
    if s == 0:  # value -2 log(a a'), derivative 2 (1/a - 1/a') = 2 (a' - a)/(a a')
        prod = torch.mul(a, a2, out=scratch.get(6, shape))
        grad = a2.sub_(a).div_(prod).mul_(r)
        return prod.log_().mul_(-2.0), grad
    va = torch.pow(a, -s, out=scratch.get(6, shape))  # value 2 (a^-s + a'^-s), derivative 2s (a^(-s-1) - a'^(-s-1))
    va2 = torch.pow(a2, -s, out=scratch.get(7, shape))
    grad = torch.div(va, a, out=a).sub_(a2.reciprocal_().mul_(va2)).mul_(r)
    return va.add_(va2).mul_(2.0), grad
