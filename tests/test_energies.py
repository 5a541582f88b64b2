"""Energy families: the registry, routing, and a user-defined family end to end in a real Trainer."""

import pytest
import torch
from torch import Tensor

from lightning_comhe import CoMHE, CoMHERegularizer
from lightning_comhe.config import VARIANTS, EnergyConfig
from lightning_comhe.energies import (
    EnergyFamily,
    FullSpaceMHE,
    Group,
    HalfSpaceMHE,
    LearnedProjectionEnergy,
    RandomProjectionEnergy,
    SoftOrthogonality,
    SpectralRestrictedIsometry,
    build_energy,
    register_energy,
)
from lightning_comhe.functional import hyperspherical_energy
from tests.helpers import TinyMLP, cpu_trainer, make_loader

_EXPECTED = {
    "mhe": FullSpaceMHE,
    "half_mhe": HalfSpaceMHE,
    "random": RandomProjectionEnergy,
    "angle": LearnedProjectionEnergy,
    "adversarial": LearnedProjectionEnergy,
    "orthogonal": SoftOrthogonality,
    "orthonormal": SoftOrthogonality,
    "srip": SpectralRestrictedIsometry,
}


def test_every_builtin_variant_has_its_family() -> None:
    assert set(VARIANTS) == set(_EXPECTED)
    for variant, cls in _EXPECTED.items():
        assert type(build_energy(EnergyConfig(variant=variant))) is cls


@pytest.mark.parametrize(
    ("variant", "hidden_mode"),
    [("mhe", "plain"), ("half_mhe", "half"), ("random", "projected"), ("angle", "projected"), ("srip", "srip")],
)
def test_routes(variant: str, hidden_mode: str) -> None:
    family = build_energy(EnergyConfig(variant=variant, projection_dim=4))
    assert family.route("hidden", 8, 6).mode == hidden_mode
    if variant in ("random", "angle"):
        assert family.route("hidden", 8, 4).mode == "half"  # d <= k: unprojected half-space MHE
    head = family.route("head", 3, 8)
    assert head.mode == ("srip" if variant == "srip" else "plain")
    assert head.kappa == family.config.head_kappa


class _CubicCosine(EnergyFamily):
    """Mean |cos|^3 of hidden sets (a toy family), with a refresh counter as its state."""

    def __init__(self, config: EnergyConfig) -> None:
        super().__init__(config)
        self.refreshes = 0

    def hidden_mode(self, n: int, d: int) -> str:
        return "cubic"

    def refresh(self, groups, neurons_of) -> None:  # noqa: ANN001 - protocol signature
        self.refreshes += 1

    def energy(self, group: Group, neurons: Tensor) -> Tensor:
        if group.mode != "cubic":
            return super().energy(group, neurons)
        u = torch.nn.functional.normalize(neurons, dim=-1)
        return (u @ u.transpose(1, 2)).abs().pow(3).mean((1, 2))

    def state_dict(self) -> dict:
        return {"cubic_refreshes": self.refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.refreshes = state.get("cubic_refreshes", 0)


register_energy("test_cubic")(_CubicCosine)


def test_user_family_end_to_end_in_a_trainer() -> None:
    model = TinyMLP()
    callback = CoMHE(variant="test_cubic", log_every=1)  # type: ignore[arg-type]
    cpu_trainer(max_steps=3, callbacks=[callback]).fit(model, make_loader(num_batches=3))
    reg = callback.regularizer
    assert reg is not None and isinstance(reg.family, _CubicCosine) and reg.family.refreshes == 3
    out = reg()
    hidden = [g for g in reg.groups if g.mode == "cubic"]
    head = [g for g in reg.groups if g.mode == "plain"]
    assert hidden and head
    w = reg.group_neurons(hidden[0]).detach()
    u = torch.nn.functional.normalize(w, dim=-1)
    expected = (u @ u.transpose(1, 2)).abs().pow(3).mean((1, 2)).sum() * hidden[0].kappa
    expected = expected + hyperspherical_energy(reg.group_neurons(head[0]).detach()).sum() * head[0].kappa
    for g in hidden[1:]:
        v = torch.nn.functional.normalize(reg.group_neurons(g).detach(), dim=-1)
        expected = expected + (v @ v.transpose(1, 2)).abs().pow(3).mean((1, 2)).sum() * g.kappa
    torch.testing.assert_close(out.penalty.detach(), expected)
    state = reg.state_dict()
    assert state["cubic_refreshes"] == 3
    fresh = CoMHERegularizer(model, "test_cubic")
    fresh.load_state_dict(state)
    assert fresh.family.refreshes == 3


def test_registration_errors() -> None:
    with pytest.raises(ValueError, match="`name` must be unused, got 'mhe'"):
        register_energy("mhe")(_CubicCosine)
    with pytest.raises(ValueError, match="`cls` must be a subclass of EnergyFamily"):
        register_energy("test_not_a_family")(int)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="`variant` must be one of .*'test_cubic'.*got 'test_unknown'"):
        EnergyConfig(variant="test_unknown")


# ---------------------------------------------------------------------------------------------------------------
# projection_kind="expected": the exact C → ∞ mean of RP-CoMHE
# ---------------------------------------------------------------------------------------------------------------
def _wide_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 12), torch.nn.Linear(12, 3))


def test_expected_kind_is_the_exact_expectation_per_group() -> None:
    from lightning_comhe.functional.expected import expected_projected_energy

    model = _wide_mlp()
    reg = CoMHERegularizer(model, "random", projection_kind="expected", projection_dim=8)
    assert reg.family.projector is None and reg.state_dict()["projector"] is None
    reg.refresh()
    modes = {g.key: g.mode for g in reg.groups}
    assert modes == {
        "hidden:projected:16x24": "projected",
        "hidden:projected:12x16": "projected",
        "head:plain:3x12": "plain",
    }
    expected = torch.zeros(())
    for g in reg.groups:
        w = reg.group_neurons(g).detach()
        e = expected_projected_energy(w, 8) if g.mode == "projected" else hyperspherical_energy(w)
        expected = expected + g.kappa * e.sum()
    torch.testing.assert_close(reg().penalty.detach(), expected, rtol=1e-6, atol=0)


def test_expected_kind_matches_a_large_c_monte_carlo_mean() -> None:
    """Many independent RP draws: their mean penalty (and its gradient) approaches the expected one."""
    model = _wide_mlp()
    exact = CoMHERegularizer(model, "random", projection_kind="expected", projection_dim=8, head=None)
    exact.refresh()
    value = exact().penalty
    (grad,) = torch.autograd.grad(value, [model[0].weight])
    samples, grads = [], []
    for seed in range(8):
        rp = CoMHERegularizer(model, "random", projection_dim=8, num_projections=250, seed=seed, head=None)
        rp.refresh()
        p = rp().penalty
        samples.append(p.detach())
        grads.append(torch.autograd.grad(p, [model[0].weight])[0])
    samples_t = torch.stack(samples)
    se = samples_t.std() / len(samples) ** 0.5
    assert abs(samples_t.mean() - value.detach()) < 4 * se + 1e-6
    stacked = torch.stack(grads)
    grad_se = (stacked.var(0).sum() / len(grads)).sqrt()  # the standard error of the mean gradient, as a norm
    assert torch.linalg.norm(stacked.mean(0) - grad) < 3 * grad_se
    assert grad_se < 0.5 * torch.linalg.norm(grad)  # the check has power: the noise is well below the signal


def test_expected_kind_in_a_trainer_and_its_errors() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    model = TinyMLP()
    callback = CoMHE(variant="random", projection_kind="expected", projection_dim=4)
    cpu_trainer(max_steps=2, callbacks=[callback]).fit(model, make_loader(num_batches=2))
    assert callback.regularizer is not None
    assert {g.mode for g in callback.regularizer.groups} == {"projected", "plain"}
    with pytest.raises(MisconfigurationException, match=r"`num_projections` must be None with projection_kind="):
        CoMHE(variant="random", projection_kind="expected", num_projections=4)
    with pytest.raises(ValueError, match=r"`projection_dim` must be > s \+ 1 = 3 .*got 3"):
        EnergyConfig(variant="random", projection_kind="expected", projection_dim=3)
    with pytest.raises(ValueError, match=r"`projection_kind` must be 'gaussian' unless variant='random'"):
        EnergyConfig(variant="angle", projection_kind="expected")
