r"""Hyperspherical energies of neuron sets.

This module is pure PyTorch. It implements the energies of MHE (Liu et al., NeurIPS 2018), half-space MHE and the
projected energies of CoMHE (Lin et al., CVPR 2020) with the exact semantics of the official code:

* cosines use ``n_i = sqrt(‖w_i‖² + eps)`` as each norm (``eps`` inside the square root), so
  :math:`c_{ij} = \langle w_i, w_j\rangle / (n_i n_j)`;
* the chordal variants use the squared chord :math:`D_{ij} = 2 - 2 c_{ij}` and the pairwise term
  :math:`D^{-s/2}` (``s > 0``, i.e. :math:`\|\hat w_i - \hat w_j\|^{-s}`) or :math:`-\log D` (``s = 0``);
* the angular variants use :math:`A_{ij} = \arccos(c_{ij})/\pi + \text{eps}` and the term :math:`A^{-s}` or
  :math:`-\log A`;
* the energy is the mean over the unordered pairs :math:`i < j`; half-space MHE takes the pairs of the ``2N``
  neurons :math:`[W; -W]` (the ``N`` pairs :math:`(w_i, -w_i)` included) without ever forming the ``2N × 2N``
  matrix.

Numerical safety: :math:`2 \mp 2c_{ij} = \|\hat w_i \mp \hat w_j\|^2 + \text{eps}/n_i^2 + \text{eps}/n_j^2`, so the
squared chord is bounded below by :math:`b_{ij} = \text{eps}/n_i^2 + \text{eps}/n_j^2 > 0`. Values that floating
point cancellation pushes below this exact bound are raised to it, which keeps values and gradients finite for
duplicate, antipodal, zero and near-zero neurons. The floor only undoes rounding, so the derivative of the unclamped
expression is kept there (straight-through): an exact duplicate pair keeps its (large, radial) gradient, as in the
official code, instead of losing it to the clamp. The angle is computed as
:math:`\theta = 2\,\mathrm{atan2}(\sqrt{D^+}, \sqrt{D^-})`, which equals :math:`\arccos c` and has a finite gradient
at :math:`c = \pm 1`.

Speed (``docs/benchmarks.md``): the default backend is a custom autograd ``Function`` over tiles of the Gram matrix
(at most ``_TILE_ELEMENTS`` elements; row blocks over the upper triangle, column blocks for very large ``N``). When a
gradient is needed, every tile is computed once and yields both its terms and its gradient contributions, so backward
never recomputes the Gram. Where the eps floor provably cannot bind (checked per tile, on CPU) the terms are computed
in place by a few fused passes (half-space ``s = 2``: ``1/(0.5 - 0.5c²)``); elsewhere the reference formula runs.
``backend="compiled"`` (or ``LIGHTNING_COMHE_COMPILE=1``) compiles the per-tile work with ``torch.compile``.
"""

import math
from itertools import accumulate
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_comhe.functional import _compiled
from lightning_comhe.functional._checks import check_eps, check_finite, check_neurons
from lightning_comhe.functional._device import autocast_off

__all__ = ["hyperspherical_energy", "parse_power", "projected_energy", "PowerLike", "OFFICIAL_POWERS"]

PowerLike = float | int | str
Backend = Literal["auto", "fused", "autograd", "compiled"]
_BACKENDS: tuple[str, ...] = ("auto", "fused", "autograd", "compiled")

#: The official ``power_s`` strings of wy1iu/MHE and rmlin/CoMHE mapped to ``(s, angular)``.
OFFICIAL_POWERS: dict[str, tuple[float, bool]] = {
    "0": (0.0, False),
    "1": (1.0, False),
    "2": (2.0, False),
    "a0": (0.0, True),
    "a1": (1.0, True),
    "a2": (2.0, True),
}

# Elements of one Gram tile (sets × rows × columns): 2**20 float32 elements is 4 MiB per buffer, cache-resident on
# most CPUs between the elementwise passes; see `_tile_plan`.
_TILE_ELEMENTS = 1 << 20
_MIN_TILE_ROWS = 16
_MAX_TILE_ROWS = 256


def parse_power(power: PowerLike, angular: bool = False) -> tuple[float, bool]:
    """Parse a power specification into ``(s, angular)``.

    Args:
        power: ``0`` (logarithmic energy), any finite float ``> 0`` (Riesz ``s``-energy), or one of the official
            strings ``"0"``, ``"1"``, ``"2"``, ``"a0"``, ``"a1"``, ``"a2"`` (the ``a`` forms are angular).
        angular: Use the angular distance. An ``"a"`` string forces it.

    Returns:
        The exponent ``s >= 0`` and whether the angular distance is used.

    Raises:
        ValueError: If ``power`` is not one of the allowed values.

    Example::

        >>> parse_power("a2")
        (2.0, True)
        >>> parse_power(1.5)
        (1.5, False)
    """
    allowed = "0, a float > 0, or one of the official strings '0', '1', '2', 'a0', 'a1', 'a2'"
    if isinstance(power, bool):
        raise ValueError(f"`power` must be {allowed}; got {power!r}.")
    if isinstance(power, str):
        key = power.strip().lower()
        if key in OFFICIAL_POWERS:
            s, ang = OFFICIAL_POWERS[key]
            return s, ang or bool(angular)
        try:
            value = float(key)
        except ValueError:
            raise ValueError(f"`power` must be {allowed}; got {power!r}.") from None
    elif isinstance(power, (int, float)):
        value = float(power)
    else:
        raise ValueError(f"`power` must be {allowed}; got {power!r} of type {type(power).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`power` must be {allowed}; got {power!r}.")
    return value, bool(angular)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_neurons(neurons: Tensor, name: str = "neurons") -> None:
    check_neurons(neurons, name, min_neurons=2)


def _check_finite(t: Tensor, name: str) -> None:
    check_finite(t, name, "hyperspherical energy")


# ---------------------------------------------------------------------------------------------------------------
# Pairwise terms. `c` is a tile of eps-cosines, `b` the matching tile of exact lower bounds of 2 ∓ 2c.
# ---------------------------------------------------------------------------------------------------------------


def _chord_term(d: Tensor, s: float) -> Tensor:
    return -torch.log(d) if s == 0 else d.pow(-s / 2)


def _chord_dterm(d: Tensor, s: float) -> Tensor:
    """Derivative of :func:`_chord_term` with respect to ``d``."""
    return -1.0 / d if s == 0 else d.pow(-s / 2 - 1) * (-s / 2)


def _angle_term(a: Tensor, s: float) -> Tensor:
    return -torch.log(a) if s == 0 else a.pow(-s)


def _angle_dterm(a: Tensor, s: float) -> Tensor:
    return -1.0 / a if s == 0 else a.pow(-s - 1) * (-s)


def _floor(x: Tensor, b: Tensor) -> Tensor:
    """``max(x, b)`` in value with the derivative of ``x`` (straight-through): the floor only undoes rounding."""
    y = torch.maximum(x, b)  # propagates NaN (check_finite=False with NaN input gives NaN, not a finite value)
    if x.requires_grad:
        y = y.detach() + (x - x.detach())  # x - x is exactly 0, so the value is unchanged
    return y


class _LazyBound(NamedTuple):
    """The bound tile ``b = q_rows + q_cols`` (``(B, r, 1)`` and ``(B, 1, m)``), not materialised.

    ``max`` is ``max b`` when known (``None``: computed on demand).
    """

    q_rows: Tensor
    q_cols: Tensor
    max: float | None = None


Bound = Tensor | _LazyBound


def _bound(b: Bound) -> Tensor:
    """The bound tile as a tensor."""
    return b.q_rows + b.q_cols if isinstance(b, _LazyBound) else b


def _pair_terms(
    c: Tensor,
    b: Bound,
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    *,
    inplace: bool = False,
    scratch: "_Scratch | None" = None,
) -> Tensor:
    """Per-pair energy terms. Half-space: ``2 f(c) + 2 f(-c)``.

    The reference formula is plain autograd (twice differentiable). With ``inplace=True`` and no gradient recorded,
    ``c`` is scratch: when the eps floor provably cannot bind anywhere in the tile (checked on CPU with one read
    pass; see :func:`_floor_may_bind`), the terms are computed in place by a few fused passes, else by the
    reference formula. ``b`` may be given lazily as ``(q_rows, q_cols)``.
    """
    fast = inplace and not (c.requires_grad and torch.is_grad_enabled())
    if fast and not _floor_may_bind(c, b, half_space or angular):
        return _fast_terms_(c, s, angular, half_space, eps, scratch or _Scratch(c))
    return _reference_terms(c, _bound(b), s, angular, half_space, eps)


def _reference_terms(c: Tensor, b: Tensor, s: float, angular: bool, half_space: bool, eps: float) -> Tensor:
    dp = _floor(2 - 2 * c, b)
    if half_space or angular:
        dm = _floor(2 + 2 * c, b)
    if not angular:
        out = _chord_term(dp, s)
        if half_space:
            out = 2 * out + 2 * _chord_term(dm, s)
        return out
    theta = 2 * torch.atan2(dp.sqrt(), dm.sqrt()) / math.pi  # in [0, 1]
    out = _angle_term(theta + eps, s)
    if half_space:
        out = 2 * out + 2 * _angle_term((1 - theta) + eps, s)
    return out


def _pair_terms_and_grad(
    c: Tensor,
    b: Bound,
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    need_value: bool,
    *,
    inplace: bool = False,
    scratch: "_Scratch | None" = None,
) -> tuple[Tensor | None, Tensor]:
    """Per-pair terms (optional) and their derivative with respect to ``c``; same semantics as `_pair_terms`.

    With ``inplace=True`` and no gradient recorded, ``c`` is scratch and the results are computed in place when the
    floor cannot bind (see :func:`_pair_terms`); ``scratch`` provides extra tile buffers.
    """
    fast = inplace and not (c.requires_grad and torch.is_grad_enabled())
    if fast and not _floor_may_bind(c, b, half_space or angular):
        scratch = scratch or _Scratch(c)
        if need_value:
            return _fast_terms_and_dterms_(c, s, angular, half_space, eps, scratch)
        return None, _fast_dterms_(c, s, angular, half_space, eps, scratch)
    return _reference_terms_and_grad(c, _bound(b), s, angular, half_space, eps, need_value)


def _reference_terms_and_grad(
    c: Tensor, b: Tensor, s: float, angular: bool, half_space: bool, eps: float, need_value: bool
) -> tuple[Tensor | None, Tensor]:
    dp = _floor(2 - 2 * c, b)
    if half_space or angular:
        dm = _floor(2 + 2 * c, b)
    value = None
    if not angular:
        # d/dc f(2 - 2c) = -2 g'(D+) ; d/dc f(2 + 2c) = +2 g'(D-)
        grad = _chord_dterm(dp, s) * -2.0
        if need_value:
            value = _chord_term(dp, s)
        if half_space:
            grad = 2 * grad + 4 * _chord_dterm(dm, s)
            if need_value:
                value = 2 * value + 2 * _chord_term(dm, s)
        return value, grad
    ra, rb = dp.sqrt(), dm.sqrt()
    theta = 2 * torch.atan2(ra, rb) / math.pi
    # dθ/dc for θ = 2 atan2(√D+, √D-), divided by π: -1/(π sqrt(1 - c²)) = -2/(π √D+ √D-).
    dtheta = (-2.0 / math.pi) / (ra * rb)
    grad = _angle_dterm(theta + eps, s) * dtheta
    if need_value:
        value = _angle_term(theta + eps, s)
    if half_space:
        # θ(-c) = 1 - θ(c) (normalized angle), so d/dc f(1 - θ) = -f'(1 - θ) dθ/dc.
        grad = 2 * grad - 2 * _angle_dterm((1 - theta) + eps, s) * dtheta
        if need_value:
            value = 2 * value + 2 * _angle_term((1 - theta) + eps, s)
    return value, grad


# ---------------------------------------------------------------------------------------------------------------
# Fast in-place tile evaluation (no autograd). Valid only where the floor does not bind, which `_floor_may_bind`
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


class _Scratch:
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


def _floor_may_bind(c: Tensor, b: Bound, uses_minus: bool) -> bool:
    """Whether ``max(2 - 2c, b)`` (and ``max(2 + 2c, b)``) may differ from its first argument anywhere in the tile.

    Exact and conservative: with ``B = max b`` (from the per-row and per-column halves when ``b`` is lazy), the floor
    cannot bind if ``2 - 2 max c >= B`` (and ``2 + 2 min c >= B``), because rounding is monotone. This reads the tile
    once and synchronises with the host, so on accelerators it answers ``True`` (the exact floor is always applied).
    NaN answers ``True``.
    """
    if c.device.type != "cpu":
        return True
    if isinstance(b, _LazyBound):
        bmax = b.max if b.max is not None else float(b.q_rows.max()) + float(b.q_cols.max())
    else:
        bmax = float(b.max())
    if uses_minus:
        lo, hi = torch.aminmax(c)
        return not (2.0 - 2.0 * float(hi) >= bmax and 2.0 + 2.0 * float(lo) >= bmax)
    return not (2.0 - 2.0 * float(c.max()) >= bmax)


def _fast_terms_(c: Tensor, s: float, angular: bool, half_space: bool, eps: float, scratch: _Scratch) -> Tensor:
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


def _fast_dterms_(c: Tensor, s: float, angular: bool, half_space: bool, eps: float, scratch: _Scratch) -> Tensor:
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
    c: Tensor, s: float, angular: bool, half_space: bool, eps: float, scratch: _Scratch
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
    c: Tensor, s: float, half_space: bool, eps: float, scratch: _Scratch
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


# ---------------------------------------------------------------------------------------------------------------
# The fused, tiled kernel
# ---------------------------------------------------------------------------------------------------------------


def _tile_plan(bsz: int, n: int, tile_size: int | None) -> tuple[int, int, int]:
    """``(rows, chunk, cols)``: Gram rows per tile, sets per tile, and columns per tile.

    Tiles hold at most about ``_TILE_ELEMENTS`` elements: small enough to stay in cache between the elementwise
    passes, large enough for efficient batched matmuls. Row blocks of about ``n / 4`` (16 to 256 rows) keep the work
    near the upper triangle (with ``m`` row blocks only ``(m + 1) / 2m`` of the ``N²`` Gram is computed); when a
    row block of one set exceeds the budget (large ``N``), it is split into column blocks.
    """
    if tile_size is not None:
        rows = max(1, min(int(tile_size), n))
    else:
        rows = min(n, max(_MIN_TILE_ROWS, min(_MAX_TILE_ROWS, -(-n // 4))))
    chunk, cols = _chunk_and_cols(bsz, n, rows)
    return rows, chunk, cols


def _chunk_and_cols(bsz: int, n: int, rows: int) -> tuple[int, int]:
    chunk = max(1, min(bsz, _TILE_ELEMENTS // max(1, rows * n)))
    cols = n if rows * n <= _TILE_ELEMENTS else max(rows, _TILE_ELEMENTS // rows)
    return chunk, cols


def _tile_rows(batch: int, n: int, tile_size: int | None) -> int:
    return _tile_plan(batch, n, tile_size)[0]


def _tiles(n: int, rows: int, cols: int):
    """``(r0, r1, c0, c1)`` covering the upper triangle: row blocks ``[r0, r1)``, column blocks from ``r0``."""
    for r0 in range(0, n - 1, rows):
        r1 = min(r0 + rows, n)
        for c0 in range(r0, n, cols):
            yield r0, r1, c0, min(c0 + cols, n)


def _tile_bound_max(q: Tensor, rows: int):
    """``(r0, r1[, c0, c1]) -> max b`` over the tile ``[r0, r1) × [c0, c1)`` (default ``[r0, n)``) of the sets ``q``.

    ``q`` is (B, N); the maximum comes from one host copy of the per-neuron maxima (CPU only: elsewhere the floor is
    always applied and no maximum is needed).
    """
    if q.device.type != "cpu":
        return lambda r0, r1, c0=None, c1=None: None
    qm = q.amax(0).tolist()
    suffix = list(accumulate(reversed(qm), max))[::-1]  # suffix[r0] = max(qm[r0:])

    def bound_max(r0: int, r1: int, c0: int | None = None, c1: int | None = None) -> float:
        cmax = suffix[r0] if c0 is None or c1 is None or c1 == len(qm) else max(qm[c0:c1])
        return max(qm[r0:r1]) + cmax

    return bound_max


def _fused_tiles(
    u: Tensor,
    q: Tensor,
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    rows: int,
    need_value: bool = True,
    need_grad: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Per-set sums over i<j of the terms (B,) and/or their gradient with respect to ``u`` (no graph).

    Tiles cover rows ``[r0, r1)`` × columns ``[r0, n)``. The diagonal block is symmetric: its strict upper triangle
    is half its sum minus its diagonal (no mask pass), and in the gradient it serves its rows from both sides, while
    the columns right of it get ``Wᵀ U_rows``: ``∂/∂u_i = Σ_{j≠i} f'(c_ij) u_j``. When both are needed (the forward
    of a training step), each tile is computed once: the gradient is formed in the forward pass, so backward does not
    recompute the Gram.
    """
    bsz, n, k = u.shape
    chunk, cols = _chunk_and_cols(bsz, n, rows)
    total = u.new_zeros(bsz) if need_value else None
    grad_u = torch.zeros_like(u) if need_grad else None
    # the columns' gradient is accumulated transposed, (B, k, N): U_rowsᵀ W is a plain (NN) matmul, faster than
    # the transposed-operand Wᵀ U_rows

    scratch = _Scratch(u)
    for b0 in range(0, bsz, chunk):
        b1 = min(b0 + chunk, bsz)
        ub, qb = u[b0:b1], q[b0:b1]
        bound_max = _tile_bound_max(qb, rows)
        for r0, r1, c0, c1 in _tiles(n, rows, cols):
            r = r1 - r0
            diag = c0 == r0  # the tile starts with the (symmetric) diagonal block [r0, r1)²
            ur, uc = ub[:, r0:r1], ub[:, c0:c1]
            c = torch.bmm(ur, uc.transpose(1, 2), out=scratch.get(0, (b1 - b0, r, c1 - c0)))
            if diag:
                c[:, :, :r].diagonal(dim1=1, dim2=2).zero_()  # c_ii ≈ 1 would make the floor bind; its term is dropped
            bound = _LazyBound(qb[:, r0:r1, None], qb[:, None, c0:c1], bound_max(r0, r1, c0, c1))
            if need_grad:
                kw = {"inplace": True, "scratch": scratch}
                terms, w = _pair_terms_and_grad(c, bound, s, angular, half_space, eps, need_value, **kw)
            else:
                terms = _pair_terms(c, bound, s, angular, half_space, eps, inplace=True, scratch=scratch)
            off = r if diag else 0  # the columns of the tile right of its diagonal block
            if total is not None:
                assert terms is not None
                if diag:
                    block = terms[:, :, :r]
                    total[b0:b1] += (block.sum(dim=(1, 2)) - block.diagonal(dim1=1, dim2=2).sum(-1)) * 0.5
                if off < c1 - c0:
                    total[b0:b1] += terms[:, :, off:].sum(dim=(1, 2))
            if grad_u is not None:
                gb = grad_u[b0:b1]
                if diag:
                    w[:, :, :r].diagonal(dim1=1, dim2=2).zero_()
                # bmm into a contiguous buffer then add: baddbmm_ into a strided slice falls back to a per-set loop
                gb[:, r0:r1] += torch.bmm(w, uc, out=scratch.get(3, (b1 - b0, r, k)))
                if off < c1 - c0:
                    cols_t = w[:, :, off:].transpose(1, 2)
                    gb[:, c0 + off : c1] += torch.bmm(cols_t, ur, out=scratch.get(4, (b1 - b0, c1 - c0 - off, k)))
    return total, grad_u


def _differentiable_backward(
    u: Tensor, q: Tensor, grad_out: Tensor, s: float, angular: bool, half_space: bool, eps: float, rows: int
) -> Tensor:
    """The gradient built from differentiable ops, for double backward (``create_graph=True``)."""
    bsz, n, _ = u.shape
    idx = torch.arange(n, device=u.device)
    grad_u = torch.zeros_like(u)
    scale = grad_out[:, None, None]
    for r0 in range(0, n - 1, rows):
        r1 = min(r0 + rows, n)
        ur, uc = u[:, r0:r1], u[:, r0:]
        c = torch.bmm(ur, uc.transpose(1, 2))
        b = q[:, r0:r1, None] + q[:, None, r0:]
        _, dterm = _pair_terms_and_grad(c, b, s, angular, half_space, eps, need_value=False)
        keep = idx[r0:, None].T > idx[r0:r1, None]
        w = torch.where(keep, dterm, 0.0) * scale
        pad_rows = torch.nn.functional.pad(torch.bmm(w, uc), (0, 0, r0, n - r1))
        pad_cols = torch.nn.functional.pad(torch.bmm(w.transpose(1, 2), ur), (0, 0, r0, 0))
        grad_u = grad_u + pad_rows + pad_cols
    return grad_u


def _compiled_tiles(u: Tensor, q: Tensor, fns: tuple, rows: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """`_fused_tiles` with the per-tile work compiled: ``fns = (tile_sum, tile_sum_and_grad)``."""
    bsz, n, _ = u.shape
    chunk, cols = _chunk_and_cols(bsz, n, rows)
    tile_sum, tile_sum_and_grad = fns
    total = u.new_zeros(bsz)
    grad_u = torch.zeros_like(u) if need_grad else None
    for b0 in range(0, bsz, chunk):
        ub, qb = u[b0 : b0 + chunk], q[b0 : b0 + chunk]
        for r0, r1, c0, c1 in _tiles(n, rows, cols):
            if grad_u is None:
                total[b0 : b0 + chunk] += tile_sum(ub, qb, r0, r1, c0, c1)
                continue
            part, g_rows, g_cols = tile_sum_and_grad(ub, qb, r0, r1, c0, c1)
            total[b0 : b0 + chunk] += part
            grad_u[b0 : b0 + chunk, r0:r1] += g_rows
            grad_u[b0 : b0 + chunk, c0:c1] += g_cols
    return total, grad_u


class _FusedPairEnergy(torch.autograd.Function):
    """Sum over i<j of the pairwise terms, in tiles of the Gram matrix.

    Inputs are the eps-normalized neurons ``u`` (B, N, k) and the per-neuron bound halves ``q = eps/n²`` (B, N),
    which are treated as constants. When a gradient is needed (``need_grad``) the forward pass also forms ``∂/∂u``
    tile by tile and keeps it (B, N, k), so backward costs nothing but a scale; double backward recomputes the tiles
    from differentiable ops. Memory is O(B·tile + B·N·k): no N×N intermediate is kept. With ``compiled`` the per-tile
    work runs through ``torch.compile`` (see :mod:`lightning_comhe.functional._compiled`), falling back to the eager
    tiles if compilation fails.
    """

    @staticmethod
    def forward(
        ctx,
        u: Tensor,
        q: Tensor,
        s: float,
        angular: bool,
        half_space: bool,
        eps: float,
        rows: int,
        compiled: bool = False,
        need_grad: bool = False,
    ):
        fns = _compiled.compiled_tile_fns(s, angular, half_space, eps) if compiled else None

        def eager() -> tuple[Tensor | None, Tensor | None]:
            return _fused_tiles(u, q, s, angular, half_space, eps, rows, need_value=True, need_grad=need_grad)

        if fns is not None:
            total, grad_u = _compiled.run_or_fallback(lambda: _compiled_tiles(u, q, fns, rows, need_grad), eager)
        else:
            total, grad_u = eager()
        ctx.save_for_backward(u, q, grad_u)
        ctx.config = (s, angular, half_space, eps, rows)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, q, grad_u = ctx.saved_tensors
        s, angular, half_space, eps, rows = ctx.config
        if torch.is_grad_enabled():  # double backward: build the gradient out of place, from differentiable ops
            grad = _differentiable_backward(u, q, grad_out, s, angular, half_space, eps, rows)
        elif grad_u is not None:
            grad = grad_u * grad_out[:, None, None]
        else:  # the forward ran without a gradient request (e.g. under no_grad) but a gradient is asked for now
            grad = _fused_tiles(u, q, s, angular, half_space, eps, rows, need_value=False, need_grad=True)[1]
            grad = grad.mul_(grad_out[:, None, None])
        return grad, None, None, None, None, None, None, None, None


class _EpsNormalize(torch.autograd.Function):
    """``v -> (u = v / n, n² = ‖v‖² + eps)`` per row, with a backward of three passes over ``v``.

    ``∂L/∂v = (g_u - (g_u·u) u)/n + 2 g_{n²} v``. Under ``create_graph`` the backward recomputes ``u`` and ``1/n``
    from ``v`` with differentiable ops, so higher derivatives are exact.
    """

    @staticmethod
    def forward(ctx, v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        nrm2 = torch.linalg.vecdot(v, v) + eps
        inv = nrm2.rsqrt()
        u = v * inv[..., None]
        ctx.save_for_backward(v)
        ctx.eps = eps
        ctx.fast = (u, inv)  # plain tensors for the first-order backward
        ctx.set_materialize_grads(False)
        return u, nrm2

    @staticmethod
    def backward(ctx, g_u: Tensor | None, g_n2: Tensor | None):
        (v,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            inv = (torch.linalg.vecdot(v, v) + ctx.eps).rsqrt()
            u = v * inv[..., None]
        else:
            u, inv = ctx.fast
        if g_u is None:
            return (None if g_n2 is None else v * (2 * g_n2)[..., None]), None
        coef = -torch.linalg.vecdot(g_u, u) * inv
        grad = torch.addcmul(g_u * inv[..., None], u, coef[..., None])
        if g_n2 is not None:
            grad = torch.addcmul(grad, v, (2 * g_n2)[..., None])
        return grad, None


def _energy_core(
    v: Tensor, s: float, angular: bool, half_space: bool, eps: float, backend: str, tile_size: int | None
) -> Tensor:
    """Energy of a batch ``v`` (B, N, k) already in the compute dtype. Returns (B,)."""
    bsz, n, _ = v.shape
    if v.requires_grad and torch.is_grad_enabled():
        u, nrm2 = _EpsNormalize.apply(v, eps)
    else:
        nrm2 = torch.linalg.vecdot(v, v) + eps
        u = v * nrm2.rsqrt()[..., None]
    q = (eps / nrm2).detach()
    if backend == "autograd":
        c = u @ u.transpose(1, 2)
        b = q[:, :, None] + q[:, None, :]
        terms = _pair_terms(c, b, s, angular, half_space, eps)
        keep = torch.ones(n, n, dtype=torch.bool, device=v.device).triu(1)
        pair_sum = torch.where(keep, terms, 0.0).sum(dim=(1, 2))
    else:
        compiled = backend == "compiled" or (backend == "auto" and _compiled.compile_requested())
        need_grad = u.requires_grad and torch.is_grad_enabled()
        rows = _tile_rows(bsz, n, tile_size)
        pair_sum = _FusedPairEnergy.apply(u, q, s, angular, half_space, eps, rows, compiled, need_grad)
    if not half_space:
        return pair_sum / (n * (n - 1) / 2)
    # The N pairs (w_i, -w_i): cosine -c_ii with c_ii = ‖w_i‖²/(‖w_i‖² + eps) = 1 - eps/n_i². Their squared chord
    # is 2 + 2c_ii = 4 - 2·eps/n_i², and the complementary one is exactly 2 - 2c_ii = 2·eps/n_i² (no clamping needed).
    q_grad = eps / nrm2
    d_far = 4 - 2 * q_grad
    if angular:
        theta = 2 * torch.atan2(d_far.sqrt(), (2 * q_grad).sqrt()) / math.pi
        diag = _angle_term(theta + eps, s).sum(-1)
    else:
        diag = _chord_term(d_far, s).sum(-1)
    return (pair_sum + diag) / (n * (2 * n - 1))


def hyperspherical_energy(
    neurons: Tensor,
    power: PowerLike = 2,
    *,
    half_space: bool = False,
    angular: bool = False,
    eps: float = 1e-4,
    check_finite: bool = True,
    backend: Backend = "auto",
    tile_size: int | None = None,
) -> Tensor:
    r"""Hyperspherical energy of a set of neurons (MHE), with the official code's semantics.

    For neurons :math:`w_1, \dots, w_N \in \mathbb{R}^d` (the rows of ``neurons``) with eps-cosines
    :math:`c_{ij} = \langle w_i, w_j\rangle / (n_i n_j)`, :math:`n_i = \sqrt{\|w_i\|^2 + \text{eps}}`:

    .. math::

        E = \binom{N}{2}^{-1} \sum_{i<j} f(c_{ij}), \qquad
        f(c) = \begin{cases}
            (2 - 2c)^{-s/2} & \text{chordal}, s > 0 \\
            -\log(2 - 2c) & \text{chordal}, s = 0 \\
            (\arccos(c)/\pi + \text{eps})^{-s} & \text{angular}, s > 0 \\
            -\log(\arccos(c)/\pi + \text{eps}) & \text{angular}, s = 0
        \end{cases}

    With ``half_space=True`` the set is :math:`[W; -W]` (2N neurons, :math:`N(2N-1)` pairs), computed from the N×N
    Gram matrix through the identity
    :math:`\sum_{i<j}^{2N} = 2\sum_{i<j} f(c_{ij}) + 2\sum_{i<j} f(-c_{ij}) + \sum_i f(-c_{ii})`.
    There is no κ factor: the official per-layer weights are applied by the regularizer.

    The energy is computed in float32 (float64 for float64 input), with autocast disabled, whatever the input dtype
    (bf16/fp16 weights are upcast). Above a few million Gram entries the default backend works in tiles of rows with
    a custom backward that recomputes each tile, so memory is O(N·tile + N·d) rather than O(N²).

    Args:
        neurons: ``(N, d)``, one neuron per row, or a batch ``(B, N, d)`` of equally shaped sets. ``N >= 2``.
        power: ``0``, any float ``> 0``, or the official strings ``"0"``, ``"1"``, ``"2"``, ``"a0"``, ``"a1"``,
            ``"a2"``. ``s = 2`` gives ``1 / (2 - 2c)``.
        half_space: Use half-space MHE, i.e. the energy of :math:`[W; -W]`.
        angular: Use the angular distance :math:`\arccos(c)/\pi + \text{eps}` (the official ``a`` variants).
        eps: The constant inside each norm's square root, also added to the normalized angle. Must be ``> 0``.
        check_finite: Raise a ``ValueError`` if ``neurons`` holds NaN or Inf. This costs a host synchronisation;
            training loops may turn it off.
        backend: ``"fused"`` is the tiled kernel; ``"autograd"`` is a plain-autograd reference that materialises
            the N×N matrices; ``"compiled"`` is the tiled kernel with its per-tile work compiled by
            ``torch.compile`` (opt-in; it falls back to ``"fused"`` with a warning when compilation fails).
            ``"auto"`` is ``"fused"``, or ``"compiled"`` when the environment variable
            ``LIGHTNING_COMHE_COMPILE=1`` is set. All are differentiable twice.
        tile_size: Rows per Gram tile for the fused kernel; ``None`` picks one from the problem size.

    Returns:
        A scalar for ``(N, d)`` input, or a ``(B,)`` tensor, in the compute dtype.

    Raises:
        ValueError: For a bad shape, ``N < 2``, a bad ``power``/``eps``/``backend``, or non-finite input.
        TypeError: For a non-floating-point input.

    Example::

        >>> import torch
        >>> w = torch.eye(3)  # three orthogonal neurons: c_ij = 0, so each term is 1 / 2
        >>> round(hyperspherical_energy(w).item(), 4)
        0.5
        >>> hyperspherical_energy(torch.randn(4, 10, 27), power="a0", half_space=True).shape
        torch.Size([4])
    """
    _check_neurons(neurons)
    s, angular = parse_power(power, angular)
    check_eps(eps)
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(map(repr, _BACKENDS))}; got {backend!r}.")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1):
        raise ValueError(f"`tile_size` must be None or an int >= 1; got {tile_size!r}.")
    if check_finite:
        _check_finite(neurons, "neurons")
    dtype = _compute_dtype(neurons)
    with autocast_off(neurons.device):
        v = neurons.to(dtype)
        batched = v.ndim == 3
        out = _energy_core(v if batched else v[None], s, angular, half_space, float(eps), backend, tile_size)
    return out if batched else out[0]


class _ProjectSets(torch.autograd.Function):
    """``(W (G, N, d), P (G, M, d)) -> P Wᵀ (G, M, N)``: every set's projections in one batched matmul.

    ``P Wᵀ`` rather than ``W Pᵀ``: with few projected dimensions (``M = k = 30`` for the learned projections) the
    skinny product runs about 1.6× faster on CPU in this orientation, and the backward keeps both gradients in plain
    (non-transposed) layouts: ``∂W = gᵀ P`` (from a contiguous ``gᵀ``) and ``∂P = g W``. The backward is built from
    differentiable ops, so double backward (the official second-order look-ahead) works.
    """

    @staticmethod
    def forward(ctx, w: Tensor, p: Tensor) -> Tensor:
        ctx.save_for_backward(w, p)
        return torch.bmm(p, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, p = ctx.saved_tensors
        grad_w = torch.bmm(grad.transpose(1, 2).contiguous(), p) if ctx.needs_input_grad[0] else None
        grad_p = torch.bmm(grad, w) if ctx.needs_input_grad[1] else None
        return grad_w, grad_p


def project_sets(w: Tensor, p: Tensor) -> Tensor:
    """``P_g W_gᵀ`` for every set ``g``: ``(G, N, d)``, ``(G, M, d)`` -> ``(G, M, N)``, differentiable in both."""
    return _ProjectSets.apply(w, p)


def projected_energy(
    neurons: Tensor,
    projections: Tensor,
    power: PowerLike = 2,
    *,
    half_space: bool = True,
    angular: bool = False,
    eps: float = 1e-4,
    check_finite: bool = True,
    backend: Backend = "auto",
    tile_size: int | None = None,
) -> Tensor:
    r"""CoMHE energy: the mean over C projections of the energy of the projected neurons.

    .. math::

        E^P(W) = \frac{1}{C} \sum_{c=1}^{C} E\big(W P_c^\top\big), \qquad P_c \in \mathbb{R}^{k \times d}

    where :math:`E` is :func:`hyperspherical_energy` (half-space by default, as in the official CoMHE code). The
    projections are applied to the raw neurons (normalisation happens in the projected space). All C projections
    of a set are applied in one matmul.

    Args:
        neurons: ``(N, d)``, or ``(G, N, d)`` for G equally shaped sets.
        projections: ``(C, k, d)``, shared by all sets, or ``(G, C, k, d)``, one stack per set.
        power: See :func:`hyperspherical_energy`.
        half_space: Use the half-space energy of the projected neurons (official CoMHE: ``True``).
        angular: See :func:`hyperspherical_energy`.
        eps: See :func:`hyperspherical_energy`.
        check_finite: See :func:`hyperspherical_energy`.
        backend: See :func:`hyperspherical_energy`.
        tile_size: See :func:`hyperspherical_energy`.

    Returns:
        A scalar for ``(N, d)`` neurons, else a ``(G,)`` tensor.

    Raises:
        ValueError: If the shapes do not match.

    Example::

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w, p = torch.randn(16, 72, generator=g), torch.randn(20, 40, 72, generator=g)
        >>> e = projected_energy(w, p)  # RP-CoMHE with the official k = 40, C = 20
        >>> e.shape, bool(e > 0)
        (torch.Size([]), True)
    """
    _check_neurons(neurons)
    if not isinstance(projections, Tensor) or not projections.is_floating_point():
        raise TypeError(f"`projections` must be a floating-point torch.Tensor; got {type(projections).__name__}.")
    d = neurons.shape[-1]
    if projections.ndim not in (3, 4) or projections.shape[-1] != d:
        raise ValueError(
            f"`projections` must have shape (C, k, d) or (G, C, k, d) with d = {d} (the neuron dimension); "
            f"got {tuple(projections.shape)}."
        )
    if projections.ndim == 4 and (neurons.ndim != 3 or projections.shape[0] != neurons.shape[0]):
        raise ValueError(
            f"`projections` of shape (G, C, k, d) = {tuple(projections.shape)} needs `neurons` of shape (G, N, d) with "
            f"the same G; got {tuple(neurons.shape)}."
        )
    if check_finite:
        _check_finite(neurons, "neurons")
        _check_finite(projections, "projections")
    dtype = _compute_dtype(neurons)
    c, k = projections.shape[-3], projections.shape[-2]
    with autocast_off(neurons.device):
        w = neurons.to(dtype)
        p = projections.to(dtype)
        batched = w.ndim == 3
        wb = w if batched else w[None]
        g, n = wb.shape[0], wb.shape[1]
        # shared projections are expanded (no copy): both forms run the same batched matmul, so they round alike
        p2 = p.reshape(c * k, d).expand(g, c * k, d) if p.ndim == 3 else p.reshape(g, c * k, d)
        vt = project_sets(wb, p2)  # (G, C·k, N)
        v = vt.reshape(g, c, k, n).transpose(2, 3).reshape(g * c, n, k)
    energy = (
        hyperspherical_energy(
            v,
            power,
            half_space=half_space,
            angular=angular,
            eps=eps,
            check_finite=False,
            backend=backend,
            tile_size=tile_size,
        )
        .reshape(g, c)
        .mean(-1)
    )
    return energy if batched else energy[0]
