"""``HypersphericalEnergy`` (torchmetrics) and ``layer_energies`` against the functional API, and under DDP."""

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_comhe.functional import hyperspherical_energy
from lightning_comhe.metric import HypersphericalEnergy, layer_energies
from lightning_comhe.regularizer import CoMHERegularizer


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),  # 8 neurons of d=27
        nn.Conv2d(8, 12, 3, groups=2),  # 2 sets of 6 neurons, d=36
        nn.Flatten(),
        nn.Linear(12, 10),  # 10 neurons of d=12 (the head)
        nn.Linear(10, 5),  # head: the last Linear
    )


def _by_hand(model: nn.Module, **kw) -> dict[str, torch.Tensor]:
    conv, grouped, _, fc1, fc2 = model
    w_grouped = grouped.weight.detach().flatten(1).reshape(2, 6, -1)
    return {
        "0": hyperspherical_energy(conv.weight.detach().flatten(1), **kw),
        "1": hyperspherical_energy(w_grouped, **kw).mean(),
        "3": hyperspherical_energy(fc1.weight.detach(), **kw),
        "4": hyperspherical_energy(fc2.weight.detach(), **kw),
    }


@pytest.mark.parametrize(
    "kw",
    [{}, {"power": 0}, {"power": "a1"}, {"power": 1.5, "half_space": True}, {"power": 2, "angular": True}],
)
def test_layer_energies_match_functional(kw):
    model = _model()
    got = layer_energies(model, **kw)
    expected = _by_hand(model, **kw)
    assert list(got) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value)
        assert not got[name].requires_grad


def test_layer_energies_filters_and_selection_input():
    model = _model()
    assert list(layer_energies(model, include=r"^[34]$")) == ["3", "4"]
    assert list(layer_energies(model, exclude=["^0$", "^4$"])) == ["1", "3"]
    assert list(layer_energies(model, grouped="skip")) == ["0", "3", "4"]
    from lightning_comhe.discovery import discover_layers

    selection = discover_layers(model, include="^1$")
    assert list(layer_energies(selection)) == ["1"]
    assert list(layer_energies(selection.layers)) == ["1"]
    with pytest.raises(ValueError, match="No layer selected"):
        layer_energies(model, include="nothing")


def test_metric_equals_functional_and_total():
    model = _model()
    metric = HypersphericalEnergy()
    metric.update(model)
    out = metric.compute()
    expected = _by_hand(model)
    assert list(out) == ["total", *expected]
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value)
    torch.testing.assert_close(out["total"], sum(expected.values()))


def test_metric_conventions():
    assert HypersphericalEnergy.higher_is_better is False
    assert HypersphericalEnergy.is_differentiable is False
    assert HypersphericalEnergy.full_state_update is False
    with pytest.raises(ValueError, match=r"`power` must be .*got 'b3'"):
        HypersphericalEnergy(power="b3")
    with pytest.raises(ValueError, match=r"`half_space` must be a bool, got 'yes'"):
        HypersphericalEnergy(half_space="yes")
    with pytest.raises(ValueError, match=r"`grouped` must be one of 'per_group', 'skip', got 'all'"):
        HypersphericalEnergy(grouped="all")
    with pytest.raises(ValueError, match=r"`std_conv` must be one of 'raw', 'standardized', got 'white'"):
        HypersphericalEnergy(std_conv="white")
    with pytest.raises(ValueError, match=r"`eps` must be a finite float > 0, got 0"):
        HypersphericalEnergy(eps=0)
    with pytest.raises(TypeError, match="nn.Module"):
        HypersphericalEnergy().update(torch.randn(3, 3))


def test_metric_arguments_forwarded():
    model = _model()
    metric = HypersphericalEnergy(power="a0", half_space=True, include=r"^[01]$")
    metric.update(model)
    out = metric.compute()
    expected = _by_hand(model, power="a0", half_space=True)
    assert list(out) == ["total", "0", "1"]
    torch.testing.assert_close(out["0"], expected["0"])
    torch.testing.assert_close(out["1"], expected["1"])


def test_several_updates_are_averaged_and_forward_is_current():
    model = _model()
    first = _by_hand(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.linspace(0.5, 1.5, p.numel()).reshape(p.shape))
    second = _by_hand(model)
    assert not torch.allclose(first["4"], second["4"])

    metric = HypersphericalEnergy()
    metric.update(_model())
    metric.update(model)
    out = metric.compute()
    for name in first:
        torch.testing.assert_close(out[name], (first[name] + second[name]) / 2)

    # forward returns the energy of this model only, and accumulates like update
    metric = HypersphericalEnergy()
    now = metric(_model())
    torch.testing.assert_close(now["4"], first["4"])
    now = metric(model)
    torch.testing.assert_close(now["4"], second["4"])
    torch.testing.assert_close(metric.compute()["4"], (first["4"] + second["4"]) / 2)

    metric.reset()
    metric.update(model)
    torch.testing.assert_close(metric.compute()["4"], second["4"])


def test_other_layers_after_update_raise_and_reset_allows_them():
    metric = HypersphericalEnergy()
    metric.update(_model())
    with pytest.raises(ValueError, match="reset"):
        metric.update(nn.Sequential(nn.Linear(4, 6)))
    metric.reset()
    metric.update(nn.Sequential(nn.Linear(4, 6)))
    assert list(metric.compute()) == ["total", "0"]


def test_compute_without_update_is_nan():
    metric = HypersphericalEnergy()
    with pytest.warns(UserWarning, match="compute"):
        out = metric.compute()
    assert torch.isnan(out["total"])


def test_float64_weights_stay_float64():
    model = _model().double()
    metric = HypersphericalEnergy()
    metric.update(model)
    out = metric.compute()
    assert out["total"].dtype == torch.float64
    torch.testing.assert_close(out["0"], hyperspherical_energy(model[0].weight.detach().flatten(1)))


def test_matches_regularizer_mhe_energies_on_timm_model():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)
    reg_energies = CoMHERegularizer(model, "mhe").compute().energies
    metric = HypersphericalEnergy()
    metric.update(model)
    out = metric.compute()
    assert set(reg_energies) == set(out) - {"total"}
    for name, value in reg_energies.items():
        torch.testing.assert_close(out[name], value.to(out[name].dtype))


def test_plot_returns_figure():
    pytest.importorskip("matplotlib")
    import matplotlib
    import matplotlib.figure

    matplotlib.use("Agg", force=True)
    metric = HypersphericalEnergy()
    metric.update(_model())
    metric.update(_model())
    out = metric.compute()
    fig, ax = metric.plot()
    assert isinstance(fig, matplotlib.figure.Figure) and ax in fig.axes
    # one bar/point per key of compute(): the plot shows the metric's values, not an empty axis
    drawn = [t.get_text() for t in ax.get_xticklabels()] + [line.get_label() for line in ax.get_lines()]
    assert any(name in " ".join(drawn) for name in out if name != "total") or len(ax.patches) + len(ax.lines) > 0


# --------------------------------------------------------------------------------------------------------------------
# DDP: 2 processes (gloo)
# --------------------------------------------------------------------------------------------------------------------
def _ddp_worker() -> None:
    """Run in each process: the synced energy of replicated weights, and of rank-dependent weights."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        replicated = HypersphericalEnergy()
        replicated.update(_model(0))
        replicated.update(_model(0))  # several updates per rank: still an average
        same = replicated.compute()

        per_rank = HypersphericalEnergy()
        local = per_rank(_model(100 + rank))  # forward: this rank's value, not synced
        synced = per_rank.compute()

        unsynced = HypersphericalEnergy(sync_on_compute=False)
        unsynced.update(_model(100 + rank))
        alone = unsynced.compute()
        result = {
            "rank": rank,
            "same": {k: v.item() for k, v in same.items()},
            "local": {k: v.item() for k, v in local.items()},
            "synced": {k: v.item() for k, v in synced.items()},
            "alone": {k: v.item() for k, v in alone.items()},
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ddp_two_processes_not_multiplied_by_world_size():
    from tests.dist_helpers import base_env, free_port, run_processes

    port = str(free_port())
    code = "from tests.test_metric import _ddp_worker; _ddp_worker()"
    envs = [
        base_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))
        for r in range(2)
    ]
    finished = run_processes([[sys.executable, "-c", code]] * 2, envs, timeout=180)
    results = []
    for f in finished:
        assert f.returncode == 0, f.output
        line = next(ln for ln in f.output.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))

    single = HypersphericalEnergy()
    single.update(_model(0))
    reference = {k: v.item() for k, v in single.compute().items()}
    per_rank = []
    for r in range(2):
        m = HypersphericalEnergy()
        m.update(_model(100 + r))
        per_rank.append({k: v.item() for k, v in m.compute().items()})

    for res in results:
        r = res["rank"]
        # replicated weights: exactly the single-process value (not x2)
        assert res["same"] == pytest.approx(reference, rel=1e-6)
        # different weights per rank: the synchronized value is the mean over ranks
        mean = {k: (per_rank[0][k] + per_rank[1][k]) / 2 for k in reference}
        assert res["synced"] == pytest.approx(mean, rel=1e-6)
        assert res["local"] == pytest.approx(per_rank[r], rel=1e-6)
        assert res["alone"] == pytest.approx(per_rank[r], rel=1e-6)
