"""The hot path is device agnostic: no host syncs, no device-specific generators or autocast.

TPU/XLA cannot run here. The ``meta`` device stands in for it: it has no data (any ``.item()``, ``.tolist()`` or
data-dependent branch raises), no ``torch.Generator`` and no autocast, like some accelerator backends. Every
variant's full regularizer step (refresh, penalty, backward) must run on it, twice, so the second step also goes
through the cached / fitted state.
"""

import pytest
import torch
from torch import nn

from lightning_comhe.functional._device import autocast_off
from lightning_comhe.projections import AdversarialProjection, AngleProjection, RandomProjection, generator_device
from lightning_comhe.regularizer import CoMHERegularizer

VARIANTS = {
    "mhe": {},
    "half_mhe": {},
    "random": {"projection_dim": 4, "num_projections": 2},
    "random-srht": {"projection_dim": 4, "num_projections": 2, "projection_kind": "srht"},
    "angle": {"projection_dim": 4},
    "adversarial": {"projection_dim": 4, "inner_steps": 2, "lookahead": "second"},
    "orthogonal": {},
    "orthonormal": {},
    "srip": {},
}


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(32, 16), nn.Linear(16, 5))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_runs_without_host_syncs(name):
    variant = name.split("-")[0]
    model = _model("meta")
    reg = CoMHERegularizer(model, variant=variant, seed=1, **VARIANTS[name])
    for _ in range(2):
        reg.refresh(lr=0.1)
        out = reg.compute()
        assert out.penalty.device.type == "meta" and out.penalty.shape == ()
        assert set(out.energies) == {"0", "2", "3"} and all(e.device.type == "meta" for e in out.energies.values())
        out.penalty.backward()
    for p in (model[0].weight, model[2].weight, model[3].weight):
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.device.type == "meta"
    # the same code on the CPU gives a finite penalty (the meta run is not vacuous)
    cpu = CoMHERegularizer(_model("cpu"), variant=variant, seed=1, **VARIANTS[name])
    cpu.refresh(lr=0.1)
    assert torch.isfinite(cpu.compute().penalty)


def test_generator_device_falls_back_to_the_cpu():
    assert generator_device("cpu") == torch.device("cpu")
    assert generator_device(torch.device("meta")) == torch.device("cpu")  # no meta generator


@pytest.mark.parametrize("kind", ["gaussian", "srht"])
def test_host_generator_draws_are_the_cpu_stream(kind):
    """Where the device has no generator, draws come from the same seeded CPU stream a CPU run uses."""
    neurons = {dev: torch.zeros(2, 5, 12, device=dev) for dev in ("cpu", "meta")}
    states = {}
    for dev, w in neurons.items():
        proj = RandomProjection(dim=3, num=2, seed=5, kind=kind)
        for _ in range(3):  # three resamples
            assert proj.project("g", w).device.type == dev
            proj.step()
        entry = proj.state_dict()["entries"]["g"]
        states[dev] = entry["generator"]
        if kind == "gaussian":  # every matrix seeded on a CPU generator: no generator state to save
            assert list(proj._scratch) == ["cpu"] and entry["generator"] is None
    if kind != "gaussian":
        assert states["meta"]["device"] == states["cpu"]["device"] == "cpu"
        assert torch.equal(states["meta"]["state"], states["cpu"]["state"])


@pytest.mark.parametrize("cls", [AngleProjection, AdversarialProjection])
def test_host_generator_initializes_fitted_projections(cls):
    states = {}
    for dev in ("cpu", "meta"):
        proj = cls(dim=3, seed=5)
        proj.fit("g", torch.ones(1, 4, 6, device=dev), lr=0.1)
        assert proj.get_projection("g").device.type == dev
        states[dev] = proj.state_dict()["entries"]["g"]["generator"]
    assert torch.equal(states["meta"]["state"], states["cpu"]["state"])


def test_sparse_projection_refuses_other_devices_clearly():
    proj = RandomProjection(dim=3, num=2, kind="sparse")
    with pytest.raises(ValueError, match=r"kind='sparse'.*got neurons on 'meta'.*kind='gaussian'"):
        proj.project("g", torch.zeros(1, 4, 16, device="meta"))


def test_autocast_off_disables_autocast_where_it_exists():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        with autocast_off(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            x = torch.ones(2, 2) @ torch.ones(2, 2)
        assert x.dtype == torch.float32
        with autocast_off(torch.device("meta")):  # no autocast on meta: a no-op, not an error
            assert torch.is_autocast_enabled("cpu")
