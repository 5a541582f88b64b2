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
"""

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["hyperspherical_energy", "parse_power", "projected_energy", "PowerLike", "OFFICIAL_POWERS"]

PowerLike = float | int | str

#: The official ``power_s`` strings of wy1iu/MHE and rmlin/CoMHE mapped to ``(s, angular)``.
OFFICIAL_POWERS: dict[str, tuple[float, bool]] = {
    "0": (0.0, False),
    "1": (1.0, False),
    "2": (2.0, False),
    "a0": (0.0, True),
    "a1": (1.0, True),
    "a2": (2.0, True),
}

# Elements of one Gram tile (rows × columns × batch). 2**22 float32 elements is 16 MiB per temporary.
_TILE_ELEMENTS = 1 << 22


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
    if not isinstance(neurons, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(neurons).__name__}.")
    if not (neurons.is_floating_point()):
        raise TypeError(f"`{name}` must be a floating-point tensor; got dtype {neurons.dtype}.")
    if neurons.ndim not in (2, 3):
        raise ValueError(
            f"`{name}` must have shape (N, d) or (B, N, d) with one neuron per row; got shape {tuple(neurons.shape)}."
        )
    if neurons.shape[-2] < 2:
        raise ValueError(
            f"`{name}` must hold at least 2 neurons (rows) per set to have a pair; got shape {tuple(neurons.shape)}."
        )
    if neurons.shape[-1] < 1:
        raise ValueError(f"`{name}` must have neuron dimension d >= 1; got shape {tuple(neurons.shape)}.")


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"`{name}` contains NaN or Inf values (shape {tuple(t.shape)}); the hyperspherical energy is undefined. "
            "Check the model's weights, or pass check_finite=False to skip this check inside training loops."
        )


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


def _pair_terms(c: Tensor, b: Tensor, s: float, angular: bool, half_space: bool, eps: float) -> Tensor:
    """Per-pair energy terms, plain autograd (twice differentiable). Half-space: ``2 f(c) + 2 f(-c)``."""
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
    c: Tensor, b: Tensor, s: float, angular: bool, half_space: bool, eps: float, need_value: bool
) -> tuple[Tensor | None, Tensor]:
    """Per-pair terms (optional) and their derivative with respect to ``c``; same semantics as `_pair_terms`."""
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


def _tile_rows(batch: int, n: int, tile_size: int | None) -> int:
    if tile_size is not None:
        return max(1, min(int(tile_size), n))
    return max(1, min(n, _TILE_ELEMENTS // max(1, batch * n)))


class _FusedPairEnergy(torch.autograd.Function):
    """Sum over i<j of the pairwise terms, in tiles of the Gram matrix, recomputing tiles in backward.

    Inputs are the eps-normalized neurons ``u`` (B, N, k) and the per-neuron bound halves ``q = eps/n²`` (B, N),
    which are treated as constants. Memory is O(B·tile·N + B·N·k): no N×N intermediate is kept.
    """

    @staticmethod
    def forward(ctx, u: Tensor, q: Tensor, s: float, angular: bool, half_space: bool, eps: float, rows: int):
        bsz, n, _ = u.shape
        total = u.new_zeros(bsz)
        idx = torch.arange(n, device=u.device)
        for r0 in range(0, n - 1, rows):
            r1 = min(r0 + rows, n)
            c = torch.bmm(u[:, r0:r1], u[:, r0:].transpose(1, 2))
            b = q[:, r0:r1, None] + q[:, None, r0:]
            terms = _pair_terms(c, b, s, angular, half_space, eps)
            keep = idx[r0:, None].T > idx[r0:r1, None]  # (rows, n - r0): strict upper triangle
            total += torch.where(keep, terms, 0.0).sum(dim=(1, 2))
        ctx.save_for_backward(u, q)
        ctx.config = (s, angular, half_space, eps, rows)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, q = ctx.saved_tensors
        s, angular, half_space, eps, rows = ctx.config
        bsz, n, _ = u.shape
        idx = torch.arange(n, device=u.device)
        grad_u = torch.zeros_like(u)
        scale = grad_out[:, None, None]
        parts = []
        for r0 in range(0, n - 1, rows):
            r1 = min(r0 + rows, n)
            ur, uc = u[:, r0:r1], u[:, r0:]
            c = torch.bmm(ur, uc.transpose(1, 2))
            b = q[:, r0:r1, None] + q[:, None, r0:]
            _, dterm = _pair_terms_and_grad(c, b, s, angular, half_space, eps, need_value=False)
            keep = idx[r0:, None].T > idx[r0:r1, None]
            w = torch.where(keep, dterm, 0.0) * scale
            parts.append((r0, r1, torch.bmm(w, uc), torch.bmm(w.transpose(1, 2), ur)))
        if torch.is_grad_enabled():  # double backward: build the gradient out of place
            for r0, r1, g_rows, g_cols in parts:
                pad_rows = torch.nn.functional.pad(g_rows, (0, 0, r0, n - r1))
                pad_cols = torch.nn.functional.pad(g_cols, (0, 0, r0, 0))
                grad_u = grad_u + pad_rows + pad_cols
        else:
            for r0, r1, g_rows, g_cols in parts:
                grad_u[:, r0:r1] += g_rows
                grad_u[:, r0:] += g_cols
        return grad_u, None, None, None, None, None, None


def _energy_core(
    v: Tensor, s: float, angular: bool, half_space: bool, eps: float, backend: str, tile_size: int | None
) -> Tensor:
    """Energy of a batch ``v`` (B, N, k) already in the compute dtype. Returns (B,)."""
    bsz, n, _ = v.shape
    sq = v.pow(2).sum(-1)
    nrm2 = sq + eps
    u = v / nrm2.sqrt()[..., None]
    q = (eps / nrm2).detach()
    if backend == "autograd":
        c = u @ u.transpose(1, 2)
        b = q[:, :, None] + q[:, None, :]
        terms = _pair_terms(c, b, s, angular, half_space, eps)
        keep = torch.ones(n, n, dtype=torch.bool, device=v.device).triu(1)
        pair_sum = torch.where(keep, terms, 0.0).sum(dim=(1, 2))
    else:
        pair_sum = _FusedPairEnergy.apply(u, q, s, angular, half_space, eps, _tile_rows(bsz, n, tile_size))
    if not half_space:
        return pair_sum / (n * (n - 1) / 2)
    # The N pairs (w_i, -w_i): cosine -c_ii with c_ii = ‖w_i‖²/(‖w_i‖² + eps). Their squared chord is
    # 2 + 2c_ii, and the complementary one is exactly 2 - 2c_ii = 2·eps/n_i² (no clamping needed).
    d_far = 2 + 2 * (sq / nrm2)
    if angular:
        theta = 2 * torch.atan2(d_far.sqrt(), (2 * eps / nrm2).sqrt()) / math.pi
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
    backend: Literal["auto", "fused", "autograd"] = "auto",
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
        backend: ``"auto"``/``"fused"`` use the tiled kernel; ``"autograd"`` is a plain-autograd reference that
            materialises the N×N matrices. Both are differentiable twice.
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
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"`eps` must be a finite float > 0; got {eps!r}.")
    if backend not in ("auto", "fused", "autograd"):
        raise ValueError(f"`backend` must be one of 'auto', 'fused', 'autograd'; got {backend!r}.")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1):
        raise ValueError(f"`tile_size` must be None or an int >= 1; got {tile_size!r}.")
    if check_finite:
        _check_finite(neurons, "neurons")
    dtype = _compute_dtype(neurons)
    with torch.autocast(device_type=neurons.device.type, enabled=False):
        v = neurons.to(dtype)
        batched = v.ndim == 3
        out = _energy_core(v if batched else v[None], s, angular, half_space, float(eps), backend, tile_size)
    return out if batched else out[0]


def projected_energy(
    neurons: Tensor,
    projections: Tensor,
    power: PowerLike = 2,
    *,
    half_space: bool = True,
    angular: bool = False,
    eps: float = 1e-4,
    check_finite: bool = True,
    backend: Literal["auto", "fused", "autograd"] = "auto",
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
    with torch.autocast(device_type=neurons.device.type, enabled=False):
        w = neurons.to(dtype)
        p = projections.to(dtype)
        batched = w.ndim == 3
        wb = w if batched else w[None]
        g, n = wb.shape[0], wb.shape[1]
        if p.ndim == 3:
            v = wb @ p.reshape(c * k, d).T  # (G, N, C·k)
        else:
            v = torch.bmm(wb, p.reshape(g, c * k, d).transpose(1, 2))
        v = v.reshape(g, n, c, k).transpose(1, 2).reshape(g * c, n, k)
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
