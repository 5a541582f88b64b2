"""Tests of the fast paths of the fused energy kernel: in-place tile formulas, tiling, the optional compiled path.

`tests/test_energy.py` checks the public functions against brute force; here every internal shortcut is checked
against the reference formula it replaces, so that a regression is located precisely.
"""

import math
import pickle
import warnings
from functools import partial

import pytest
import torch

from lightning_comhe.functional import _compiled, sketch
from lightning_comhe.functional import energy as E
from lightning_comhe.functional.energy import hyperspherical_energy, projected_energy
from lightning_comhe.projections import RandomProjection
from lightning_comhe.regularizer import CoMHERegularizer

F64 = torch.float64
POWERS = (0.0, 0.5, 1.0, 2.0, 3.7)
VARIANTS = [(s, angular, half) for s in POWERS for angular in (False, True) for half in (False, True)]
VARIANT_IDS = [f"s{s}-{'ang' if a else 'chord'}-{'half' if h else 'plain'}" for s, a, h in VARIANTS]


def tile(seed, shape=(3, 5, 9), bound=0.95, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * bound
    qr = torch.rand(shape[0], shape[1], 1, generator=g, dtype=dtype) * 1e-3
    qc = torch.rand(shape[0], 1, shape[2], generator=g, dtype=dtype) * 1e-3
    return c, qr, qc


def value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


# ---------------------------------------------------------------------------------------------------------------
# 1. In-place tile formulas against the reference formula
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s,angular,half_space", VARIANTS, ids=VARIANT_IDS)
def test_fast_tile_formulas_match_reference(s, angular, half_space):
    c, qr, qc = tile(0)
    b = qr + qc
    lazy = E._LazyBound(qr, qc)
    assert not E._floor_may_bind(c, lazy, half_space or angular)  # so the fast formulas are the ones under test
    ref_value = E._reference_terms(c, b, s, angular, half_space, 1e-4)
    _, ref_grad = E._reference_terms_and_grad(c, b, s, angular, half_space, 1e-4, False)
    scratch = E._Scratch(c)

    value = E._pair_terms(c.clone(), lazy, s, angular, half_space, 1e-4, inplace=True, scratch=scratch)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    none, grad = E._pair_terms_and_grad(c.clone(), lazy, s, angular, half_space, 1e-4, False, inplace=True)
    assert none is None
    torch.testing.assert_close(grad, ref_grad, rtol=1e-11, atol=1e-300)
    value2, grad2 = E._pair_terms_and_grad(
        c.clone(), lazy, s, angular, half_space, 1e-4, True, inplace=True, scratch=scratch
    )
    torch.testing.assert_close(value2, ref_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad2, ref_grad, rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("s,angular,half_space", VARIANTS, ids=VARIANT_IDS)
def test_fast_tile_formulas_float32(s, angular, half_space):
    c, qr, qc = tile(1, dtype=torch.float32)
    lazy = E._LazyBound(qr, qc)
    ref_value = E._reference_terms(c.double(), (qr + qc).double(), s, angular, half_space, 1e-4)
    _, ref_grad = E._reference_terms_and_grad(c.double(), (qr + qc).double(), s, angular, half_space, 1e-4, False)
    value, grad = E._pair_terms_and_grad(c.clone(), lazy, s, angular, half_space, 1e-4, True, inplace=True)
    # log terms pass through 0, so the tolerance has an absolute part relative to the largest term
    torch.testing.assert_close(value.double(), ref_value, rtol=2e-5, atol=2e-6 * ref_value.abs().max().item())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-4, atol=1e-6 * ref_grad.abs().max().item())


@pytest.mark.parametrize("half_space", [False, True])
def test_floor_binding_tile_takes_the_reference_path(half_space):
    """A tile where 2 - 2c falls below its bound (a duplicate pair) gives exactly the reference values."""
    c, qr, qc = tile(2)
    c[1, 2, 3] = 1 - 0.4 * (qr[1, 2, 0] + qc[1, 0, 3]).item()  # 2 - 2c < b: the floor binds
    if half_space:
        c[0, 1, 1] = -1.0 + 1e-12  # and 2 + 2c < b
    lazy = E._LazyBound(qr, qc)
    assert E._floor_may_bind(c, lazy, True)
    for s, angular in ((2.0, False), (0.0, True), (1.0, False)):
        ref = E._reference_terms(c, qr + qc, s, angular, half_space, 1e-4)
        _, ref_grad = E._reference_terms_and_grad(c, qr + qc, s, angular, half_space, 1e-4, False)
        out = E._pair_terms(c.clone(), lazy, s, angular, half_space, 1e-4, inplace=True)
        _, grad = E._pair_terms_and_grad(c.clone(), lazy, s, angular, half_space, 1e-4, False, inplace=True)
        assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


def test_floor_check_is_exact_and_conservative():
    c = torch.tensor([[[0.5, 0.875]]], dtype=F64)  # dyadic values: every quantity below is exact
    qr, qc = torch.tensor([[[0.125]]], dtype=F64), torch.tensor([[[0.0625, 0.125]]], dtype=F64)
    # max b = 0.25 and 2 - 2·0.875 = 0.25: the floor cannot change anything (max(x, b) = x at equality)
    assert not E._floor_may_bind(c, E._LazyBound(qr, qc), False)
    assert not E._floor_may_bind(c, E._LazyBound(qr, qc, 0.25), False)
    assert E._floor_may_bind(c, E._LazyBound(qr, qc, 0.25 + 2**-40), False)
    assert E._floor_may_bind(c, qr + qc + 2**-40, False)
    # the minus side: 2 + 2c must clear the bound too
    assert E._floor_may_bind(-c, E._LazyBound(qr, qc, 0.25 + 2**-40), True)
    assert not E._floor_may_bind(-c, E._LazyBound(qr, qc, 0.25), True)
    # NaN never takes the fast path; off the CPU the exact floor is always applied (no host synchronisation)
    assert E._floor_may_bind(torch.full((1, 1, 2), float("nan"), dtype=F64), E._LazyBound(qr, qc), True)
    assert E._floor_may_bind(torch.zeros(1, 1, 2, device="meta"), E._LazyBound(qr, qc), True)
    assert E._tile_bound_max(torch.zeros(2, 5, device="meta"), 2)(0, 2) is None


def test_tile_bound_max_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    q = torch.rand(3, 11, generator=g, dtype=F64)
    bound_max = E._tile_bound_max(q, 4)
    for r0, r1 in ((0, 4), (4, 8), (8, 11), (3, 5)):
        expected = (q[:, r0:r1, None] + q[:, None, r0:]).max().item()
        assert bound_max(r0, r1) >= expected - 1e-15  # conservative: maxima over the sets are taken separately
        assert bound_max(r0, r1) == pytest.approx(q[:, r0:r1].max().item() + q[:, r0:].max().item(), abs=0)


# ---------------------------------------------------------------------------------------------------------------
# 2. The tiled kernel end to end: many chunks and row blocks, degenerate sets
# ---------------------------------------------------------------------------------------------------------------


def degenerate_batch(seed=4, b=5, n=13, d=6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(b, n, d, generator=g, dtype=F64)
    w[1, 7] = w[1, 2]  # duplicate: the floor binds in the tiles holding it
    w[2, 4] = -w[2, 9]  # antipodal
    w[3, 0] = 0.0  # zero neuron: large bound q = 1
    w[4, 5] = 1e-5 * w[4, 6]  # near zero
    return w


@pytest.mark.parametrize("s,angular,half_space", VARIANTS, ids=VARIANT_IDS)
def test_tiled_kernel_matches_autograd_with_tiny_tiles(monkeypatch, s, angular, half_space):
    monkeypatch.setattr(E, "_TILE_ELEMENTS", 40)  # several set chunks and row blocks, ragged edges
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
        out = E._FusedPairEnergy.apply(x, q, 2.0, False, True, 1e-4, 4, False, need_grad)
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
        u, n2 = E._EpsNormalize.apply(x, 1e-2)
        return (u * torch.linspace(-1, 1, 3, dtype=F64)).sum(-1) + n2.sin()

    assert torch.autograd.gradcheck(fn, (v,))
    assert torch.autograd.gradgradcheck(fn, (v,))
    assert torch.autograd.gradcheck(lambda x: E._EpsNormalize.apply(x, 1e-2)[0], (v,))
    assert torch.autograd.gradcheck(lambda x: E._EpsNormalize.apply(x, 1e-2)[1], (v,))


@pytest.mark.parametrize("bsz,n", [(1, 2), (1, 4096), (60, 512), (80, 64), (3, 70_000), (2000, 16)])
def test_tile_plan_bounds_temporaries(bsz, n):
    rows, chunk, cols = E._tile_plan(bsz, n, None)
    assert 1 <= rows <= n and 1 <= chunk <= bsz and rows <= cols <= n
    assert chunk * rows * cols <= max(E._TILE_ELEMENTS, n)
    if n >= 64:  # several row blocks, so that little more than the upper triangle is computed
        assert -(-n // rows) >= 4 or rows == E._MAX_TILE_ROWS
    if n > E._TILE_ELEMENTS // E._MAX_TILE_ROWS:  # huge sets: full-height row blocks, split into column blocks
        assert rows == E._MAX_TILE_ROWS and cols < n
    tiles = list(E._tiles(n, rows, cols))
    covered = sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles)
    assert covered >= n * (n - 1) // 2 and all(c0 >= r0 for r0, _, c0, _ in tiles)
    rows, chunk, cols = E._tile_plan(bsz, n, 5)
    assert rows == min(5, n)


@pytest.mark.parametrize("s,angular,half_space", [(2.0, False, True), (0.0, True, False), (1.0, False, False)])
def test_column_blocks_match_autograd(monkeypatch, s, angular, half_space):
    """Huge sets are tiled in columns too; with a tiny budget every path of the 2-D tiling runs on small sets."""
    monkeypatch.setattr(E, "_TILE_ELEMENTS", 12)
    w = degenerate_batch(seed=9)
    kw = dict(power=s, angular=angular, half_space=half_space)
    ref, ref_grad = value_and_grad(partial(hyperspherical_energy, backend="autograd", **kw), w)
    for tile_size in (None, 2, 5):
        if tile_size is not None:
            assert E._tile_plan(5, 13, tile_size)[2] < 13  # column blocks are used
        val, grad = value_and_grad(partial(hyperspherical_energy, backend="fused", tile_size=tile_size, **kw), w)
        torch.testing.assert_close(val, ref, rtol=1e-12, atol=0)
        assert ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item() < 1e-10


def test_scratch_buffers_are_reused():
    scratch = E._Scratch(torch.zeros(1))
    a = scratch.get(0, (2, 3, 4))
    b = scratch.get(0, (1, 2, 3))
    assert a.is_contiguous() and b.is_contiguous() and a.data_ptr() == b.data_ptr()
    assert scratch.get(1, (2, 2)).data_ptr() != a.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# 3. The optional torch.compile path
# ---------------------------------------------------------------------------------------------------------------


def compile_works() -> bool:
    try:
        return torch.compile(lambda x: x + 1)(torch.ones(2)).sum().item() == 4
    except Exception:  # noqa: BLE001
        return False


needs_compile = pytest.mark.skipif(not compile_works(), reason="torch.compile is unavailable here")


def check_compiled_equals_eager(power, half_space, angular=False, dtype=F64):
    # float64: degenerate sets too; float32: a duplicate pair's gradient is cancellation noise (test_energy.py), and
    # the compiled Gram may round differently, so random sets only
    w = degenerate_batch(seed=8, b=5, n=37, d=5) if dtype == F64 else torch.randn(5, 37, 5)
    w = w.to(dtype)
    kw = dict(power=power, half_space=half_space, angular=angular, tile_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would not test the compiled path
        val, grad = value_and_grad(partial(hyperspherical_energy, backend="compiled", **kw), w)
    ref, ref_grad = value_and_grad(partial(hyperspherical_energy, backend="fused", **kw), w)
    rtol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(val, ref, rtol=rtol, atol=0)
    assert ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item() < rtol * 100
    with torch.no_grad():
        torch.testing.assert_close(hyperspherical_energy(w, backend="compiled", **kw), ref, rtol=rtol, atol=0)


@needs_compile
def test_compiled_path_equals_eager_official_default():
    assert _compiled.compile_failed() is None
    check_compiled_equals_eager(2, True)
    check_compiled_equals_eager(2, True, dtype=torch.float32)


@needs_compile
@pytest.mark.slow
@pytest.mark.parametrize("power,half_space,angular", [(0, False, True), (1, False, False), (3.7, True, True)])
def test_compiled_path_equals_eager_other_variants(power, half_space, angular):
    check_compiled_equals_eager(power, half_space, angular)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_compiled, "_FAILED", [])
    monkeypatch.setattr(_compiled, "_CACHE", {})

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    w = torch.randn(2, 6, 4, dtype=F64)
    with pytest.warns(RuntimeWarning, match="falling back to the eager kernel"):
        out = hyperspherical_energy(w, half_space=True, backend="compiled")
    torch.testing.assert_close(out, hyperspherical_energy(w, half_space=True), rtol=1e-14, atol=0)
    assert "no compiler here" in _compiled.compile_failed()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hyperspherical_energy(w, half_space=True, backend="compiled")  # no second warning


def test_compiled_call_failure_falls_back(monkeypatch):
    """A failure at the first call (where torch.compile really compiles) also falls back to the eager kernel."""
    monkeypatch.setattr(_compiled, "_FAILED", [])

    def failing(*args):
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(_compiled, "compiled_tile_fns", lambda *a: (failing, failing))
    w = torch.randn(2, 6, 4, dtype=F64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="inductor failed"):
        out = hyperspherical_energy(w, backend="compiled")
    ref = hyperspherical_energy(w.detach(), backend="fused")
    torch.testing.assert_close(out.detach(), ref, rtol=1e-14, atol=0)
    out.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_environment_variable_selects_the_compiled_path(monkeypatch):
    calls = []

    def spy(*key):
        calls.append(key)
        return None  # behave as if unavailable: the eager kernel runs

    monkeypatch.setattr(_compiled, "compiled_tile_fns", spy)
    w = torch.randn(5, 3, dtype=F64)
    monkeypatch.delenv("LIGHTNING_COMHE_COMPILE", raising=False)
    hyperspherical_energy(w)
    assert calls == []
    monkeypatch.setenv("LIGHTNING_COMHE_COMPILE", "1")
    hyperspherical_energy(w, power="a1")
    projected_energy(w, torch.randn(2, 2, 3, dtype=F64))
    assert calls[0] == (1.0, True, False, 1e-4) and len(calls) == 2
    hyperspherical_energy(w, backend="fused")
    assert len(calls) == 2


def test_compiled_is_an_accepted_backend():
    w = torch.randn(4, 3)
    assert math.isfinite(hyperspherical_energy(w, backend="compiled" if compile_works() else "fused").item())
    with pytest.raises(ValueError, match="`backend`"):
        hyperspherical_energy(w, backend="triton")


# ---------------------------------------------------------------------------------------------------------------
# 4. Structured random projections (RandomProjection(kind="sparse" | "srht"))
# ---------------------------------------------------------------------------------------------------------------

STRUCTURED = ("sparse", "srht")


@pytest.mark.parametrize("dp", [1, 2, 4, 16, 64, 1024])
def test_fwht_is_the_hadamard_transform(monkeypatch, dp):
    monkeypatch.setattr(sketch, "_FWHT_CHUNK", 4 * dp)  # several row chunks
    x = torch.randn(3, 5, dp, dtype=F64)
    h = sketch._hadamard(dp, F64, x.device)
    torch.testing.assert_close(sketch.fwht(x), x @ h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sketch.fwht(sketch.fwht(x)), dp * x, rtol=1e-12, atol=1e-10)
    assert torch.equal(h, h.T) and torch.equal(h @ h, dp * torch.eye(dp, dtype=F64))
    if dp <= 64:
        assert torch.autograd.gradcheck(sketch.fwht, (x[:1, :2].clone().requires_grad_(True),))
    with pytest.raises(ValueError, match="power of two"):
        sketch.fwht(torch.randn(2, 3))


def test_sparse_draw_is_exact_bernoulli_support():
    g = torch.Generator().manual_seed(0)
    draw = sketch.draw_sparse(3, 40, 500, 0.05, g, torch.device("cpu"))
    pos, sign = draw["pos"], draw["sign"]
    assert pos.dtype == torch.int64 and torch.all(pos[1:] > pos[:-1]) and 0 <= pos.min() and pos.max() < 3 * 40 * 500
    assert set(sign.unique().tolist()) == {-1, 1}
    n, expected = pos.numel(), 3 * 40 * 500 * 0.05
    assert abs(n - expected) < 5 * math.sqrt(expected)  # Binomial(60000, 0.05): sd 53
    dense = sketch.draw_sparse(1, 4, 5, 1.0, g, torch.device("cpu"))
    assert torch.equal(dense["pos"], torch.arange(20))


@pytest.mark.parametrize("kind", STRUCTURED)
def test_structured_projection_equals_its_dense_matrix(kind):
    rp = RandomProjection(dim=5, num=3, kind=kind, seed=1)
    rp.step()
    w = torch.randn(2, 7, 37, dtype=F64, requires_grad=True)
    p = rp.projections("k", 2, 37, "cpu", F64)  # (G, C, k, d) dense equivalent
    assert p.shape == (2, 3, 5, 37) and not p.requires_grad
    v = rp.project("k", w)
    assert v.shape == (2, 3, 7, 5)
    ref = torch.einsum("gnd,gckd->gcnk", w, p)
    torch.testing.assert_close(v, ref, rtol=1e-12, atol=1e-12)
    (g1,) = torch.autograd.grad(v.pow(3).sum(), w)
    (g2,) = torch.autograd.grad(ref.pow(3).sum(), w)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    f = partial(rp.project, "k")
    small = w[:, :3, :].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: f(x).pow(2).sum(-1), (small,))
    assert torch.autograd.gradgradcheck(lambda x: f(x).pow(2).sum(-1), (small,))
    # float32 and autocast: computed in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rp.project("k", w.detach().bfloat16())
    assert out.dtype == torch.float32


@pytest.mark.parametrize("kind", STRUCTURED)
def test_structured_projection_entries_have_gaussian_moments(kind):
    rp = RandomProjection(dim=40, num=20, kind=kind, seed=2)
    rp.step()
    d = 300
    p = rp.projections("m", 2, d, "cpu")
    assert abs(p.mean().item()) < 0.01 and abs(p.pow(2).mean().item() - 1) < 0.02  # E P = 0, E P² = 1
    nonzero = (p != 0).double().mean().item()
    if kind == "sparse":
        assert abs(nonzero - 1 / math.sqrt(d)) < 0.005
        assert torch.allclose(p[p != 0].abs(), torch.tensor(d**0.25))
    else:  # Rademacher rows; within one transform, distinct Hadamard rows
        assert torch.equal(p.abs(), torch.ones_like(p))
        pp = RandomProjection(dim=4, num=2, kind="srht", seed=3)
        pp.step()
        q = pp.projections("o", 1, 8, "cpu", F64).reshape(8, 8)  # C·k = d' = 8: the whole transform H D
        assert torch.equal(q @ q.T, 8 * torch.eye(8, dtype=F64))


@pytest.mark.parametrize("kind", STRUCTURED)
@pytest.mark.parametrize("k, eps", [(30, 0.9), (100, 0.5)])
def test_structured_projection_angle_guarantee(kind, k, eps):
    """The JL bound of the Gaussian test (tests/test_projections.py) holds empirically for the sketches too."""
    d, thetas = 576, [0.3, math.pi / 2, 2.5]
    gen = torch.Generator().manual_seed(k)
    cols = []
    for t in thetas:
        q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=F64))
        cols += [1.7 * q[:, 0], 0.4 * (math.cos(t) * q[:, 0] + math.sin(t) * q[:, 1])]
    pairs = torch.stack(cols).float()  # (6, d): three pairs as "neurons"
    rp = RandomProjection(dim=k, num=500, seed=123, kind=kind)
    cos = []
    for _ in range(4):  # 4 resamples x 500 projections = 2000 draws
        rp.step()
        y = rp.project("jl", pairs[None])[0]  # (500, 6, k)
        cos.append(torch.nn.functional.cosine_similarity(y[:, 0::2], y[:, 1::2], dim=-1))  # (500, 3)
    cos = torch.cat(cos)
    bound = max(0.0, 1 - 2 * math.exp(-k * eps**2 / 8)) ** 2
    for j, theta in enumerate(thetas):
        c = math.cos(theta)
        inside = ((c - eps) / (1 + eps) < cos[:, j]) & (cos[:, j] < (c + eps) / (1 - eps))
        freq = inside.double().mean().item()
        assert freq >= bound, f"{kind} theta={theta}: frequency {freq:.4f} < bound {bound:.4f}"
        mean_angle = torch.arccos(cos[:, j].clamp(-1, 1)).mean().item()
        assert abs(mean_angle - theta) < 0.02, (kind, theta, mean_angle)


@pytest.mark.parametrize("kind", STRUCTURED)
def test_structured_projection_stream_resample_and_state_round_trip(kind):
    def draws(rp, steps, key="a"):
        out = []
        for _ in range(steps):
            rp.step()
            out.append(rp.projections(key, 2, 50, "cpu").clone())
        return out

    reference = draws(RandomProjection(dim=3, num=4, resample_every=2, seed=5, kind=kind), 7)
    assert torch.equal(reference[0], reference[1]) and not torch.equal(reference[1], reference[2])
    rp = RandomProjection(dim=3, num=4, resample_every=2, seed=5, kind=kind)
    head = draws(rp, 3)
    state = pickle.loads(pickle.dumps(rp.state_dict()))
    assert state["config"]["kind"] == kind
    draws(rp, 2)
    fresh = RandomProjection(dim=3, num=4, resample_every=2, seed=5, kind=kind)
    fresh.load_state_dict(state)
    for got, want in zip(head + draws(fresh, 4), reference, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="kind"):
        RandomProjection(dim=3, num=4, seed=5).load_state_dict(state)
    other = "srht" if kind == "sparse" else "sparse"
    with pytest.raises(ValueError, match="kind"):
        RandomProjection(dim=3, num=4, seed=5, kind=other).load_state_dict(state)
    # a gaussian snapshot from before structured kinds (no "kind" in its config) still loads into a gaussian one
    g = RandomProjection(dim=3, num=4, seed=5)
    g.step()
    g.projections("a", 1, 6, "cpu")
    old = g.state_dict()
    del old["config"]["kind"], old["config"]["density"]
    RandomProjection(dim=3, num=4, seed=5).load_state_dict(old)


def test_structured_projection_does_not_touch_global_rng_and_keys_are_independent():
    state = torch.get_rng_state()
    for kind in STRUCTURED:
        a, b = RandomProjection(dim=4, num=3, seed=7, kind=kind), RandomProjection(dim=4, num=3, seed=7, kind=kind)
        a.step()
        b.step()
        ax, ay = a.projections("x", 2, 9, "cpu"), a.projections("y", 2, 9, "cpu")
        by, bx = b.projections("y", 2, 9, "cpu"), b.projections("x", 2, 9, "cpu")
        assert torch.equal(ax, bx) and torch.equal(ay, by) and not torch.equal(ax, ay)
    assert torch.equal(state, torch.get_rng_state())


def test_random_projection_kind_arguments():
    with pytest.raises(ValueError, match="`kind`"):
        RandomProjection(kind="hadamard")
    with pytest.raises(ValueError, match="`density`"):
        RandomProjection(kind="srht", density=0.1)
    for bad in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="`density`"):
            RandomProjection(kind="sparse", density=bad)
    rp = RandomProjection(kind="sparse", density=1 / 3)  # Achlioptas' projection
    rp.step()
    p = rp.projections("a", 1, 600, "cpu")
    assert abs((p != 0).double().mean().item() - 1 / 3) < 0.01
    assert "kind='sparse'" in repr(rp) and "density" in repr(rp) and "kind" not in repr(RandomProjection())
    with pytest.raises(ValueError, match="neurons"):
        rp.project("a", torch.randn(5, 3))


@pytest.mark.parametrize("kind", STRUCTURED)
def test_regularizer_with_structured_projection(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.Conv2d(16, 24, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10)
    )
    model(torch.randn(1, 3, 8, 8))
    reg = CoMHERegularizer(model, "random", projection_kind=kind, num_projections=4, projection_dim=8)
    assert reg.projection_kind == kind and reg._projector.kind == kind
    reg.refresh()
    out = reg()
    out.penalty.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.penalty) and grads and all(torch.isfinite(g).all() for g in grads)
    # the penalty equals the mean over the C projections of the half-space energy of the projected neurons
    w = model[1].weight.reshape(24, -1)
    p = reg._projector.projections("hidden:projected:24x144", 1, 144, "cpu")[0]
    ref = projected_energy(w.detach(), p, half_space=True)
    torch.testing.assert_close(out.energies["1"], ref, rtol=1e-5, atol=0)
    state = reg.state_dict()
    again = CoMHERegularizer(model, "random", projection_kind=kind, num_projections=4, projection_dim=8)
    again.load_state_dict(state)
    torch.testing.assert_close(again().penalty, reg().penalty, rtol=0, atol=0)
    with pytest.raises(ValueError, match="projection_kind"):
        CoMHERegularizer(model, "random", projection_kind="dense")
    with pytest.raises(ValueError, match="projection_kind"):
        CoMHERegularizer(model, "half_mhe", projection_kind=kind)
