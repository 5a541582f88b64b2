"""The fused, tiled kernel of the energies: tile planning, the tile loop and its custom autograd ``Function``.

The default backend is a custom autograd ``Function`` over tiles of the Gram matrix (at most ``_TILE_ELEMENTS``
elements; row blocks over the upper triangle, column blocks for very large ``N``). When a gradient is needed, every
tile is computed once and yields both its terms and its gradient contributions, so backward never recomputes the
Gram: it scales the gradient formed in the forward pass. Tiles are recomputed only for double backward (from
differentiable ops) or when the forward ran without recording a gradient. Where the eps floor provably cannot bind
(checked per tile, on CPU) the terms are computed in place by a few fused passes
(:func:`lightning_comhe.functional._pairwise.pair_terms`); elsewhere the reference formula runs. With
``compiled=True`` the per-tile work runs through ``torch.compile`` (:mod:`lightning_comhe.functional._compiled`).
Benchmarks: ``docs/benchmarks.md``.
"""

import math
from collections.abc import Callable, Iterator
from itertools import accumulate

import torch
from torch import Tensor

from lightning_comhe.functional import _compiled
from lightning_comhe.functional._pairwise import (
    LazyBound,
    Scratch,
    angle_term,
    chord_term,
    pair_terms,
    pair_terms_and_grad,
)

__all__ = ["antipodal_terms", "energy_core", "eps_normalize", "overflow_scale"]

# Elements of one Gram tile (sets × rows × columns): 2**20 float32 elements is 4 MiB per buffer, cache-resident on
# most CPUs between the elementwise passes; see `_tile_plan`.
_TILE_ELEMENTS = 1 << 20
_MIN_TILE_ROWS = 16
_MAX_TILE_ROWS = 256


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


def _tiles(n: int, rows: int, cols: int, span: tuple[int, int] | None = None) -> Iterator[tuple[int, int, int, int]]:
    """``(r0, r1, c0, c1)`` over the upper triangle's rows (``span``: rows ``[lo, hi)``), columns from ``r0``."""
    lo, hi = span or (0, n)
    for r0 in range(lo, min(hi, n - 1), rows):
        r1 = min(r0 + rows, hi)
        for c0 in range(r0, n, cols):
            yield r0, r1, c0, min(c0 + cols, n)


def _tile_bound_max(q: Tensor) -> Callable[..., float | None]:
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
    span: tuple[int, int] | None = None,
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
    # Both gradient parts are added to grad_u in its own (B, N, k) layout: the rows get W U_cols, the columns right of
    # the diagonal block get Wᵀ U_rows, each formed by one bmm into a contiguous scratch buffer.
    scratch = Scratch(u)
    for b0 in range(0, bsz, chunk):
        b1 = min(b0 + chunk, bsz)
        ub, qb = u[b0:b1], q[b0:b1]
        bound_max = _tile_bound_max(qb)
        for r0, r1, c0, c1 in _tiles(n, rows, cols, span):
            r = r1 - r0
            diag = c0 == r0  # the tile starts with the (symmetric) diagonal block [r0, r1)²
            ur, uc = ub[:, r0:r1], ub[:, c0:c1]
            c = torch.bmm(ur, uc.transpose(1, 2), out=scratch.get(0, (b1 - b0, r, c1 - c0)))
            if diag:
                c[:, :, :r].diagonal(dim1=1, dim2=2).zero_()  # c_ii ≈ 1 would make the floor bind; its term is dropped
            bound = LazyBound(qb[:, r0:r1, None], qb[:, None, c0:c1], bound_max(r0, r1, c0, c1))
            if need_grad:
                kw = {"inplace": True, "scratch": scratch}
                terms, w = pair_terms_and_grad(c, bound, s, angular, half_space, eps, need_value, **kw)
            else:
                terms = pair_terms(c, bound, s, angular, half_space, eps, inplace=True, scratch=scratch)
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
    u: Tensor,
    q: Tensor,
    grad_out: Tensor,
    s: float,
    angular: bool,
    half_space: bool,
    eps: float,
    rows: int,
    span: tuple[int, int] | None = None,
) -> Tensor:
    """The gradient built from differentiable ops, for double backward (``create_graph=True``)."""
    bsz, n, _ = u.shape
    idx = torch.arange(n, device=u.device)
    grad_u = torch.zeros_like(u)
    scale = grad_out[:, None, None]
    for r0, r1, _, _ in _tiles(n, rows, n, span):  # one column block per row block: [r0, n)
        ur, uc = u[:, r0:r1], u[:, r0:]
        c = torch.bmm(ur, uc.transpose(1, 2))
        b = q[:, r0:r1, None] + q[:, None, r0:]
        _, dterm = pair_terms_and_grad(c, b, s, angular, half_space, eps, need_value=False)
        keep = idx[r0:, None].T > idx[r0:r1, None]
        w = torch.where(keep, dterm, 0.0) * scale
        pad_rows = torch.nn.functional.pad(torch.bmm(w, uc), (0, 0, r0, n - r1))
        pad_cols = torch.nn.functional.pad(torch.bmm(w.transpose(1, 2), ur), (0, 0, r0, 0))
        grad_u = grad_u + pad_rows + pad_cols
    return grad_u


def _compiled_tiles(
    u: Tensor, q: Tensor, fns: tuple, rows: int, need_grad: bool, span: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor | None]:
    """`_fused_tiles` with the per-tile work compiled: ``fns = (tile_sum, tile_sum_and_grad)``."""
    bsz, n, _ = u.shape
    chunk, cols = _chunk_and_cols(bsz, n, rows)
    tile_sum, tile_sum_and_grad = fns
    total = u.new_zeros(bsz)
    grad_u = torch.zeros_like(u) if need_grad else None
    for b0 in range(0, bsz, chunk):
        ub, qb = u[b0 : b0 + chunk], q[b0 : b0 + chunk]
        for r0, r1, c0, c1 in _tiles(n, rows, cols, span):
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
        span: tuple[int, int] | None = None,
    ):
        fns = _compiled.compiled_tile_fns(s, angular, half_space, eps) if compiled else None

        def eager() -> tuple[Tensor | None, Tensor | None]:
            return _fused_tiles(u, q, s, angular, half_space, eps, rows, True, need_grad, span)

        if fns is not None:
            total, grad_u = _compiled.run_or_fallback(lambda: _compiled_tiles(u, q, fns, rows, need_grad, span), eager)
        else:
            total, grad_u = eager()
        ctx.save_for_backward(u, q, grad_u)
        ctx.config = (s, angular, half_space, eps, rows, span)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        u, q, grad_u = ctx.saved_tensors
        s, angular, half_space, eps, rows, span = ctx.config
        if torch.is_grad_enabled():  # double backward: build the gradient out of place, from differentiable ops
            grad = _differentiable_backward(u, q, grad_out, s, angular, half_space, eps, rows, span)
        elif grad_u is not None:
            grad = grad_u * grad_out[:, None, None]
        else:  # the forward ran without a gradient request (e.g. under no_grad) but a gradient is asked for now
            grad = _fused_tiles(u, q, s, angular, half_space, eps, rows, False, True, span)[1]
            grad = grad.mul_(grad_out[:, None, None])
        return grad, None, None, None, None, None, None, None, None, None


class _EpsNormalize(torch.autograd.Function):
    """``v -> (u = v / n, n² = ‖v‖² + eps)`` per row, with a backward of three passes over ``v``.

    ``eps`` is a float, or a per-row tensor (the eps of rows rescaled by :func:`overflow_scale`).

    ``∂L/∂v = (g_u - (g_u·u) u)/n + 2 g_{n²} v``. Under ``create_graph`` the backward recomputes ``u`` and ``1/n``
    from ``v`` with differentiable ops, so higher derivatives are exact.
    """

    @staticmethod
    def forward(ctx, v: Tensor, eps: float | Tensor) -> tuple[Tensor, Tensor]:
        nrm2 = torch.linalg.vecdot(v, v) + eps
        inv = nrm2.rsqrt()
        u = v * inv[..., None]
        ctx.save_for_backward(v)
        ctx.eps = eps
        ctx.fast = (u.detach(), inv.detach())  # for the first-order backward; detached: no ctx <-> output cycle
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


def overflow_scale(v: Tensor) -> Tensor:
    """Per-row exact powers of two that bring every row whose squared norm could overflow to ``max |v_ij|`` in [½, 1).

    A row with ``max |v_ij| > sqrt(max / (4 d))`` (about 3.8e17 for float32 at ``d = 576``) could overflow in
    ``‖v‖²``; its factor is ``2^-e`` with ``e`` the exponent of its maximum, every other row's is 1. Multiplying by a
    power of two is exact, so those rows are unchanged.
    """
    m = torch.linalg.vector_norm(v.detach(), ord=math.inf, dim=-1)
    big = m > math.sqrt(torch.finfo(v.dtype).max / (4 * max(1, v.shape[-1])))
    # 2^-(floor(log2 m) + 1): a power of two (log2 may round at a boundary; the factor stays a power of two).
    # Not torch.frexp nor torch.exp2: they have no XLA lowering (a host round trip per call on TPUs).
    exponent = torch.floor(torch.log2(torch.where(big, m, 1.0))) + 1
    return torch.where(big, torch.pow(2.0, -exponent), 1.0)


def _normalize(v: Tensor, eps: float | Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    if fused and v.requires_grad and torch.is_grad_enabled():
        return _EpsNormalize.apply(v, eps)
    nrm2 = torch.linalg.vecdot(v, v) + eps
    return v * nrm2.rsqrt()[..., None], nrm2


def eps_normalize(v: Tensor, eps: float, *, fused: bool = True) -> tuple[Tensor, Tensor, float | Tensor]:
    r"""Eps-normalize the rows of ``v`` without overflow: ``(u, n², e)`` with ``u = v / n`` and ``e / n² = eps / n_i²``.

    In exact arithmetic :math:`u_i = v_i / n_i` with :math:`n_i = \sqrt{\|v_i\|^2 + \text{eps}}`. A row whose
    squared norm would overflow (float32 rows with norm above about 1.8e19) is first multiplied by an exact power of
    two :math:`\sigma_i` (:func:`overflow_scale`), and its eps by :math:`\sigma_i^2`:
    :math:`\sigma_i v_i / \sqrt{\sigma_i^2\|v_i\|^2 + \sigma_i^2\,\text{eps}} = v_i / n_i`, so the eps
    semantics are kept exactly; ``n²`` and ``e`` are then those of the scaled row (their ratio is unchanged). On CPU
    the plain path runs first and is kept, bit for bit, unless a squared norm overflowed (a check of ``N`` values);
    on accelerators the factors are always applied (ones for ordinary rows), which needs no host synchronisation.

    Args:
        v: ``(..., d)`` rows in the compute dtype.
        eps: The constant inside each norm's square root.
        fused: Use the three-pass normalization ``Function`` when a gradient is needed (else plain autograd ops).

    Returns:
        ``(u, n², e)``: the normalized rows, the (scaled) squared norms plus eps, and the (scaled) eps: the float
        ``eps`` when no row was scaled, else a tensor of the rows' shape.
    """
    if v.device.type == "cpu":
        u, nrm2 = _normalize(v, eps, fused)
        if not bool(torch.isinf(nrm2).any()):
            return u, nrm2, eps
    scale = overflow_scale(v)
    e = scale.square().mul_(eps)
    u, nrm2 = _normalize(v * scale[..., None], e, fused)
    return u, nrm2, e


def energy_core(
    v: Tensor, s: float, angular: bool, half_space: bool, eps: float, backend: str, tile_size: int | None
) -> Tensor:
    """Energy of a batch ``v`` (B, N, k) already in the compute dtype, with autocast off and validated arguments.

    Args:
        v: The neuron sets, ``(B, N, k)`` with ``N >= 2``.
        s: The power ``s >= 0``.
        angular: Use the angular distance.
        half_space: Use the half-space energy (the set ``[W; -W]``).
        eps: The constant inside each norm's square root (and added to the normalized angle).
        backend: ``"autograd"`` (materialised N×N reference), ``"fused"``, ``"compiled"`` or ``"auto"``.
        tile_size: Rows per Gram tile, or ``None`` to pick one from the problem size.

    Returns:
        The energies, ``(B,)``.
    """
    bsz, n, _ = v.shape
    u, nrm2, e = eps_normalize(v, eps)
    q = (nrm2.reciprocal() * e).detach()  # eps / n², as `eps / nrm2` computes it
    if backend == "autograd":
        c = u @ u.transpose(1, 2)
        b = q[:, :, None] + q[:, None, :]
        terms = pair_terms(c, b, s, angular, half_space, eps)
        keep = torch.ones(n, n, dtype=torch.bool, device=v.device).triu(1)
        pair_sum = torch.where(keep, terms, 0.0).sum(dim=(1, 2))
    else:
        compiled = backend == "compiled" or (backend == "auto" and _compiled.compile_requested())
        need_grad = u.requires_grad and torch.is_grad_enabled()
        rows = _tile_rows(bsz, n, tile_size)
        pair_sum = _FusedPairEnergy.apply(u, q, s, angular, half_space, eps, rows, compiled, need_grad)
    if not half_space:
        return pair_sum / (n * (n - 1) / 2)
    return (pair_sum + antipodal_terms(nrm2, e, s, angular, eps).sum(-1)) / (n * (2 * n - 1))


def antipodal_terms(nrm2: Tensor, e: float | Tensor, s: float, angular: bool, eps: float) -> Tensor:
    r"""Half-space energy: the term of each pair ``(w_i, -w_i)``, ``(..., N)``, from :func:`eps_normalize`'s ``n², e``.

    Its cosine is :math:`-c_{ii}` with :math:`c_{ii} = \|w_i\|^2/(\|w_i\|^2 + eps) = 1 - eps/n_i^2`. The squared
    chord is :math:`2 + 2c_{ii} = 4 - 2\,eps/n_i^2`, and the complementary one is exactly
    :math:`2 - 2c_{ii} = 2\,eps/n_i^2` (no clamping needed).
    """
    q_grad = nrm2.reciprocal() * e
    d_far = 4 - 2 * q_grad
    if not angular:
        return chord_term(d_far, s)
    # eps/n² underflows to 0 for rows rescaled by `eps_normalize` (n > ~1e19): keep √ differentiable there
    near = (2 * q_grad).clamp_min(torch.finfo(q_grad.dtype).tiny).sqrt()
    theta = 2 * torch.atan2(d_far.sqrt(), near) / math.pi
    return angle_term(theta + eps, s)
