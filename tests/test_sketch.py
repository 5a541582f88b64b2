"""Tests of `lightning_comhe.functional.sketch`: the structured random projections (sparse JL and SRHT).

The transforms themselves, and `RandomProjection(kind="sparse" | "srht")` and the regularizer built on them.
"""

import math
import pickle
from functools import partial

import pytest
import torch

from lightning_comhe.functional import sketch
from lightning_comhe.functional.energy import projected_energy
from lightning_comhe.projections import RandomProjection
from lightning_comhe.regularizer import CoMHERegularizer

F64 = torch.float64
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
    with pytest.raises(ValueError, match=r"^`x` must have a last dimension that is a power of two, got 6\.$"):
        sketch.fwht(torch.randn(2, 6))


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
    assert reg.projection_kind == kind and reg.family.projector.kind == kind
    reg.refresh()
    out = reg()
    out.penalty.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.penalty) and grads and all(torch.isfinite(g).all() for g in grads)
    # the penalty equals the mean over the C projections of the half-space energy of the projected neurons
    w = model[1].weight.reshape(24, -1)
    p = reg.family.projector.projections("hidden:projected:24x144", 1, 144, "cpu")[0]
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
