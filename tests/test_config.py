"""The configuration dataclasses: one validation, one message style, and the drift cases they closed.

Each drift case was a place where two copies of an argument disagreed before the configuration was centralized;
every test here checks that all the entry points (config, regularizer, callback, projections, CLI helpers) agree.
"""

import dataclasses
import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_comhe import CoMHE, CoMHERegularizer
from lightning_comhe.config import (
    PEER_DEFAULT_WEIGHTS,
    EnergyConfig,
    ScheduleConfig,
    SelectionConfig,
    default_weights,
    split_kwargs,
    variant_defaults,
)
from lightning_comhe.projections import AdversarialProjection, AngleProjection, RandomProjection
from tests.helpers import TinyMLP


def test_configs_are_frozen_and_keyword_only() -> None:
    cfg = EnergyConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.variant = "mhe"  # type: ignore[misc]
    with pytest.raises(TypeError):
        EnergyConfig("mhe")  # type: ignore[misc]
    assert SelectionConfig() == SelectionConfig(head="auto") and ScheduleConfig().log_every == 50


@pytest.mark.parametrize(
    ("cls", "kwargs", "pattern"),
    [
        (EnergyConfig, {"variant": "nope"}, r"^`variant` must be one of 'mhe', .*got 'nope'\.$"),
        (EnergyConfig, {"weight": -0.5}, r"^`weight` must be a finite float >= 0 or None .*got -0\.5\.$"),
        (EnergyConfig, {"projection_dim": True}, r"^`projection_dim` must be an int >= 1 or None .*got True\.$"),
        (EnergyConfig, {"eps": math.inf}, r"^`eps` must be a finite float > 0, got inf\.$"),
        (EnergyConfig, {"angular": 1}, r"^`angular` must be a bool, got 1\.$"),
        (EnergyConfig, {"srip_iterations": -1}, r"^`srip_iterations` must be an int >= 0, got -1\.$"),
        (SelectionConfig, {"head": 3}, r"^`head` must be 'auto', a module name, .*got 3\.$"),
        (SelectionConfig, {"head": ["fc", 1]}, r"^`head` must be .*got \['fc', 1\]\.$"),
        (ScheduleConfig, {"log_every": 0}, r"^`log_every` must be an int >= 1, got 0\.$"),
    ],
)
def test_one_message_style(cls: type, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


def test_split_kwargs_names_the_unknown_argument() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'wieght'"):
        split_kwargs({"wieght": 1.0})
    energy, selection, schedule = split_kwargs({"variant": "mhe", "include": "net", "name": "x"})
    assert (energy.variant, selection.include, schedule.name) == ("mhe", "net", "x")


# ---------------------------------------------------------------------------------------------------------------
# drift 1: inner_lr <= 0 was refused by the callback but accepted by the regularizer, and `inner_lr or 0.1` turned an
# explicit 0.0 into 0.1
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_non_positive_inner_lr_is_refused_everywhere(bad: float) -> None:
    pattern = rf"`inner_lr` must be a finite float > 0 .*got {bad}"
    with pytest.raises(ValueError, match=pattern):
        EnergyConfig(variant="angle", inner_lr=bad)
    with pytest.raises(ValueError, match=pattern):
        CoMHERegularizer(TinyMLP(), "angle", inner_lr=bad)
    with pytest.raises(MisconfigurationException, match=pattern):
        CoMHE(variant="angle", inner_lr=bad)
    for cls in (AngleProjection, AdversarialProjection):
        with pytest.raises(ValueError, match="`lr` must be a finite float > 0"):
            cls(dim=2, lr=bad)


def test_explicit_inner_lr_is_used_not_the_default() -> None:
    reg = CoMHERegularizer(TinyMLP(), "adversarial", inner_lr=0.02, projection_dim=2)
    reg.refresh(lr=0.5)
    assert reg.family.inner_lr() == 0.02 and reg.family.projector.lr == 0.02
    follow = CoMHERegularizer(TinyMLP(), "adversarial", projection_dim=2)
    assert follow.family.inner_lr() == 0.1  # no lr known yet: the official base lr
    follow.refresh(lr=0.5)
    assert follow.family.inner_lr() == 0.5


# ---------------------------------------------------------------------------------------------------------------
# drift 2: RandomProjection(seed=-1) was accepted where the others refused negative seeds
# ---------------------------------------------------------------------------------------------------------------
def test_negative_seeds_are_refused_everywhere() -> None:
    pattern = r"`seed` must be an int >= 0, got -1"
    for build in (
        lambda: RandomProjection(dim=2, seed=-1),
        lambda: AngleProjection(dim=2, seed=-1),
        lambda: AdversarialProjection(dim=2, seed=-1),
        lambda: EnergyConfig(seed=-1),
        lambda: CoMHERegularizer(TinyMLP(), "random", seed=-1),
    ):
        with pytest.raises(ValueError, match=pattern):
            build()
    with pytest.raises(MisconfigurationException, match=pattern):
        CoMHE(seed=-1)


# ---------------------------------------------------------------------------------------------------------------
# drift 3: energy_table dropped std_conv
# ---------------------------------------------------------------------------------------------------------------
def test_energy_table_takes_std_conv() -> None:
    pytest.importorskip("timm")
    from timm.layers import StdConv2d

    from lightning_comhe.cli.energy_cmd import energy_table
    from lightning_comhe.metric import layer_energies

    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # a strongly non-zero-mean filter bank: standardization changes the directions
        model[0].weight.add_(torch.linspace(0, 3, 8).view(8, 1, 1, 1))
    rows = {mode: energy_table(model, std_conv=mode, head=None) for mode in ("raw", "standardized")}
    for mode, table in rows.items():
        expected = layer_energies(model, std_conv=mode, head=None)
        assert {r["name"]: r["energy"] for r in table} == pytest.approx({k: float(v) for k, v in expected.items()})
    assert rows["raw"][0]["energy"] != pytest.approx(rows["standardized"][0]["energy"], rel=1e-3)
    with pytest.raises(ValueError, match="`std_conv` must be one of 'raw', 'standardized', got 'x'"):
        energy_table(model, std_conv="x")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# drift 4: the regularizer's own head rule took the first timm root, discovery takes every outermost root
# ---------------------------------------------------------------------------------------------------------------
class _TimmLike(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.fc = nn.Linear(8, classes)

    def get_classifier(self) -> nn.Module:
        return self.fc


class _TwoBackbones(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = _TimmLike(3)
        self.right = _TimmLike(5)


def test_head_rule_is_discoverys_every_outermost_root() -> None:
    from lightning_comhe.discovery import discover_layers

    model = _TwoBackbones()
    expected = {layer.name: layer.role for layer in discover_layers(model)}
    assert expected == {"left.body": "hidden", "left.fc": "head", "right.body": "hidden", "right.fc": "head"}
    reg = CoMHERegularizer(model, "mhe")
    assert {layer.name: layer.role for layer in reg.selection.layers} == expected
    assert {g.key for g in reg.groups if g.kappa == 10.0} == {"head:plain:3x8", "head:plain:5x8"}


# ---------------------------------------------------------------------------------------------------------------
# drift 5: κ defaults come from one function (the angular weights included)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "power", "expected"),
    [("random", 2, (1.0, 10.0)), ("mhe", "a2", (0.1, 1.0)), ("half_mhe", "a0", (1.0, 10.0)), ("srip", 2, None)],
)
def test_kappa_defaults_come_from_one_function(variant: str, power: object, expected: tuple | None) -> None:
    expected = expected or (PEER_DEFAULT_WEIGHTS[variant],) * 2
    assert default_weights(variant, power) == expected
    cfg = EnergyConfig(variant=variant, power=power)
    assert (cfg.hidden_weight, cfg.head_kappa) == expected
    reg = CoMHERegularizer(TinyMLP(), variant, power=power)
    assert (reg.weight, reg.head_weight) == expected
    assert {g.kappa for g in reg.groups if g.key.startswith("head")} == {expected[1]}


def test_variant_defaults_are_resolved_once() -> None:
    for variant in ("random", "angle", "adversarial", "mhe"):
        d = variant_defaults(variant)
        cfg = EnergyConfig(variant=variant)
        assert (cfg.dim, cfg.num, cfg.steps) == (d["projection_dim"], d["num_projections"], d["inner_steps"])


def test_regularizer_takes_config_objects_or_keywords() -> None:
    model = TinyMLP()
    energy = EnergyConfig(variant="half_mhe", power="a1")
    selection = SelectionConfig(include=r"net\.[02]", head=None)
    a = CoMHERegularizer(model, energy=energy, selection=selection)
    b = CoMHERegularizer(model, "half_mhe", power="a1", include=r"net\.[02]", head=None)
    torch.testing.assert_close(a().penalty, b().penalty, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`variant` must be None or 'half_mhe'"):
        CoMHERegularizer(model, "mhe", energy=energy)
    with pytest.raises(TypeError, match="unexpected keyword argument 'power'"):
        CoMHERegularizer(model, energy=energy, power=2)
