"""The light core: ``pip install .`` without extras (torch, lightning, torchmetrics, numpy) is a working library.

CI runs this folder twice: in the development environment, with the rest of the suite (``python -m pytest -q``),
and in a second virtual environment that has the core dependencies only, where ``.ci/run`` sets
``COMHE_LIGHT_ENV=1`` and runs ``python -m pytest -q tests/light``. There, the extras' packages must really be
missing (:func:`test_extras_are_not_installed`), so the other tests cannot pass thanks to an extra that happens to
be installed. Nothing here imports an extra, nor the ``tests`` package (its helpers import Lightning demos only, but
this folder stays self-contained on purpose).
"""

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_comhe
from lightning_comhe import CoMHE, HypersphericalEnergy, hyperspherical_energy

#: The import names of the packages of the ``cli`` extra.
EXTRAS = ("timm", "torchvision", "sklearn", "matplotlib", "jsonargparse")
LIGHT_ENV = os.environ.get("COMHE_LIGHT_ENV") == "1"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not LIGHT_ENV, reason="checked in the environment without extras only (COMHE_LIGHT_ENV=1)")
@pytest.mark.parametrize("name", EXTRAS)
def test_extras_are_not_installed(name: str) -> None:
    assert importlib.util.find_spec(name) is None, (
        f"{name} is importable, but COMHE_LIGHT_ENV=1 says this is the environment without extras"
    )


def test_every_public_name_resolves() -> None:
    assert lightning_comhe.__all__, "lightning_comhe.__all__ is empty"
    assert len(set(lightning_comhe.__all__)) == len(lightning_comhe.__all__), "duplicates in __all__"
    for name in lightning_comhe.__all__:
        value = getattr(lightning_comhe, name)  # raises AttributeError for a name that does not resolve
        if name == "__version__":
            assert isinstance(value, str) and value
        else:
            owner = getattr(value, "__module__", None)
            assert owner is None or owner.startswith("lightning_comhe"), (name, owner)
    assert lightning_comhe.CoMHE is CoMHE and lightning_comhe.HypersphericalEnergy is HypersphericalEnergy


@pytest.mark.skipif(not LIGHT_ENV, reason="checked in the environment without extras only (COMHE_LIGHT_ENV=1)")
def test_the_installed_package_is_tested() -> None:
    """The light environment tests the installed wheel (its package list, its metadata), not the source tree."""
    source = REPO_ROOT / "lightning_comhe"
    assert not Path(lightning_comhe.__file__).resolve().is_relative_to(source), (
        f"lightning_comhe was imported from the source tree ({lightning_comhe.__file__}): run with "
        "PYTHONSAFEPATH=1, as .ci/run does, so that `python -m pytest` does not put the repository first on sys.path"
    )
    assert importlib.metadata.version("lightning-comhe") == lightning_comhe.__version__


@pytest.mark.skipif(not LIGHT_ENV, reason="checked in the environment without extras only (COMHE_LIGHT_ENV=1)")
def test_the_command_names_the_missing_extra() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_comhe.cli", "fit"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "ModuleNotFoundError" in last and 'pip install "lightning-comhe[cli]"' in last, proc.stderr[-3000:]


_PROBE = r"""
import importlib, json, pkgutil, sys, traceback

extras = set(sys.argv[1].split(","))
offenders = []


class Watch:  # sees every import (and find_spec probe) of an extra, and who asked for it
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in extras:
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            caller = frames[-1] if frames else None
            if caller is not None and "lightning_comhe" in caller.filename and "find_spec" not in (caller.line or ""):
                offenders.append(f"{name}: {caller.filename}:{caller.lineno}: {caller.line}")
        return None


sys.meta_path.insert(0, Watch())
import lightning_comhe

for name in lightning_comhe.__all__:
    getattr(lightning_comhe, name)
modules = []
todo = [lightning_comhe]
while todo:  # every module and package, without entering lightning_comhe.cli (the `comhe` command: `cli` extra)
    package = todo.pop()
    modules.append(package.__name__)
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name == "lightning_comhe.cli":
            continue
        module = importlib.import_module(info.name)
        if info.ispkg:
            todo.append(module)
        else:
            modules.append(info.name)
print(json.dumps({"offenders": offenders, "modules": modules, "file": lightning_comhe.__file__}))
"""


def test_core_modules_do_not_import_the_extras() -> None:
    """Import every module of the package but ``lightning_comhe.cli``: none of them imports an extra itself.

    Third-party packages may import an extra when it is installed (torchmetrics imports matplotlib and torchvision
    if present); only imports made by the library's own code count.
    """
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(EXTRAS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["offenders"], "lightning_comhe imports an extra at import time:\n" + "\n".join(
        result["offenders"]
    )
    assert {"lightning_comhe.callback", "lightning_comhe.metric", "lightning_comhe.regularizer"} <= set(
        result["modules"]
    )


# --------------------------------------------------------------------------------------------------------------------
# a real Trainer on the CPU
# --------------------------------------------------------------------------------------------------------------------
class SmallConvNet(LightningModule):
    """Two convolutions and a classifier on 3x8x8 inputs (layers ``conv1``, ``conv2``, ``fc``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=generator)
    y = torch.randint(0, 4, (32,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _fit(callback: CoMHE, max_steps: int, tmp_path: Path) -> tuple[SmallConvNet, SmallConvNet, Trainer]:
    torch.manual_seed(0)
    model = SmallConvNet()
    initial = SmallConvNet()
    initial.load_state_dict(model.state_dict())
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, train_dataloaders=_loader())
    return model, initial, trainer


@pytest.mark.parametrize("variant", ["mhe", "random", "angle"])
def test_trainer_with_comhe_logs_the_penalty(variant: str, tmp_path: Path) -> None:
    model, initial, trainer = _fit(CoMHE(variant=variant, log_every=1), max_steps=3, tmp_path=tmp_path)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert "comhe/penalty" in metrics, sorted(metrics)
    penalty = float(metrics["comhe/penalty"])
    assert math.isfinite(penalty) and penalty > 0
    assert {"comhe/energy/conv1", "comhe/energy/conv2", "comhe/energy/fc"} <= set(metrics), sorted(metrics)
    assert not torch.equal(model.conv1.weight, initial.conv1.weight)  # it trained


def test_mhe_penalty_is_the_weighted_energy_of_the_layers(tmp_path: Path) -> None:
    """One optimizer step of ``variant="mhe"``: the logged penalty is ``Σ κ E`` of the initial weights.

    Official weights: κ = 1 for the hidden layers, 10 for the classifier; E is the full-space energy of the rows of
    ``weight.flatten(1)``.
    """
    _, initial, trainer = _fit(CoMHE(variant="mhe"), max_steps=1, tmp_path=tmp_path)
    expected = sum(
        kappa * hyperspherical_energy(layer.weight.detach().flatten(1))
        for layer, kappa in ((initial.conv1, 1.0), (initial.conv2, 1.0), (initial.fc, 10.0))
    )
    assert float(trainer.callback_metrics["comhe/penalty"]) == pytest.approx(float(expected), rel=1e-5)


def test_hypersphericalenergy_metric() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    metric = HypersphericalEnergy()
    metric.update(model)
    result = metric.compute()
    assert set(result) == {"0", "2", "total"}
    for name, layer in (("0", model[0]), ("2", model[2])):
        assert float(result[name]) == pytest.approx(float(hyperspherical_energy(layer.weight.detach())), rel=1e-5)
    assert float(result["total"]) == pytest.approx(float(result["0"] + result["2"]), rel=1e-6)
    metric.update(model)  # a second update of the same weights: the mean is unchanged
    assert float(metric.compute()["total"]) == pytest.approx(float(result["total"]), rel=1e-6)
