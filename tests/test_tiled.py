"""Tests of `lightning_comhe.functional._tiled`: tile planning, the tiled kernel and its autograd ``Function``.

Every shortcut of the tiled kernel (ragged tiles, column blocks, the gradient formed in the forward pass, the
eps-normalisation backward) is checked against the plain-autograd reference backend.
"""

from functools import partial

import pytest
import torch

from lightning_comhe.functional import _tiled as T
from lightning_comhe.functional.energy import hyperspherical_energy
from tests.helpers_energy import degenerate_batch, value_and_grad

F64 = torch.float64
POWERS = (0.0, 0.5, 1.0, 2.0, 3.7)
VARIANTS = [(s, angular, half) for s in POWERS for angular in (False, True) for half in (False, True)]
VARIANT_IDS = [f"s{s}-{'ang' if a else 'chord'}-{'half' if h else 'plain'}" for s, a, h in VARIANTS]


# ---------------------------------------------------------------------------------------------------------------
# 1. Tile planning and the per-tile bound maxima
# ---------------------------------------------------------------------------------------------------------------


def test_tile_bound_max_off_cpu_is_none():
    # off the CPU the exact floor is always applied (no host synchronisation), so no maximum is computed
    assert T._tile_bound_max(torch.zeros(2, 5, device="meta"))(0, 2) is None


def test_tile_bound_max_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    q = torch.rand(3, 11, generator=g, dtype=F64)
    bound_max = T._tile_bound_max(q)
    for r0, r1 in ((0, 4), (4, 8), (8, 11), (3, 5)):
        expected = (q[:, r0:r1, None] + q[:, None, r0:]).max().item()
        assert bound_max(r0, r1) >= expected - 1e-15  # conservative: maxima over the sets are taken separately
        assert bound_max(r0, r1) == pytest.approx(q[:, r0:r1].max().item() + q[:, r0:].max().item(), abs=0)


@pytest.mark.parametrize("bsz,n", [(1, 2), (1, 4096), (60, 512), (80, 64), (3, 70_000), (2000, 16)])
def test_tile_plan_bounds_temporaries(bsz, n):
    rows, chunk, cols = T._tile_plan(bsz, n, None)
    assert 1 <= rows <= n and 1 <= chunk <= bsz and rows <= cols <= n
    assert chunk * rows * cols <= max(T._TILE_ELEMENTS, n)
    if n >= 64:  # several row blocks, so that little more than the upper triangle is computed
        assert -(-n // rows) >= 4 or rows == T._MAX_TILE_ROWS
    if n > T._TILE_ELEMENTS // T._MAX_TILE_ROWS:  # huge sets: full-height row blocks, split into column blocks
        assert rows == T._MAX_TILE_ROWS and cols < n
    tiles = list(T._tiles(n, rows, cols))
    covered = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles)
    assert covered >= n * (n - 1) // 2 and all(c0 >= r0 for r0, _, c0, _ in tiles)
    rows, chunk, cols = T._tile_plan(bsz, n, 5)
    assert rows == min(5, n)


# ---------------------------------------------------------------------------------------------------------------
# 2. The tiled kernel end to end: many chunks and row blocks, degenerate sets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s,angular,half_space", VARIANTS, ids=VARIANT_IDS)
def test_tiled_kernel_matches_autograd_with_tiny_tiles(monkeypatch, s, angular, half_space):
    monkeypatch.setattr(T, "_TILE_ELEMENTS", 40)  # several set chunks and row blocks, ragged edges
    w = degenerate_batch()
    kw = dict(power=s, angular=angular, half_space=half_space)
    ref, ref_grad = value_and_grad(partial(hyperspherical_energy, backend="autograd", **kw), w)
    for tile_size in (None, 1, 3, 13):
        val, grad = value_and_grad(partial(hyperspherical_energy, backend="fused", tile_size=tile_size, **kw), w)
        torch.testing.assert_close(val, ref, rtol=1e-12, atol=0)
        scale = ref_grad.abs().max()
        assert ((grad - ref_grad).abs().max() / scale).item() < 1e-10
    with torch.no_grad():
        torch.testing.assert_close(hyperspherical_energy(w, backend="fused", **kw), ref, rtol=1e-12, atol=0)


def test_gradient_formed_in_forward_or_recomputed_in_backward():
    """`need_grad=True` forms the gradient in the forward pass; without it, backward recomputes the tiles."""
    w = degenerate_batch(seed=5)
    u = (w / (w.pow(2).sum(-1, keepdim=True) + 1e-4).sqrt()).requires_grad_(True)
    q = 1e-4 / (w.pow(2).sum(-1) + 1e-4)
    grads = []
    for need_grad in (True, False):
        x = u.detach().clone().requires_grad_(True)
        out = T._FusedPairEnergy.apply(x, q, 2.0, False, True, 1e-4, 4, False, need_grad)
        saved = out.grad_fn.saved_tensors
        assert (saved[2] is not None) == need_grad
        (g,) = torch.autograd.grad((out * torch.arange(1.0, 6.0, dtype=F64)).sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_backward_twice_with_retained_graph():
    w = torch.randn(2, 9, 4, dtype=F64, requires_grad=True)
    out = hyperspherical_energy(w, half_space=True).sum()
    (g1,) = torch.autograd.grad(out, w, retain_graph=True)
    (g2,) = torch.autograd.grad(out, w)
    assert torch.equal(g1, g2)


def test_float32_kernel_close_to_float64():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 300, 40, generator=g, dtype=F64)
    for power, half_space in (("2", True), ("2", False), ("0", True), ("a2", False)):
        ref, ref_grad = value_and_grad(partial(hyperspherical_energy, power=power, half_space=half_space), w)
        val, grad = value_and_grad(partial(hyperspherical_energy, power=power, half_space=half_space), w.float())
        torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=0)
        assert ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item() < 1e-4


def test_eps_normalize_gradients():
    g = torch.Generator().manual_seed(7)
    v = torch.randn(2, 5, 3, generator=g, dtype=F64, requires_grad=True)

    def fn(x):
        u, n2 = T._EpsNormalize.apply(x, 1e-2)
        return (u * torch.linspace(-1, 1, 3, dtype=F64)).sum(-1) + n2.sin()

    assert torch.autograd.gradcheck(fn, (v,))
    assert torch.autograd.gradgradcheck(fn, (v,))
    assert torch.autograd.gradcheck(lambda x: T._EpsNormalize.apply(x, 1e-2)[0], (v,))
    assert torch.autograd.gradcheck(lambda x: T._EpsNormalize.apply(x, 1e-2)[1], (v,))


@pytest.mark.parametrize("s,angular,half_space", [(2.0, False, True), (0.0, True, False), (1.0, False, False)])
def test_column_blocks_match_autograd(monkeypatch, s, angular, half_space):
    """Huge sets are tiled in columns too; with a tiny budget every path of the 2-D tiling runs on small sets."""
    monkeypatch.setattr(T, "_TILE_ELEMENTS", 12)
    w = degenerate_batch(seed=9)
    kw = dict(power=s, angular=angular, half_space=half_space)
    ref, ref_grad = value_and_grad(partial(hyperspherical_energy, backend="autograd", **kw), w)
    for tile_size in (None, 2, 5):
        if tile_size is not None:
            assert T._tile_plan(5, 13, tile_size)[2] < 13  # column blocks are used
        val, grad = value_and_grad(partial(hyperspherical_energy, backend="fused", tile_size=tile_size, **kw), w)
        torch.testing.assert_close(val, ref, rtol=1e-12, atol=0)
        assert ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item() < 1e-10


def test_energy_core_matches_the_public_function():
    w = degenerate_batch(seed=10)
    for s, angular, half_space in ((2.0, False, True), (0.0, True, False)):
        out = T.energy_core(w, s, angular, half_space, 1e-4, "fused", None)
        assert out.shape == (5,)
        power = f"a{int(s)}" if angular else s
        assert torch.equal(out, hyperspherical_energy(w, power, half_space=half_space, backend="fused"))
