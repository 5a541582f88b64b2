r"""The energy held by a block of rows of the pair matrix: the unit of a set's penalty split across ranks.

For rows :math:`I = [r_0, r_1)` of a set of ``N`` neurons, the block holds the pairs :math:`(i, j)` with
:math:`i \in I` and :math:`j > i` (the rows of the upper triangle):

.. math::

    E_I = \frac{1}{Z} \Big( \sum_{i \in I} \sum_{j > i} t(c_{ij}) + \sum_{i \in I} a_i \Big)

with the same per-pair terms :math:`t` and normalization :math:`Z` as the whole energy (and, for half-space MHE, the
antipodal terms :math:`a_i` of the rows), so the blocks of any partition of the rows sum to the whole energy, and
so do their gradients. A block reads the ``|I| × (N - r_0)`` rectangle of the Gram matrix (``|I|·(N - r_0)·d``
multiply-adds). It runs on the fused tiles of the whole energy, restricted to its rows
(:class:`~lightning_comhe.functional._tiled._FusedPairEnergy` with a ``span``: the gradient is formed in the
forward pass, no rectangle is materialised, and double backward is exact), or with ``backend="autograd"`` by the
reference formula, which materialises the rectangle.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_comhe.functional import _compiled
from lightning_comhe.functional._pairwise import pair_terms
from lightning_comhe.functional._tiled import _FusedPairEnergy, _tile_rows, antipodal_terms, eps_normalize

__all__ = ["rows_core"]


def rows_core(
    v: Tensor,
    blocks: Sequence[tuple[int, int]],
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    backend: str = "auto",
) -> Tensor:
    """The part of the energy of each set of ``v`` (B, N, k) held by each row block ``[start, stop)``: ``(B, len)``.

    Arguments as :func:`~lightning_comhe.functional._tiled.energy_core` (validated by the caller), with
    ``0 <= start < stop <= N`` for every block. The rows from the first block's start on are normalized once for all
    blocks (the rows above it enter no block's pairs).
    """
    n = v.shape[1]
    first = min(start for start, _ in blocks)
    w = v[:, first:]  # rows first..N-1: the rows above enter no block's pairs
    if backend != "autograd":
        return _fused_rows(w, n, first, blocks, s, angular, half_space, eps, backend)
    nrm2 = torch.linalg.vecdot(w, w) + eps
    if v.device.type != "cpu" or bool(torch.isinf(nrm2).any()):  # overflow-safe normalization (see eps_normalize)
        u, nrm2, e = eps_normalize(w, eps)
        inv = None
    else:  # the Gram of the raw rows, scaled by 1/(n_i n_j): no normalized copy of the rows
        u, e, inv = w, eps, nrm2.rsqrt()
    q = (nrm2.reciprocal() * e).detach()  # eps / n², as the whole energy's bound uses it
    out = []
    for start, stop in blocks:
        a, b = start - first, stop - first
        c = u[:, a:b] @ u[:, a:].transpose(1, 2)  # (B, r, N - start): the rows' part of the upper triangle
        if inv is not None:
            c = c * inv[:, a:b, None] * inv[:, None, a:]
        terms = pair_terms(c, q[:, a:b, None] + q[:, None, a:], s, angular, half_space, eps)
        upper = torch.ones(b - a, n - start, dtype=torch.bool, device=v.device).triu(1)
        pair_sum = torch.where(upper, terms, 0.0).sum(dim=(1, 2))
        if not half_space:
            out.append(pair_sum / (n * (n - 1) / 2))
            continue
        e_rows = e if isinstance(e, float) else e[:, a:b]
        diag = antipodal_terms(nrm2[:, a:b], e_rows, s, angular, eps).sum(-1)
        out.append((pair_sum + diag) / (n * (2 * n - 1)))
    return torch.stack(out, dim=-1)


def _fused_rows(
    w: Tensor,
    n: int,
    first: int,
    blocks: Sequence[tuple[int, int]],
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    backend: str,
) -> Tensor:
    """:func:`rows_core` on the fused tiles: ``w`` holds the rows ``first..N-1`` of the ``N`` neurons."""
    u, nrm2, e = eps_normalize(w, eps)
    q = (nrm2.reciprocal() * e).detach()  # eps / n², as `eps / nrm2` computes it
    compiled = backend == "compiled" or (backend == "auto" and _compiled.compile_requested())
    need_grad = u.requires_grad and torch.is_grad_enabled()
    rows = _tile_rows(w.shape[0], w.shape[1], None)
    out = []
    for start, stop in blocks:
        span = (start - first, stop - first)
        pair_sum = _FusedPairEnergy.apply(u, q, s, angular, half_space, eps, rows, compiled, need_grad, span)
        if not half_space:
            out.append(pair_sum / (n * (n - 1) / 2))
            continue
        e_rows = e if isinstance(e, float) else e[:, span[0] : span[1]]
        diag = antipodal_terms(nrm2[:, span[0] : span[1]], e_rows, s, angular, eps).sum(-1)
        out.append((pair_sum + diag) / (n * (2 * n - 1)))
    return torch.stack(out, dim=-1)
