"""CoMHERegularizer: penalties equal hand-built sums of the functional energies, batching is exact, state resumes."""

import copy

import pytest
import torch
from torch import nn

from lightning_comhe import hyperspherical_energy, projected_energy
from lightning_comhe.projections import RandomProjection
from lightning_comhe.regularizer import VARIANTS, CoMHERegularizer, variant_defaults


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # conv1: d = 27 (unprojected for CoMHE), conv2/conv3 share the shape (16, 144) -> one batched group.
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    ).double()


def _rows(module: nn.Module) -> torch.Tensor:
    return module.weight.reshape(module.weight.shape[0], -1)


def test_variant_defaults_are_official() -> None:
    assert variant_defaults("random") == {"projection_dim": 40, "num_projections": 20, "inner_steps": None}
    assert variant_defaults("angle") == {"projection_dim": 30, "num_projections": 1, "inner_steps": 1}
    assert variant_defaults("adversarial") == {"projection_dim": 30, "num_projections": 1, "inner_steps": 10}
    with pytest.raises(ValueError, match="variant"):
        variant_defaults("bogus")


@pytest.mark.parametrize("variant", ["mhe", "half_mhe"])
def test_full_space_penalty_matches_hand_sum(variant: str) -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, variant)
    reg.refresh(0.1)
    out = reg()
    half = variant == "half_mhe"
    hidden = [model[0], model[2], model[4], model[7]]
    expected = sum(hyperspherical_energy(_rows(m), half_space=half) for m in hidden)
    expected = expected + 10.0 * hyperspherical_energy(_rows(model[9]))
    torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)
    assert set(out.energies) == {"0", "2", "4", "7", "9"}
    torch.testing.assert_close(out.energies["9"], hyperspherical_energy(_rows(model[9])).detach())
    # gradients reach exactly the regularized weights
    out.penalty.backward()
    for m in hidden + [model[9]]:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
        assert m.bias.grad is None


def test_random_penalty_matches_functional_with_same_stream() -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, "random", seed=7)
    twin = RandomProjection(dim=40, num=20, seed=7)
    for _ in range(3):  # three optimizer steps: fresh draws every step
        reg.refresh(0.1)
        twin.step()
        out = reg()
        # conv1 (d=27 <= 40) and fc1 (d=16) are unprojected half-space; conv2/conv3 (d=144) are projected together
        stacked = torch.stack([_rows(model[2]), _rows(model[4])])
        proj = twin.projections("hidden:projected:16x144", 2, 144, stacked.device, dtype=torch.float64)
        expected = projected_energy(stacked, proj).sum()
        expected = expected + hyperspherical_energy(_rows(model[7]), half_space=True)
        expected = expected + hyperspherical_energy(_rows(model[0]), half_space=True)
        expected = expected + 10 * hyperspherical_energy(_rows(model[9]))
        torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)


def test_batched_groups_equal_per_layer_loop_values_and_grads() -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, "random", seed=3)
    reg.refresh()
    out = reg()
    grads = torch.autograd.grad(out.penalty, [model[2].weight, model[4].weight])
    # per-layer loop with the same projections (slices of the group's draw)
    proj = reg.family.projector.projections("hidden:projected:16x144", 2, 144, "cpu", torch.float64)
    loop = projected_energy(_rows(model[2]), proj[0]) + projected_energy(_rows(model[4]), proj[1])
    ref = torch.autograd.grad(loop, [model[2].weight, model[4].weight])
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)


def test_d_le_k_runs_in_full_space_and_summary_says_so() -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, "random", projection_dim=200)  # every d <= 200: nothing is projected
    reg.refresh()
    out = reg()
    hidden = [model[0], model[2], model[4], model[7]]
    expected = sum(hyperspherical_energy(_rows(m), half_space=True) for m in hidden)
    expected = expected + 10 * hyperspherical_energy(_rows(model[9]))
    torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)
    assert "unprojected" in reg.summary() and "k=200" in reg.summary()


def test_angular_powers_use_official_kappa() -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, "mhe", power="a2")
    assert (reg.weight, reg.head_weight) == (0.1, 1.0)
    out = reg()
    expected = 0.1 * sum(hyperspherical_energy(_rows(m), "a2") for m in [model[0], model[2], model[4], model[7]])
    expected = expected + 1.0 * hyperspherical_energy(_rows(model[9]), "a2")
    torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)
    reg0 = CoMHERegularizer(model, "mhe", power="a0", weight=2.0, head_weight=0.0)
    assert (reg0.weight, reg0.head_weight) == (2.0, 0.0)


@pytest.mark.parametrize("variant", ["angle", "adversarial"])
def test_learned_projection_penalty_uses_fitted_projection(variant: str) -> None:
    model = _cnn()
    reg = CoMHERegularizer(model, variant, seed=1)
    before = None
    for lr in (0.5, 0.5):
        reg.refresh(lr)
        p = reg.family.projector.get_projection("hidden:projected:16x144")
        if before is not None:
            assert not torch.equal(p, before)  # the side optimizer moved P
        before = p
    out = reg()
    stacked = torch.stack([_rows(model[2]), _rows(model[4])])
    expected_group = projected_energy(stacked, before[:, None]).sum()
    expected = expected_group + hyperspherical_energy(_rows(model[7]), half_space=True)
    expected = expected + hyperspherical_energy(_rows(model[0]), half_space=True)
    expected = expected + 10 * hyperspherical_energy(_rows(model[9]))
    torch.testing.assert_close(out.penalty, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", ["random", "angle", "adversarial"])
def test_state_dict_resumes_bit_exactly(variant: str) -> None:
    model = _cnn()
    straight = CoMHERegularizer(model, variant, seed=5)
    for _ in range(4):
        straight.refresh(0.05)
    resumed = CoMHERegularizer(copy.deepcopy(model), variant, seed=5)
    first = CoMHERegularizer(model, variant, seed=5)
    for _ in range(2):
        first.refresh(0.05)
    state = copy.deepcopy(first.state_dict())
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.refresh(0.05)
    assert resumed.num_refreshes == straight.num_refreshes == 4
    assert torch.equal(resumed().penalty, straight().penalty)


def test_state_from_another_variant_is_refused() -> None:
    model = _cnn()
    state = CoMHERegularizer(model, "random").state_dict()
    with pytest.raises(ValueError, match="variant 'random' into variant 'angle'"):
        CoMHERegularizer(model, "angle").load_state_dict(state)


def test_state_of_another_selection_loads_and_changed_groups_start_fresh() -> None:
    """A checkpoint from a selection without layer 4 (e.g. a version that did not cover it) still loads."""
    model = _cnn()
    kw = {"projection_dim": 4, "inner_steps": 2, "seed": 3}
    old = CoMHERegularizer(model, "angle", exclude="^4$", **kw)
    old.refresh(0.1)
    state = old.state_dict()
    new = CoMHERegularizer(model, "angle", **kw)
    with pytest.warns(UserWarning, match=r"another layer selection .*new: \['4'\], no longer selected: none"):
        new.load_state_dict(state)
    fresh = CoMHERegularizer(model, "angle", **kw)
    by_key = {g.key: g for g in new.groups}
    grown = [k for k, g in by_key.items() if "4" in {m.layer for m in g.members}]
    assert len(grown) == 1
    for key, group in by_key.items():
        if group.mode != "projected":
            continue
        got = new.family.projector.get_projection(key)
        if key in grown:
            assert got is None  # G changed from 1 to 2: it starts afresh, like a new run's
        else:
            torch.testing.assert_close(got, old.family.projector.get_projection(key), rtol=0, atol=0)
    assert new.num_refreshes == 1
    new.refresh(0.1)
    fresh.refresh(0.1)
    for key in grown:  # the fresh group was fitted from its own (deterministic) initial P
        assert new.family.projector.get_projection(key).shape == fresh.family.projector.get_projection(key).shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "bogus"}, "variant"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"num_projections": 0}, "num_projections"),
        ({"weight": -1.0}, "weight"),
        ({"head_weight": float("nan")}, "head_weight"),
        ({"resample_every": 0}, "resample_every"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"power": -2}, "power"),
        ({"lookahead": "third"}, "lookahead"),
        ({"eps": 0.0}, "eps"),
        ({"variant": "angle", "num_projections": 4}, "num_projections"),
        ({"include": "does-not-exist"}, "include"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CoMHERegularizer(_cnn(), **kwargs)


def test_model_without_weights_is_a_clear_error() -> None:
    with pytest.raises(ValueError):
        CoMHERegularizer(nn.Sequential(nn.ReLU(), nn.Identity()), "mhe")
    with pytest.raises(TypeError, match="model"):
        CoMHERegularizer("not a model", "mhe")  # type: ignore[arg-type]


def test_all_variants_on_a_timm_model_reach_only_selected_layers() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", num_classes=5)
    for variant in VARIANTS:
        model.zero_grad(set_to_none=True)
        reg = CoMHERegularizer(model, variant, seed=0)
        reg.refresh(0.1)
        out = reg()
        assert torch.isfinite(out.penalty) and out.penalty > 0
        out.penalty.backward()
        selected = {layer.module for layer in reg.selection.layers}
        assert reg.selection.layers[-1].role == "head" and reg.selection.layers[-1].module is model.fc
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or not w.requires_grad:
                continue
            if mod in selected:
                assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0, name
            else:
                assert w.grad is None, name
