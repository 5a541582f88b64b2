"""Tests of lightning_comhe.projections.learned: the angle-preserving and adversarial projections."""

import io
import re

import pytest
import torch

from lightning_comhe.functional.angles import angle_objective
from lightning_comhe.functional.energy import projected_energy
from lightning_comhe.projections import AdversarialProjection, AngleProjection, LearnedProjection, key_seed
from lightning_comhe.projections._inner import optimizer_steps
from tests.helpers_projections import random_sets


def test_angle_projection_fit_lowers_the_objective():
    w = random_sets()
    ap = AngleProjection(dim=30, steps=10, lr=5.0, seed=0)
    before = ap.fit("k", w)
    after = ap.objective("k", w)
    assert before.shape == after.shape == (2,)
    initial = angle_objective(w, _initial_p(w))
    torch.testing.assert_close(before, initial)  # fit() reports the objective before the steps (initial Gaussian P)
    assert bool((after < 0.8 * before).all()), (before, after)


def _initial_p(w, seed=0, key="k", dim=30):
    gen = torch.Generator().manual_seed(key_seed(seed, key))
    return torch.randn(w.shape[0], dim, w.shape[2], generator=gen)


def test_adversarial_projection_fit_raises_the_energy():
    w = random_sets(1)
    adv = AdversarialProjection(dim=30, steps=10, lr=10.0, seed=0)
    before = adv.fit("k", w)
    after = adv.objective("k", w)
    torch.testing.assert_close(before, projected_energy(w, _initial_p(w)[:, None], half_space=False))
    assert bool((after > before + 1e-3).all()), (before, after)


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_one_sgd_step_and_decay_sign(cls):
    """One step is P - lr (grad L + wd P) for the angle objective, P + lr (grad E - wd P) for the adversarial one."""
    w = random_sets(2, g=1, n=10, d=20, dtype=torch.float64)
    proj = cls(dim=6, steps=1, lr=0.3, weight_decay=0.5, seed=3)
    p0 = torch.randn(1, 6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    proj.set_projection("k", p0)
    leaf = p0.clone().requires_grad_(True)
    obj = angle_objective(w, leaf) if cls is AngleProjection else projected_energy(w, leaf[:, None], half_space=False)
    (grad,) = torch.autograd.grad(obj.sum(), leaf)
    lr = 0.7  # per-call override
    expected = p0 - lr * (grad + 0.5 * p0) if cls is AngleProjection else p0 + lr * (grad - 0.5 * p0)
    proj.fit("k", w, lr=lr)
    torch.testing.assert_close(proj.get_projection("k"), expected, rtol=1e-12, atol=1e-12)
    # the override holds for that call only
    p1 = proj.get_projection("k")
    leaf = p1.clone().requires_grad_(True)
    obj = angle_objective(w, leaf) if cls is AngleProjection else projected_energy(w, leaf[:, None], half_space=False)
    (grad,) = torch.autograd.grad(obj.sum(), leaf)
    expected = p1 - 0.3 * (grad + 0.5 * p1) if cls is AngleProjection else p1 + 0.3 * (grad - 0.5 * p1)
    proj.fit("k", w)
    torch.testing.assert_close(proj.get_projection("k"), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_learned_projection_keys_are_order_independent_and_global_rng_untouched(cls):
    w_a, w_b = random_sets(0, g=1, n=5, d=8), random_sets(1, g=2, n=6, d=9)
    state = torch.get_rng_state()
    one, two = cls(dim=4, seed=11), cls(dim=4, seed=11)
    one.objective("a", w_a)
    one.objective("b", w_b)
    two.objective("b", w_b)
    two.objective("a", w_a)
    assert torch.equal(one.get_projection("a"), two.get_projection("a"))
    assert torch.equal(one.get_projection("b"), two.get_projection("b"))
    assert torch.equal(one.get_projection("a"), _initial_p(w_a, seed=11, key="a", dim=4))
    assert torch.equal(state, torch.get_rng_state())
    assert one.keys() == ["a", "b"] and one.get_projection("c") is None


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_learned_projection_state_round_trip_is_bit_exact(cls):
    w = [random_sets(s, g=2, n=12, d=16) for s in range(6)]
    lrs = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    ref_obj = cls(dim=5, steps=2, lr=0.5, seed=4)
    ref_out = [ref_obj.fit("k", wi, lr=lr) for wi, lr in zip(w, lrs, strict=True)]
    proj = cls(dim=5, steps=2, lr=0.5, seed=4)
    out = [proj.fit("k", wi, lr=lr) for wi, lr in zip(w[:3], lrs[:3], strict=True)]
    buf = io.BytesIO()
    torch.save(proj.state_dict(), buf)
    proj.fit("k", w[0])  # advancing the original after the snapshot must not affect it
    buf.seek(0)
    fresh = cls(dim=5, steps=2, lr=0.5, seed=4)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    assert fresh.keys() == ["k"]
    out += [fresh.fit("k", wi, lr=lr) for wi, lr in zip(w[3:], lrs[3:], strict=True)]
    for got, want in zip(out, ref_out, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(fresh.get_projection("k"), ref_obj.get_projection("k"))
    # the side optimizer's state travels too
    sd = fresh.state_dict()["entries"]["k"]["optimizer"]
    assert sd["param_groups"][0]["weight_decay"] == 5e-7 and sd["param_groups"][0]["lr"] == 0.5
    assert sd["param_groups"][0]["maximize"] is (cls is AdversarialProjection)


def test_learned_projection_state_config_checks():
    ap = AngleProjection(dim=5, seed=0)
    ap.objective("k", random_sets(g=1, n=4, d=6))
    state = ap.state_dict()
    with pytest.raises(ValueError, match="dim"):
        AngleProjection(dim=6).load_state_dict(state)
    with pytest.raises(ValueError, match="AdversarialProjection"):
        AdversarialProjection(dim=5).load_state_dict(state)
    other = AngleProjection(dim=5, lr=0.01)
    with pytest.warns(UserWarning, match="lr"):
        other.load_state_dict(state)
    other.objective("k", random_sets(g=1, n=4, d=6))
    assert other._optims["k"].param_groups[0]["lr"] == 0.01  # the current configuration wins


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_first_order_lookahead_gives_no_gradient_through_p(cls):
    w0 = random_sets(3, g=1, n=12, d=20, dtype=torch.float64)
    grads, values = {}, {}
    for order in ("first", "second"):
        proj = cls(dim=8, lookahead=order, seed=2)
        w = w0.clone().requires_grad_(True)
        p_tilde = proj.projections("k", w, lr=5.0)
        assert p_tilde.shape == (1, 1, 8, 20)
        energy = projected_energy(w, p_tilde, half_space=True).sum()
        (g_full,) = torch.autograd.grad(energy, w)
        (g_const,) = torch.autograd.grad(projected_energy(w, p_tilde.detach(), half_space=True).sum(), w)
        grads[order], values[order] = (g_full, g_const), p_tilde.detach()
        # the look-ahead moved P, and never writes to it
        assert not torch.allclose(p_tilde[:, 0].detach(), proj.get_projection("k"))
    torch.testing.assert_close(values["first"], values["second"], rtol=1e-12, atol=1e-12)
    g_full, g_const = grads["first"]
    torch.testing.assert_close(g_full, g_const, rtol=0, atol=0)
    g_full, g_const = grads["second"]
    assert (g_full - g_const).abs().max() > 1e-3 * g_const.abs().max()


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_lookahead_direction_and_default_lr(cls):
    w = random_sets(4, g=1, n=10, d=16, dtype=torch.float64)
    proj = cls(dim=6, lr=0.25, lookahead="first", seed=1)
    assert proj.get_projection("k") is None
    p_tilde = proj.projections("k", w)[:, 0]  # default lr: the side optimizer's
    p = proj.get_projection("k").requires_grad_(True)
    if cls is AngleProjection:
        (grad,) = torch.autograd.grad(angle_objective(w, p).sum(), p)
        expected = p - 0.25 * grad
    else:
        (grad,) = torch.autograd.grad(projected_energy(w, p[:, None], half_space=False).sum(), p)
        expected = p + 0.25 * grad
    torch.testing.assert_close(p_tilde, expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_no_lookahead_returns_a_detached_copy(cls):
    w = random_sets(5, g=2, n=8, d=10).requires_grad_(True)
    proj = cls(dim=4, steps=1, lr=0.5, lookahead="none")
    p = proj.projections("k", w)
    assert p.shape == (2, 1, 4, 10) and not p.requires_grad
    assert torch.equal(p[:, 0], proj.get_projection("k"))
    energy = projected_energy(w, p, half_space=True).sum()
    proj.fit("k", w)  # updating P between forward and backward is safe (the energy holds a copy)
    energy.backward()
    assert w.grad is not None and not torch.equal(p[:, 0], proj.get_projection("k"))


def _message(name, bound, value):
    """The shared message style: `` `name` must be <kind> <bound>..., got <value>. ``"""
    return rf"^`{re.escape(name)}` must be .*{re.escape(bound)}.*, got {re.escape(repr(value))}\.$"


@pytest.mark.parametrize(
    "kwargs, bound",
    [
        ({"dim": 0}, "an int >= 1"),
        ({"dim": 3.0}, "an int >= 1"),
        ({"steps": -1}, "an int >= 0"),
        ({"steps": True}, "an int >= 0"),
        ({"lr": -0.1}, "a finite float > 0"),
        ({"lr": 0.0}, "a finite float > 0"),  # a side optimizer with lr 0 never moves P: refused (use steps=0)
        ({"lr": 0}, "a finite float > 0"),
        ({"lr": float("nan")}, "a finite float > 0"),
        ({"lr": "0.1"}, "a finite float > 0"),
        ({"lr": None}, "a finite float > 0"),
        ({"weight_decay": -1e-3}, "a finite float >= 0"),
        ({"weight_decay": float("inf")}, "a finite float >= 0"),
        ({"lookahead": "third"}, "one of 'none', 'first', 'second'"),
        ({"lookahead": True}, "one of 'none', 'first', 'second'"),
        ({"seed": 0.5}, "an int >= 0"),
        ({"seed": -3}, "an int >= 0"),
    ],
)
@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_learned_projection_bad_arguments(cls, kwargs, bound):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=_message(name, bound, value)):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_learned_projection_bad_call_arguments(cls):
    proj = cls(dim=4)
    w = random_sets(g=1, n=6, d=8)
    with pytest.raises(ValueError, match=r"^`neurons` must have shape \(G, N, d\).*, got shape \(6, 8\)\.$"):
        proj.fit("k", w[0])
    with pytest.raises(ValueError, match=_message("lr", "a finite float >= 0", -1.0)):
        proj.fit("k", w, lr=-1.0)
    with pytest.raises(ValueError, match=_message("lr", "a finite float >= 0", float("inf"))):
        proj.projections("k", w, lr=float("inf"))
    with pytest.raises(ValueError, match=_message("lr", "a finite float >= 0", True)):
        proj.fit("k", w, lr=True)
    proj.fit("k", w)
    with pytest.raises(ValueError, match=r"^`neurons` must have shape .*'k'.*\(1, 4, 8\).*, got shape \(1, 6, 9\)\.$"):
        proj.fit("k", random_sets(g=1, n=6, d=9))  # same key, other neuron dimension
    with pytest.raises(
        ValueError, match=r"^`projection` must have shape \(G, dim, d\) with dim = 4, got \(1, 5, 8\)\.$"
    ):
        proj.set_projection("k", torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match=r"^`projection` must be a floating-point torch\.Tensor, got list\.$"):
        proj.set_projection("k", [[1.0]])
    with pytest.raises(ValueError, match=r"^`key` must be a str, got None of type NoneType\.$"):
        proj.objective(None, w)


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_zero_call_lr_is_a_no_op_step_and_no_lookahead(cls):
    """The main optimizer's lr may be 0 (e.g. the first step of a warmup): fitting then keeps P, no look-ahead."""
    w = random_sets(6, g=1, n=6, d=8, dtype=torch.float64)
    proj = cls(dim=4, steps=2, lr=0.5, weight_decay=0.1, lookahead="second", seed=1)
    proj.objective("k", w)
    p0 = proj.get_projection("k")
    before = proj.fit("k", w, lr=0.0)
    assert torch.equal(proj.get_projection("k"), p0) and torch.equal(before, proj.objective("k", w))
    assert torch.equal(proj.projections("k", w, lr=0.0)[:, 0], p0)
    assert proj._optims["k"].param_groups[0]["lr"] == 0.5  # the configured lr is restored after the call


def test_learned_base_class_is_shared_and_validates():
    assert issubclass(AngleProjection, LearnedProjection) and issubclass(AdversarialProjection, LearnedProjection)
    assert not AngleProjection._maximize and AdversarialProjection._maximize
    assert AngleProjection().steps == 1 and AdversarialProjection().steps == 10
    assert repr(AngleProjection(dim=3, lr=0.25)) == (
        "AngleProjection(dim=3, steps=1, lr=0.25, weight_decay=5e-07, lookahead='none', seed=0)"
    )
    with pytest.raises(ValueError, match=_message("lr", "a finite float > 0", -2.0)):
        LearnedProjection(dim=2, steps=1, lr=-2.0, weight_decay=0.0, lookahead="none", seed=0)
    proj = AngleProjection(dim=2, lr=3)
    assert proj.lr == 3.0 and isinstance(proj.lr, float)


def test_learned_state_rejects_other_dims_and_types_with_the_shared_style():
    state = AngleProjection(dim=5).state_dict()
    with pytest.raises(
        ValueError, match=r"^`state_dict` must be saved with dim=6 \(this AngleProjection's\), got dim=5\.$"
    ):
        AngleProjection(dim=6).load_state_dict(state)
    with pytest.raises(
        ValueError,
        match=r"^`state_dict` must be saved by 'AdversarialProjection', got one saved by 'AngleProjection'\.$",
    ):
        AdversarialProjection(dim=5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^`state_dict` must be a AngleProjection state dict .*, got list\.$"):
        AngleProjection(dim=5).load_state_dict([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_learned_projection_fits_on_device_and_resumes():
    w = random_sets(g=1, n=6, d=8).cuda().requires_grad_(True)
    ap = AngleProjection(dim=4, lookahead="second")
    ap.fit("k", w)
    energy = projected_energy(w, ap.projections("k", w), half_space=True).sum()
    energy.backward()
    assert w.grad is not None and ap.get_projection("k").is_cuda
    fresh = AngleProjection(dim=4, lookahead="second")
    fresh.load_state_dict({**ap.state_dict()})
    torch.testing.assert_close(fresh.objective("k", w), ap.objective("k", w), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
@pytest.mark.parametrize("shape", [(2, 12, 20), (1, 200, 40)])  # the adversarial energy: autograd / tiled backend
def test_closed_form_value_and_grad_equal_autograd_on_the_objective(cls, shape):
    w = random_sets(7, *shape, dtype=torch.float64)
    proj = cls(dim=6, seed=0)
    p = torch.randn(shape[0], 6, shape[2], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    value, grad = proj._value_and_grad(w, proj._fit_context(w), p)
    ref_value, ref_grad = LearnedProjection._value_and_grad(proj, w, None, p)  # autograd through _objective
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12 * ref_grad.abs().max().item())


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_in_place_fit_equals_the_side_optimizer_and_keeps_its_state_format(cls, dtype, rtol):
    """fit() updates P in place (no optimizer.step()): the same P as torch.optim.SGD, and the same state_dict."""
    ws = [random_sets(s, g=2, n=16, d=24, dtype=dtype) for s in range(3)]
    fast, ref = (cls(dim=5, steps=3, lr=0.5, weight_decay=0.1, seed=2) for _ in range(2))
    for i, w in enumerate(ws):
        # small ascent steps: large ones on the adversarial energy amplify rounding differences from step to step
        lr = (0.5 if cls is AngleProjection else 0.02) / (i + 1)
        before = fast.fit("k", w, lr=lr)
        p, opt = ref._entry("k", w)
        ref_before = optimizer_steps(p, w.detach(), ref._objective, opt, ref.steps, lr)
        torch.testing.assert_close(before, ref_before, rtol=rtol, atol=0)
        torch.testing.assert_close(fast.get_projection("k"), ref.get_projection("k"), rtol=rtol, atol=rtol)
    got, want = fast.state_dict()["entries"]["k"]["optimizer"], ref.state_dict()["entries"]["k"]["optimizer"]
    assert got == want and got["state"] == {}  # momentum-free SGD keeps no state either way


def test_a_restored_momentum_optimizer_still_steps_through_the_optimizer():
    w = random_sets(8, g=1, n=6, d=10, dtype=torch.float64)
    proj = AngleProjection(dim=3, steps=2, lr=0.2, seed=0)
    p, _ = proj._entry("k", w)
    proj._optims["k"] = torch.optim.SGD([p], lr=0.2, momentum=0.9)  # not the plain side optimizer
    proj.fit("k", w)
    assert "momentum_buffer" in proj._optims["k"].state[p]


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_fitting_some_sets_equals_the_whole_fit_on_them(cls) -> None:
    """A rank's share: ``fit(..., sets=...)`` updates those sets exactly as a whole fit does, and nothing else."""
    torch.manual_seed(0)
    w = torch.randn(4, 6, 10, dtype=torch.float64)
    whole, part = cls(dim=3, steps=2, seed=1), cls(dim=3, steps=2, seed=1)
    before_whole = whole.fit("k", w, lr=0.05)
    part.objective("k", w)  # creates P at its initialization
    init = part.get_projection("k")
    before_part = part.fit("k", w, lr=0.05, sets=[3, 1])
    torch.testing.assert_close(before_part, before_whole[[3, 1]], rtol=1e-12, atol=1e-12)
    got, ref = part.get_projection("k"), whole.get_projection("k")
    torch.testing.assert_close(got[[1, 3]], ref[[1, 3]], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[[0, 2]], init[[0, 2]])
    p = part.projections("k", w, lr=0.05, sets=[1])
    torch.testing.assert_close(p, part.projections("k", w, lr=0.05)[[1]], rtol=1e-12, atol=1e-12)
    # a run of consecutive sets (read as a view): the same as the whole fit on them, and P's copy is the caller's
    run = cls(dim=3, steps=2, seed=1)
    run.objective("k", w)
    torch.testing.assert_close(run.fit("k", w, lr=0.05, sets=[1, 2]), before_whole[1:3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run.get_projection("k")[1:3], ref[1:3], rtol=1e-12, atol=1e-12)
    q = run.projections("k", w, lr=0.05, sets=[1, 2])
    q.zero_()
    assert run.get_projection("k")[1:3].abs().sum() > 0
    for bad in ([1, 1], [4], [], [True]):
        with pytest.raises(ValueError, match=r"^`sets` must be None or distinct set indices in \[0, 4\), got"):
            part.fit("k", w, sets=bad)
