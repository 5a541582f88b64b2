r"""Hyperspherical energies of neuron sets: the public entry points.

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

The work is done elsewhere: the pairwise terms and the eps floor that keeps duplicate, antipodal and zero neurons
finite in :mod:`lightning_comhe.functional._pairwise`, the fused tiled kernel (the default backend) in
:mod:`lightning_comhe.functional._tiled`, the optional ``torch.compile`` tiles (``backend="compiled"`` or
``LIGHTNING_COMHE_COMPILE=1``) in :mod:`lightning_comhe.functional._compiled`, power parsing in
:mod:`lightning_comhe.functional._power` and the batched projection in :mod:`lightning_comhe.functional.projection`.
``PowerLike``, ``parse_power``, ``OFFICIAL_POWERS`` and ``project_sets`` are re-exported here.
"""

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from lightning_comhe.functional._checks import check_eps, check_finite, check_neurons, check_projection
from lightning_comhe.functional._device import autocast_off
from lightning_comhe.functional._dtype import compute_dtype
from lightning_comhe.functional._power import OFFICIAL_POWERS, PowerLike, parse_power
from lightning_comhe.functional._rows import rows_core
from lightning_comhe.functional._tiled import energy_core
from lightning_comhe.functional.projection import project_sets

__all__ = [
    "OFFICIAL_POWERS",
    "Backend",
    "PowerLike",
    "hyperspherical_energy",
    "parse_power",
    "project_sets",
    "projected_energy",
]

Backend = Literal["auto", "fused", "autograd", "compiled"]
_BACKENDS: tuple[str, ...] = ("auto", "fused", "autograd", "compiled")


def _check_neurons(neurons: Tensor, name: str = "neurons") -> None:
    check_neurons(neurons, name, min_neurons=2)


def _check_finite(t: Tensor, name: str) -> None:
    check_finite(t, name, "hyperspherical energy")


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
    rows: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
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
    (bf16/fp16 weights are upcast). The default backend works in tiles of the Gram matrix (at most 2**20 elements,
    over its upper triangle) and, when a gradient is needed, forms the gradient tile by tile in the forward pass, so
    the backward only scales it (tiles are recomputed for double backward only); memory is O(B·tile + B·N·d) rather
    than O(B·N²).

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
        rows: ``(start, stop)`` with ``0 <= start < stop <= N``: only the part of the energy held by the rows
            :math:`I = [start, stop)` of the pair matrix's upper triangle,
            :math:`\frac{1}{Z}(\sum_{i \in I}\sum_{j > i} f(c_{ij}) + \text{the rows' antipodal terms})` with the
            whole energy's normalization :math:`Z`. The parts of any partition of the rows sum to the energy, and
            so do their gradients: this is how one set's penalty is split across data-parallel ranks
            (:mod:`lightning_comhe.sharding`). Computed on the fused tiles restricted to those rows (``backend``
            applies; ``tile_size`` does not); ``None``: the whole energy. A list of such blocks gives one part per
            block (a trailing dimension), normalizing the neurons once.

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
        >>> w = torch.randn(6, 5, dtype=torch.float64)
        >>> halves = hyperspherical_energy(w, rows=(0, 2)) + hyperspherical_energy(w, rows=(2, 6))
        >>> torch.allclose(halves, hyperspherical_energy(w))
        True
    """
    _check_neurons(neurons)
    s, angular = parse_power(power, angular)
    check_eps(eps)
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}.")
    if tile_size is not None and (isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1):
        raise ValueError(f"`tile_size` must be None or an int >= 1, got {tile_size!r}.")
    blocks = None if rows is None else _check_rows(rows, neurons.shape[-2])
    if check_finite:
        _check_finite(neurons, "neurons")
    dtype = compute_dtype(neurons)
    with autocast_off(neurons.device):
        v = neurons.to(dtype)
        batched = v.ndim == 3
        v = v if batched else v[None]
        if blocks is None:
            out = energy_core(v, s, angular, half_space, float(eps), backend, tile_size)
        else:
            out = rows_core(v, blocks, s, angular, half_space, float(eps), backend)
            out = out[..., 0] if isinstance(rows, tuple) else out
    return out if batched else out[0]


def _check_rows(rows: object, n: int) -> list[tuple[int, int]]:
    blocks = [rows] if isinstance(rows, tuple) else rows
    if not (isinstance(blocks, list | tuple) and blocks) or not all(
        isinstance(b, tuple)
        and len(b) == 2
        and all(isinstance(r, int) and not isinstance(r, bool) for r in b)
        and 0 <= b[0] < b[1] <= n
        for b in blocks
    ):
        raise ValueError(
            "`rows` must be None, a tuple (start, stop) with 0 <= start < stop <= N, or a non-empty list of them; "
            f"N = {n}, got {rows!r}."
        )
    return list(blocks)  # type: ignore[arg-type]


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
    check_projection(neurons, projections, "projections", per_set="C")
    d = neurons.shape[-1]
    if check_finite:
        _check_finite(neurons, "neurons")
        _check_finite(projections, "projections")
    dtype = compute_dtype(neurons)
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
