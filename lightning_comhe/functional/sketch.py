r"""Structured random projections (sketches) for RP-CoMHE: very sparse sign matrices and the SRHT.

RP-CoMHE projects every neuron set :math:`W \in \mathbb{R}^{N \times d}` with ``C`` random ``k × d`` matrices. With
dense Gaussian matrices that costs :math:`2NdCk` FLOPs forward and as much backward, plus drawing :math:`Ckd`
normal numbers per set and step: it dominates the penalty (``docs/benchmarks.md``). The two sketches here have the
same first two moments per entry (:math:`\mathbb{E}P_{ij} = 0`, :math:`\mathbb{E}P_{ij}^2 = 1`, like
:math:`\mathcal{N}(0, 1)`, so the eps-normalisation sees the same scale) and cost far less:

* **Very sparse sign projections** (Li, Hastie & Church, KDD 2006; Achlioptas, 2003): i.i.d. entries
  :math:`\pm 1/\sqrt{\rho}` with probability :math:`\rho/2` each and :math:`0` otherwise (density :math:`\rho`,
  default :math:`1/\sqrt{d}`). Applied as one sparse-dense matmul per group of sets (CSR, with the transpose kept
  for backward): :math:`2NCkd\rho` FLOPs. Guarantee: every projected inner product is unbiased, with the variance of
  the Gaussian case plus :math:`(1/\rho - 3)\sum_i x_i^2 y_i^2` (Li et al., Lemma 1); for :math:`\rho = 1/3` this is
  exactly Achlioptas' database-friendly projection, which satisfies the same JL bound as the Gaussian. For
  :math:`\rho = 1/\sqrt d` the JL bound holds asymptotically for vectors whose mass is spread over many coordinates
  (bounded fourth moments), which is the case for trained dense layers; a neuron concentrated on a few input
  coordinates (a pruned or near one-hot filter) is poorly preserved, use ``"srht"`` or ``"gaussian"`` then.
* **The subsampled randomized Hadamard transform** (SRHT; Ailon & Chazelle, 2009; Tropp, 2011): pad ``d`` to
  :math:`d' = 2^{\lceil \log_2 d \rceil}`, flip signs with a random diagonal :math:`D`, apply the (unnormalised,
  :math:`\pm 1`) Walsh–Hadamard matrix :math:`H` and keep ``C·k`` of its :math:`d'` rows chosen uniformly without
  replacement (more sign draws when :math:`Ck > d'`). Every row is a Rademacher vector on the ``d`` coordinates.
  Guarantee, for *every* input: for a fixed set of :math:`n` vectors, :math:`\sqrt{1/k}\,SHD` preserves all
  squared norms (hence, by polarisation, inner products and angles) within :math:`1 \pm \epsilon` with probability
  :math:`1 - \delta` once :math:`k \gtrsim \epsilon^{-2}\log(n/\delta)\log(d/\delta)` (Tropp 2011, Thm. 3.1): the
  Gaussian JL bound up to a :math:`\log d` factor. Cost: :math:`O(N d' \log d')` per sign draw (a fast
  Walsh–Hadamard transform), for all ``C`` projections at once.

Both are exact linear maps, differentiable (custom backward with the transposed map), deterministic given the
generator, and device agnostic (CSR matmuls use cuSPARSE on CUDA).
"""

import math
import warnings

import torch
from torch import Tensor

__all__ = [
    "default_density",
    "draw_sparse",
    "draw_srht",
    "fwht",
    "next_pow2",
    "sparse_matrices",
    "sparse_project",
    "srht_project",
]

# Elements per butterfly chunk of the fast Walsh–Hadamard transform on CPU (cache resident).
_FWHT_CHUNK = 1 << 20
_HADAMARD: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def next_pow2(d: int) -> int:
    """The smallest power of two ``>= d``."""
    return 1 << max(0, int(d) - 1).bit_length()


def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (n, dtype, device)
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = h
    return h


def _fwht_impl(x: Tensor) -> Tensor:
    """Unnormalised Walsh–Hadamard transform along the last dimension (a power of two), out of place."""
    shape = x.shape
    dp = shape[-1]
    rows = x.reshape(-1, dp)
    n = rows.shape[0]
    out = torch.empty_like(rows)
    if n == 0:
        return out.reshape(shape)
    h0 = min(dp, 16)  # the first log2(h0) butterfly stages as one small matmul (inner strides < 16 vectorise badly)
    hm = _hadamard(h0, x.dtype, x.device)
    chunk = n if x.device.type != "cpu" else max(1, min(n, _FWHT_CHUNK // dp))
    buf_a = torch.empty(chunk, dp, dtype=x.dtype, device=x.device)
    buf_b = torch.empty_like(buf_a)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        a, b = buf_a[: r1 - r0], buf_b[: r1 - r0]
        torch.matmul(rows[r0:r1].reshape(r1 - r0, dp // h0, h0), hm, out=a.view(r1 - r0, dp // h0, h0))
        s = h0
        while s < dp:
            av, bv = a.view(r1 - r0, dp // (2 * s), 2, s), b.view(r1 - r0, dp // (2 * s), 2, s)
            torch.add(av[:, :, 0], av[:, :, 1], out=bv[:, :, 0])
            torch.sub(av[:, :, 0], av[:, :, 1], out=bv[:, :, 1])
            a, b = b, a
            s *= 2
        out[r0:r1] = a
    return out.reshape(shape)


class _FWHT(torch.autograd.Function):
    """``y = x H`` (last dimension); ``H`` is symmetric, so the backward is the same transform."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _fwht_impl(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _FWHT.apply(grad) if torch.is_grad_enabled() else _fwht_impl(grad)


def fwht(x: Tensor) -> Tensor:
    r"""Unnormalised fast Walsh–Hadamard transform along the last dimension (size a power of two), differentiable.

    ``fwht(x) = x @ H`` with :math:`H_{ij} = (-1)^{\langle i, j\rangle}` (Sylvester order, entries ±1, so
    ``fwht(fwht(x)) = d · x``). Cost :math:`O(d \log d)` per row.

    Example::

        >>> import torch
        >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([1., 1., 1., 1.])
    """
    dp = x.shape[-1]
    if dp & (dp - 1):
        raise ValueError(f"`x` must have a last dimension that is a power of two, got {dp}.")
    return _FWHT.apply(x)


# ---------------------------------------------------------------------------------------------------------------
# SRHT
# ---------------------------------------------------------------------------------------------------------------


def draw_srht(num_sets: int, rows: int, d: int, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """Draw the randomness of ``num_sets`` SRHTs with ``rows = C·k`` rows each.

    Returns:
        ``{"signs": (G, R, d) int8 of ±1, "index": (G, rows) int64}``: ``R = ceil(rows / d')`` sign vectors per set
        and the kept rows, uniformly without replacement among the ``R·d'`` rows of the ``R`` transforms.
    """
    dp = next_pow2(d)
    reps = -(-rows // dp)
    host = generator.device  # the CPU for device types without a generator of their own
    bits = torch.randint(0, 2, (num_sets, reps, d), generator=generator, device=host, dtype=torch.int8)
    signs = bits * 2 - 1
    keys = torch.rand(num_sets, reps * dp, generator=generator, device=host)
    index = keys.argsort(dim=1)[:, :rows].contiguous()
    return {"signs": signs.to(device), "index": index.to(device)}


def srht_project(neurons: Tensor, signs: Tensor, index: Tensor, num: int, dim: int) -> Tensor:
    """Apply SRHT projections: ``(G, N, d)`` neurons -> ``(G, C, N, k)`` with ``C = num``, ``k = dim``.

    Row ``m`` of set ``g`` is ``(H D_r x)[j]`` for ``index[g, m] = r·d' + j``. Differentiable in ``neurons``.
    """
    g, n, d = neurons.shape
    reps = signs.shape[1]
    dp = next_pow2(d)
    x = neurons[:, None, :, :] * signs[:, :, None, :].to(neurons.dtype)  # (G, R, N, d)
    if dp != d:
        x = torch.nn.functional.pad(x, (0, dp - d))
    y = fwht(x)  # (G, R, N, d')
    y = y.permute(0, 2, 1, 3).reshape(g, n, reps * dp)  # (G, N, R·d')
    out = torch.gather(y, 2, index[:, None, :].expand(g, n, index.shape[1]))  # (G, N, C·k)
    return out.reshape(g, n, num, dim).permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------------------------
# Very sparse sign projections
# ---------------------------------------------------------------------------------------------------------------


def default_density(d: int) -> float:
    """Li, Hastie & Church's very sparse density ``1/sqrt(d)`` (at most 1)."""
    return min(1.0, 1.0 / math.sqrt(d))


def draw_sparse(
    num_sets: int, rows: int, d: int, density: float, generator: torch.Generator, device: torch.device
) -> dict[str, Tensor]:
    """Draw ``num_sets`` sparse sign matrices ``rows × d`` with i.i.d. Bernoulli(``density``) support.

    The support is drawn exactly, in O(nnz), from geometric gaps between successive nonzeros of the flattened
    ``(G, rows, d)`` index space.

    Returns:
        ``{"pos": int64 sorted flat positions, "sign": int8 ±1}`` of the nonzeros.
    """
    total = num_sets * rows * d
    host = generator.device  # the CPU for device types without a generator of their own
    if density >= 1.0:
        pos = torch.arange(total, device=host)
    else:
        parts, last = [], -1
        while True:
            remaining = total - 1 - last
            expected = remaining * density
            count = int(expected + 6.0 * math.sqrt(expected + 1.0) + 16)
            gaps = torch.empty(count, dtype=torch.float64, device=host).geometric_(density, generator=generator)
            step = torch.cumsum(gaps.to(torch.int64), 0) + last
            parts.append(step[step < total])
            last = int(step[-1])
            if last >= total - 1:
                break
        pos = torch.cat(parts)
    sign = torch.randint(0, 2, (pos.numel(),), generator=generator, device=host, dtype=torch.int8) * 2 - 1
    return {"pos": pos.to(device), "sign": sign.to(device)}


def sparse_matrices(
    pos: Tensor, sign: Tensor, num_sets: int, rows: int, d: int, density: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The block-diagonal CSR matrix ``P`` (G·rows, G·d) of a sparse draw, and its transpose (also CSR)."""
    scale = 1.0 / math.sqrt(density)
    values = sign.to(dtype) * scale
    gm = pos // d  # global row (set g, row m) = g·rows + m
    col = pos % d + (gm // rows) * d
    nrows, ncols = num_sets * rows, num_sets * d
    crow = torch.zeros(nrows + 1, dtype=torch.int64, device=pos.device)
    crow[1:] = torch.cumsum(torch.bincount(gm, minlength=nrows), 0)
    order = torch.argsort(col, stable=True)
    crow_t = torch.zeros(ncols + 1, dtype=torch.int64, device=pos.device)
    crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=ncols), 0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        # built valid by construction (sorted, in range), so the invariant checks are skipped
        p = torch.sparse_csr_tensor(crow, col, values, (nrows, ncols), check_invariants=False)
        pt = torch.sparse_csr_tensor(crow_t, gm[order], values[order], (ncols, nrows), check_invariants=False)
    return p, pt


def _transpose_sets(x: Tensor) -> Tensor:
    """``(G, a, b) -> (G, b, a)`` contiguous, one 2-D transpose per set (faster than a batched strided copy on CPU)."""
    out = torch.empty(x.shape[0], x.shape[2], x.shape[1], dtype=x.dtype, device=x.device)
    for i in range(x.shape[0]):
        out[i].copy_(x[i].t())
    return out


def _sparse_apply(w: Tensor, p: Tensor) -> Tensor:
    g, n, d = w.shape
    return p @ _transpose_sets(w).view(g * d, n)


def _sparse_apply_t(y: Tensor, pt: Tensor, g: int, d: int) -> Tensor:
    n = y.shape[1]
    return _transpose_sets((pt @ y.contiguous()).view(g, d, n))


class _SparseProject(torch.autograd.Function):
    """``(G, N, d) -> (G·rows, N) = P [W_1ᵀ; …; W_Gᵀ]`` for a constant block-diagonal CSR ``P`` (transpose ``Pt``).

    CSR @ dense wants the dense operand row-major, so the sets are transposed once on the way in and the gradient
    once on the way out (returned contiguous, which keeps the accumulation into ``.grad`` fast).
    """

    @staticmethod
    def forward(ctx, w: Tensor, p: Tensor, pt: Tensor) -> Tensor:
        ctx.mats = (p, pt, w.shape[0], w.shape[2])
        return _sparse_apply(w, p)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, pt, g, d = ctx.mats
        if torch.is_grad_enabled():
            return _SparseProjectT.apply(grad, p, pt, g, d), None, None
        return _sparse_apply_t(grad, pt, g, d), None, None


class _SparseProjectT(torch.autograd.Function):
    """The adjoint of :class:`_SparseProject` (its backward), differentiable for double backward."""

    @staticmethod
    def forward(ctx, y: Tensor, p: Tensor, pt: Tensor, g: int, d: int) -> Tensor:
        ctx.mats = (p, pt)
        return _sparse_apply_t(y, pt, g, d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, pt = ctx.mats
        if torch.is_grad_enabled():
            return _SparseProject.apply(grad, p, pt), None, None, None, None
        return _sparse_apply(grad, p), None, None, None, None


def sparse_project(neurons: Tensor, p: Tensor, pt: Tensor, num: int, dim: int) -> Tensor:
    """Apply block-diagonal sparse projections: ``(G, N, d)`` neurons -> ``(G, C, N, k)``. Differentiable."""
    g, n, d = neurons.shape
    out = _SparseProject.apply(neurons, p, pt)  # (G·C·k, N)
    return out.reshape(g, num, dim, n).transpose(2, 3)
