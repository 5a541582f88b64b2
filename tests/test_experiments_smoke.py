"""The experiments pipeline on tiny slices: every script runs and writes its files. Never checks accuracy."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from experiments import accuracy, run_all
from experiments.projection_guarantee import bound, holds
from experiments.publishing import doc_figure, update_doc_block
from experiments.runner import RunSpec, comhe_kwargs, default_kappas
from lightning_comhe import CoMHE
from lightning_comhe.config import PEER_DEFAULT_WEIGHTS, EnergyConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_run_all_quick_writes_every_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("# results\n")
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--doc", str(doc), "--max-train-samples", "48", "--max-eval-samples", "40"]
    results = run_all.main([*argv, "--epochs", "1", "--seeds", "0", "--archs", "cnn6", "resnet10t"])
    for stem in ("accuracy_digits", "energy_digits", "ablation_digits", "projection_guarantee"):
        for ext in ("json", "md", "png"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"
    assert doc.read_text() == "# results\n", "--quick must never touch the docs"

    acc = json.loads((out / "accuracy_digits.json").read_text())
    assert acc["archs"] == ["cnn6", "resnet10t"] and len(acc["runs"]) == 2 * 9
    assert all(0.0 <= r["test_error"] <= 100.0 and r["steps"] == 1 for r in acc["runs"])
    assert {r["spec"]["variant"] for r in acc["runs"]} == set(accuracy.ROWS)
    energy = results["energy_figure"]
    assert len(energy["runs"]) == 6 and all(r["energy"] for r in energy["runs"])
    assert "net.score" in energy["runs"][0]["energy"]
    ablation = results["ablation"]
    assert len(ablation["runs"]) == 1 + 4 * 3 and ablation["overhead"]["plain_ms"] > 0
    assert "Callback overhead" in (out / "ablation_digits.md").read_text()
    assert "run_all" not in capsys.readouterr().err


def _cifar_folder(root: Path, kind: str) -> Path:
    rng = np.random.default_rng(0)

    def batch(n: int, key: str, classes: int) -> dict:
        return {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key.encode(): list(rng.integers(0, classes, n)),
        }

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(8, "labels", 10)))
        (folder / "test_batch").write_bytes(pickle.dumps(batch(8, "labels", 10)))
        names = {b"label_names": [f"c{i}".encode() for i in range(10)]}
        (folder / "batches.meta").write_bytes(pickle.dumps(names))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        (folder / "train").write_bytes(pickle.dumps(batch(40, "fine_labels", 100)))
        (folder / "test").write_bytes(pickle.dumps(batch(8, "fine_labels", 100)))
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    return root


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_accuracy_cifar_path_on_a_generated_folder(tmp_path: Path, kind: str) -> None:
    root = _cifar_folder(tmp_path / "data", kind)
    out = tmp_path / "out"
    argv = ["--quick", "--cifar-root", str(root), "--cifar", kind, "--out", str(out), "--archs", "cnn6"]
    results = accuracy.main([*argv, "--variants", "baseline", "random", "--width", "4", "--epochs", "1"])
    assert results["data"] == {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[kind]
    assert len(results["runs"]) == 2
    assert results["setup"]["data"]["image_size"] == 32
    assert (out / f"accuracy_{kind}.md").read_text().startswith("Data: CIFAR")


def test_doc_blocks_are_replaced_in_place_or_appended(tmp_path: Path) -> None:
    doc = tmp_path / "r.md"
    doc.write_text("intro\n<!-- BEGIN GENERATED: a -->\nold\n<!-- END GENERATED: a -->\noutro\n")
    update_doc_block(doc, "a", "new")
    update_doc_block(doc, "b", "appended")
    text = doc.read_text()
    assert "old" not in text and text.index("new") < text.index("outro") < text.index("appended")
    png = tmp_path / "out" / "fig.png"
    png.parent.mkdir()
    png.write_bytes(b"png")
    assert doc_figure(png, doc) == "figures/fig.png" and (tmp_path / "figures" / "fig.png").read_bytes() == b"png"


def test_helpers() -> None:
    assert accuracy.choose_multiplier({0.1: [1.0, 1.0], 1.0: [1.0, 1.0], 10.0: [0.5, 2.0]}) == 1.0
    assert accuracy.choose_multiplier({0.1: [0.5], 1.0: [1.0]}) == 0.1
    assert run_all._without(["--quick", "--archs", "cnn6", "cnn9", "--jobs", "2"], "--archs") == [
        "--quick",
        "--jobs",
        "2",
    ]
    assert bound(10, 0.1) == 0.0 and 0.99 < bound(1000, 0.5) <= 1.0
    import torch

    assert holds(torch.tensor([0.4, 0.9]), 0.4, 0.1) == 0.5


def _kappas(variant: str, mult: float = 1.0, comhe: tuple = ()) -> tuple[float, float]:
    kwargs = comhe_kwargs(RunSpec(arch="cnn6", variant=variant, seed=0, kappa_mult=mult, comhe=comhe), "net.score")
    assert kwargs is not None
    CoMHE(**kwargs)  # the arguments a run passes are valid
    return kwargs["weight"], kwargs["head_weight"]


@pytest.mark.parametrize("mult", [1.0, 0.1, 10.0])
def test_run_kappas_are_the_library_defaults_times_the_multiplier(mult: float) -> None:
    approx = pytest.approx
    # ordinary powers: 1 hidden / 10 classifier
    assert _kappas("random", mult) == approx((1.0 * mult, 10.0 * mult))
    assert _kappas("mhe", mult, (("power", 1),)) == approx((1.0 * mult, 10.0 * mult))
    assert _kappas("half_mhe", mult, (("power", "a0"),)) == approx((1.0 * mult, 10.0 * mult))  # s = 0 is not s > 0
    # angular powers s > 0: 0.1 / 1, whether from the "a" strings or angular=True
    assert _kappas("mhe", mult, (("power", "a2"),)) == approx((0.1 * mult, 1.0 * mult))
    assert _kappas("angle", mult, (("power", "a1"),)) == approx((0.1 * mult, 1.0 * mult))
    assert _kappas("random", mult, (("power", 2), ("angular", True))) == approx((0.1 * mult, 1.0 * mult))
    # the peers: their own weight, classifier included
    for peer, weight in PEER_DEFAULT_WEIGHTS.items():
        assert _kappas(peer, mult) == approx((weight * mult, weight * mult))
    # the same values the library resolves when κ is left to it
    for variant, comhe in (("random", ()), ("mhe", (("power", "a2"),)), ("srip", ())):
        cfg = EnergyConfig(variant=variant, **dict(comhe))
        assert _kappas(variant, mult, comhe) == approx((cfg.hidden_weight * mult, cfg.head_kappa * mult))


def test_run_kappas_explicit_weights_and_baseline() -> None:
    assert _kappas("mhe", 10.0, (("power", "a2"), ("weight", 0.5))) == pytest.approx((0.5, 10.0))
    assert comhe_kwargs(RunSpec(arch="cnn6", variant="baseline", seed=0), "net.score") is None
    assert default_kappas("mhe", [["power", "a2"]]) == (0.1, 1.0)  # the lists of a JSON record work too
