"""The ``comhe`` command: the default fit end to end, every config file, flags, ``comhe energy`` and bad input."""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from lightning_comhe.callback import CoMHE
from lightning_comhe.cli import ComheCLI, ComheReport, TimmClassifier, main
from lightning_comhe.cli.energy_cmd import random_reference
from lightning_comhe.discovery import discover_layers
from lightning_comhe.functional import hyperspherical_energy
from lightning_comhe.metric import layer_energies

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {p.stem: p for p in sorted((REPO_ROOT / "configs").glob("*.yaml"))}
VARIANT_CONFIGS = ["mhe", "half_mhe", "random", "angle", "adversarial"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]
SHORT += ["--trainer.limit_test_batches", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("COMHE_TRACEBACK", None)
    env.update(extra)
    return env


def run_comhe(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``comhe ARGS`` in a subprocess (``python -m lightning_comhe.cli``, what the console script runs)."""
    return subprocess.run(
        [sys.executable, "-m", "lightning_comhe.cli", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _valid_png(path: Path) -> None:
    import matplotlib.image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# --------------------------------------------------------------------------------------------------------------------
# `comhe fit` end to end, in a subprocess
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fit")
    proc = run_comhe(["fit", *SHORT], cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = cwd / "lightning_logs" / "version_0"
    return proc, run_dir


def test_fit_default_end_to_end(fit_run):
    proc, run_dir = fit_run
    out, err = proc.stdout, proc.stderr
    assert "Epoch 0: 100%" in out + err  # Lightning's progress bar
    assert "CoMHE regularizes 15 layers" in out + err  # the callback's one-line selection summary
    assert "CoMHE report: TimmClassifier(resnet10t) on DigitsDataModule, CoMHE variant 'random'" in out
    acc = float(re.search(r"test accuracy\s+([0-9.]+)", out).group(1))
    penalty = float(re.search(r"final penalty\s+([0-9.e+-]+)", out).group(1))
    assert 0.0 <= acc <= 1.0 and penalty > 0
    assert "full-space hyperspherical energy (power 2) of 15 layers" in out
    for layer in ("model.conv1.0", "model.layer4.0.conv2", "model.fc", "total"):
        assert re.search(rf"^\s+{re.escape(layer)}\s", out, flags=re.M), layer
    plot = Path(re.search(r"plot: (.+)", out).group(1).strip())
    assert plot == run_dir / "comhe_report.png"
    _valid_png(plot)

    data = json.loads((run_dir / "comhe_report.json").read_text())
    assert data["variant"] == "random"
    assert [row["epoch"] for row in data["history"]] == [0, 1]
    assert set(data["start"]) == set(data["end"]) and len(data["start"]) == 15
    assert data["test"]["test/acc"] == pytest.approx(acc, abs=1e-4)
    assert data["final_penalty"] == pytest.approx(penalty, rel=1e-3)
    assert data["layers"]["model.fc"] == {"sets": 1, "N": 10, "d": 512}


def test_fit_report_energies_are_the_models(fit_run):
    """Start: the seeded initial weights; end: the final weights (the checkpoint), both via the functional API."""
    _, run_dir = fit_run
    data = json.loads((run_dir / "comhe_report.json").read_text())
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    trained = TimmClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    end = layer_energies(trained)
    assert data["end"] == pytest.approx({k: v.item() for k, v in end.items()}, rel=1e-5)
    torch.manual_seed(0)  # LightningCLI's seed_everything(0) precedes the model's construction
    start = layer_energies(TimmClassifier(num_classes=10))
    assert data["start"] == pytest.approx({k: v.item() for k, v in start.items()}, rel=1e-5)
    assert data["start"] != pytest.approx(data["end"], rel=1e-6)


def test_saved_run_config_parses_again(fit_run, capsys):
    _, run_dir = fit_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["comhe"]["enabled"] is True and saved["comhe"]["variant"] == "random"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(run_dir / "config.yaml"), "--print_config"])
    assert info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["comhe"] == saved["comhe"]


def _table(text: str) -> dict[str, dict[str, float]]:
    rows = {}
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) == {"-"}) + 1
    for line in lines[start:]:
        parts = line.split()
        if not parts or parts[0] == "total" or line.startswith("plot:"):
            break
        name, role, sets, n, d, energy, rand, ratio = parts
        rows[name] = {"sets": int(sets), "N": int(n), "d": int(d), "energy": float(energy), "random": float(rand)}
        rows[name]["ratio"] = float(ratio)
    return rows


def test_energy_on_fit_checkpoint(fit_run, capsys):
    _, run_dir = fit_run
    (ckpt,) = (run_dir / "checkpoints").glob("*.ckpt")
    assert main(["energy", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"resnet10t from {ckpt}")
    rows = _table(out)
    expected = layer_energies(TimmClassifier.load_from_checkpoint(ckpt, map_location="cpu").model)
    assert list(rows) == list(expected)
    for name, value in expected.items():
        assert rows[name]["energy"] == pytest.approx(value.item(), rel=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# `comhe energy`
# --------------------------------------------------------------------------------------------------------------------
def test_energy_resnet18_matches_functional(tmp_path, capsys):
    plot = tmp_path / "plots" / "energy.png"
    assert main(["energy", "resnet18", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resnet18 (random init, seed 0): full-space hyperspherical energy (power 2) of 21 layers")
    rows = _table(out)
    torch.manual_seed(0)
    model = timm.create_model("resnet18")
    selection = discover_layers(model)
    expected = layer_energies(selection)
    assert list(rows) == list(expected) and rows["fc"]["N"] == 1000 and rows["fc"]["d"] == 512
    assert rows["conv1"] == {**rows["conv1"], "sets": 1, "N": 64, "d": 147}
    for layer in selection.layers:
        row = rows[layer.name]
        assert row["energy"] == pytest.approx(expected[layer.name].item(), rel=1e-4)
        generator = torch.Generator().manual_seed(0)
        (s, n, d), *_ = layer.shapes()
        reference = hyperspherical_energy(torch.randn(s, n, d, generator=generator)).mean()
        assert row["random"] == pytest.approx(reference.item(), rel=1e-4)
        assert row["ratio"] == pytest.approx(row["energy"] / row["random"], abs=2e-4)
    assert f"plot: {plot}" in out
    _valid_png(plot)


def test_energy_options(capsys):
    args = ["energy", "resnet10t", "--num-classes", "7", "--power", "a1", "--half_space", "--exclude", "[conv1]"]
    assert main([*args, "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "half-space angular hyperspherical energy (power 1)" in out
    rows = _table(out)
    assert not any("conv1" in name for name in rows) and rows["fc"]["N"] == 7
    torch.manual_seed(3)
    model = timm.create_model("resnet10t", num_classes=7)
    selection = discover_layers(model, exclude=["conv1"])
    expected = layer_energies(selection, "a1", half_space=True)
    for layer in selection.layers:
        assert rows[layer.name]["energy"] == pytest.approx(expected[layer.name].item(), rel=1e-4)
        ref = random_reference(layer, 1, half_space=True, angular=True, seed=3)
        assert rows[layer.name]["random"] == pytest.approx(ref.item(), rel=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------------------------------------------------
def test_configs_present():
    assert set(CONFIGS) >= {*VARIANT_CONFIGS, "ddp"}


@pytest.mark.parametrize("name", [*VARIANT_CONFIGS, "ddp"])
def test_config_parses(name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIGS[name]), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(CONFIGS[name].read_text())
    assert printed["comhe"]["variant"] == source["comhe"]["variant"] == (name if name != "ddp" else "random")
    for key, value in source["comhe"].items():
        assert printed["comhe"][key] == value, key
    for key, value in source["trainer"].items():
        assert printed["trainer"][key] == value, key
    assert printed["data"]["class_path"].endswith("DigitsDataModule")


@pytest.mark.parametrize("name", VARIANT_CONFIGS)
def test_config_fast_dev_run(name, tmp_path, capsys):
    args = ["fit", "--config", str(CONFIGS[name]), "--trainer.fast_dev_run", "true"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--data.init_args.batch_size", "16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"CoMHE variant '{name}'" in out
    data = json.loads((tmp_path / "comhe_report.json").read_text())
    assert data["variant"] == name and data["final_penalty"] > 0
    _valid_png(tmp_path / "comhe_report.png")


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_config_fast_dev_run(tmp_path):
    from tests.dist_helpers import base_env, free_port, run_processes

    cmd = [sys.executable, "-m", "lightning_comhe.cli", "fit", "--config", str(CONFIGS["ddp"])]
    cmd += ["--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path)]
    env = base_env(MASTER_PORT=str(free_port()), HF_HUB_OFFLINE="1")
    (finished,) = run_processes([cmd], [env], timeout=400)
    assert finished.returncode == 0, finished.output[-5000:]
    assert finished.output.count("CoMHE report:") == 1  # printed by global rank 0 only
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in finished.output
    data = json.loads((tmp_path / "comhe_report.json").read_text())
    assert data["variant"] == "random" and data["final_penalty"] > 0


# --------------------------------------------------------------------------------------------------------------------
# flags and YAML reach every argument
# --------------------------------------------------------------------------------------------------------------------
def _callbacks(cli: ComheCLI, kind: type) -> list:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, kind)]


def test_default_cli_objects():
    cli = ComheCLI(args=[], run=False)
    assert cli.model.hparams.model_name == "resnet10t" and cli.model.hparams.num_classes == 10
    assert type(cli.datamodule).__name__ == "DigitsDataModule"
    (comhe,) = _callbacks(cli, CoMHE)
    assert comhe.variant == "random" and comhe.projection_dim is None  # official defaults (k=40, C=20)
    assert len(_callbacks(cli, ComheReport)) == 1
    assert cli.trainer.max_epochs == 6
    optimizer = cli.model.configure_optimizers()["optimizer"]
    assert type(optimizer).__name__ == "SGD" and optimizer.defaults["lr"] == 0.05


def test_every_comhe_argument_is_a_flag():
    signature = inspect.signature(CoMHE.__init__)
    params = {name: p.default for name, p in signature.parameters.items() if name != "self"}
    # every argument is in the `comhe` group with its default
    parsed_defaults = ComheCLI(args=[], run=False).config["comhe"]
    for name, default in params.items():
        assert name in parsed_defaults, name
        assert parsed_defaults[name] == default, name

    flags = {
        "variant": ("angle", "angle"),
        "weight": ("0.5", 0.5),
        "head_weight": ("2.0", 2.0),
        "power": ("a1", "a1"),
        "angular": ("true", True),
        "projection_dim": ("8", 8),
        "num_projections": ("1", 1),
        "resample_every": ("3", 3),
        "inner_steps": ("2", 2),
        "inner_lr": ("0.01", 0.01),
        "lookahead": ("first", "first"),
        "include": ("layer", "layer"),
        "exclude": ("[fc, conv1]", ["fc", "conv1"]),
        "head": ("model.fc", "model.fc"),
        "grouped": ("skip", "skip"),
        "std_conv": ("standardized", "standardized"),
        "seed": ("7", 7),
        "log_every": ("5", 5),
        "name": ("main", "main"),
    }
    for name, default in params.items():  # arguments added later: flip booleans, bump integers
        if name in flags:
            continue
        if isinstance(default, bool):
            flags[name] = (str(not default).lower(), not default)
        elif isinstance(default, int):
            flags[name] = (str(default + 1), default + 1)
    cli = ComheCLI(args=[f"--comhe.{k}={flag}" for k, (flag, _) in flags.items() if k in params], run=False)
    (comhe,) = _callbacks(cli, CoMHE)
    for name, (_, value) in flags.items():
        if name in params:
            assert getattr(comhe, name) == value, name


def test_comhe_disabled_and_extra_instances(tmp_path):
    cli = ComheCLI(args=["--comhe.enabled", "false"], run=False)
    assert _callbacks(cli, CoMHE) == [] and len(_callbacks(cli, ComheReport)) == 1

    extra = ["--trainer.callbacks+=CoMHE", "--trainer.callbacks.variant=mhe", "--trainer.callbacks.name=head"]
    cli = ComheCLI(args=extra, run=False)
    assert [(cb.variant, cb.name) for cb in _callbacks(cli, CoMHE)] == [("mhe", "head"), ("random", None)]

    config = {
        "comhe": {"enabled": False},
        "trainer": {"callbacks": [{"class_path": "lightning_comhe.CoMHE", "init_args": {"variant": "half_mhe"}}]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = ComheCLI(args=["--config", str(path)], run=False)
    assert [cb.variant for cb in _callbacks(cli, CoMHE)] == ["half_mhe"]


def test_model_and_data_flags(tmp_path):
    from tests.test_datamodules import make_cifar100

    make_cifar100(tmp_path)
    args = ["--data", "CIFARDataModule", "--data.root", str(tmp_path), "--data.variant", "cifar100"]
    args += ["--model.optimizer", "AdamW", "--model.optimizer.lr", "0.001", "--model.lr_scheduler", "constant"]
    args += ["--model.model_kwargs", "{drop_path_rate: 0.1}"]
    cli = ComheCLI(args=args, run=False)
    assert cli.model.hparams.num_classes == 100  # linked from the data module
    assert cli.model.model.get_classifier().out_features == 100
    optimizer = cli.model.configure_optimizers()
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == 0.001

    cli = ComheCLI(args=["--model.lr_scheduler", "StepLR", "--model.lr_scheduler.step_size", "2"], run=False)
    config = cli.model.configure_optimizers()
    assert type(config["lr_scheduler"]["scheduler"]).__name__ == "StepLR"


def test_switching_data_class_uses_its_own_defaults(tmp_path):
    from tests.test_datamodules import _class_folder

    _class_folder(tmp_path, {"cat": 2, "dog": 2, "owl": 2})
    args = ["--data", "ImageFolderDataModule", "--data.root", str(tmp_path)]
    cli = ComheCLI(args=[*args, "--data.batch_size", "5"], run=False)
    # not the digits' image_size=32 / batch_size=128 carried over by jsonargparse
    assert (cli.datamodule.image_size, cli.datamodule.batch_size) == (224, 5)
    assert cli.model.hparams.num_classes == 3
    cli = ComheCLI(args=[*args, "--data.image_size", "48"], run=False)
    assert (cli.datamodule.image_size, cli.datamodule.batch_size) == (48, 32)
    cli = ComheCLI(args=["--data.image_size", "16"], run=False)
    assert (cli.datamodule.image_size, cli.datamodule.batch_size) == (16, 128)


def test_top_level_exports():
    import lightning_comhe
    from lightning_comhe.metric import HypersphericalEnergy

    assert lightning_comhe.CoMHE is CoMHE and lightning_comhe.HypersphericalEnergy is HypersphericalEnergy


def test_no_arguments_prints_help(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: comhe" in out and "fit" in out and "comhe energy --help" in out


# --------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2
# --------------------------------------------------------------------------------------------------------------------
def test_unknown_model_subprocess(tmp_path):
    proc = run_comhe(["fit", "--model.model_name", "resnet1000"], cwd=tmp_path, timeout=300)
    line = _assert_one_line_error(proc.returncode, proc.stderr, "unknown timm model 'resnet1000'", "resnet101")
    assert "close matches" in line


def _bad_image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "flat"
    root.mkdir()
    (root / "a.png").write_bytes(PNG_MAGIC)
    return root


@pytest.mark.parametrize(
    "case",
    [
        "unknown_model",
        "missing_folder",
        "wrong_format",
        "bad_variant",
        "missing_cifar",
        "bad_value",
        "bad_report_value",
        "bad_type",
        "nested_bad_type",
        "unknown_class",
        "missing_init_arg",
        "missing_config",
        "unknown_flag",
        "fit_only_flag",
        "energy_unknown",
    ],
)
def test_bad_input_one_line(case, tmp_path, capsys):
    args, needles = {
        "unknown_model": (["fit", "--model.model_name", "vit_tiny"], ["unknown timm model", "vit_tiny_patch16_224"]),
        "missing_folder": (
            ["fit", "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "nope")],
            ["image folder not found", str(tmp_path / "nope")],
        ),
        "wrong_format": (
            ["fit", "--data", "ImageFolderDataModule", "--data.root", str(_bad_image_folder(tmp_path))],
            ["no class sub-folders", "flat"],
        ),
        "bad_variant": (["fit", "--comhe.variant", "randomm"], ["comhe.variant", "'random'", "randomm"]),
        "missing_cifar": (
            ["fit", "--data", "CIFARDataModule", "--data.root", str(tmp_path)],
            ["cifar10 files not found", "data_batch_1"],
        ),
        "bad_value": (["fit", "--comhe.weight", "-1"], ["--comhe.weight", ">= 0", "-1"]),
        "bad_report_value": (["fit", "--report.every_n_epochs", "0"], ["--report.every_n_epochs", ">= 1", "got 0"]),
        "bad_type": (["fit", "--comhe.weight", "abc"], ["comhe.weight", "float", "abc"]),
        "nested_bad_type": (["fit", "--data.image_size", "x"], ["data", "image_size", "int", "x"]),
        "unknown_class": (["fit", "--data", "NoSuchDataModule"], ["data", "NoSuchDataModule"]),
        "missing_init_arg": (["fit", "--data", "CIFARDataModule"], ["data", "CIFARDataModule", "required", "root"]),
        "missing_config": (["fit", "--config", str(tmp_path / "nope.yaml")], ["config", "nope.yaml"]),
        "unknown_flag": (["fit", "--bogus", "1"], ["unrecognized", "--bogus"]),
        "fit_only_flag": (["validate", "--test_after_fit", "false"], ["unrecognized", "--test_after_fit"]),
        "energy_unknown": (["energy", "resnet1000"], ["unknown timm model 'resnet1000'"]),
    }[case]
    assert main(args) == 2
    _assert_one_line_error(2, capsys.readouterr().err, *needles)


def test_argument_error_line_follows_the_cause_chain():
    """The only reading of jsonargparse's text: each level's heading, then the innermost message, on one line."""
    from jsonargparse import ArgumentError

    from lightning_comhe.cli import _argument_error_line

    def chained(outer: BaseException, inner: BaseException) -> BaseException:
        outer.__cause__ = inner
        return outer

    innermost = ValueError("Expected a <class 'int'>. Got value: x")
    key = chained(TypeError('Parser key "image_size":\n  ' + str(innermost)), innermost)
    problem = chained(ValueError("Problem with given class_path 'a.B':\n  " + str(key)), key)
    union = chained(ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]"), problem)
    top = chained(ArgumentError(None, 'Parser key "data":\n  Does not validate ...\n  Given value: x'), union)
    assert _argument_error_line(top) == (
        """Parser key "data": Problem with given class_path 'a.B': Parser key "image_size": """
        "Expected a <class 'int'>. Got value: x"
    )
    assert _argument_error_line(ArgumentError(None, "unrecognized arguments: --x 1")) == "unrecognized arguments: --x 1"


def test_no_private_lightning_api():
    """The CLI modules touch no private attribute of Lightning or jsonargparse, and shadow none of theirs."""
    import ast

    import lightning_comhe.cli as cli
    from lightning_comhe.cli.data import CIFARDataModule, DigitsDataModule, ImageFolderDataModule

    package = Path(cli.__file__).parent
    files = [package / "__init__.py", package / "model.py", package / "report.py", package / "errors.py"]
    files += sorted((package / "data").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        defined |= {
            t.attr
            for n in ast.walk(tree)
            if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                assert node.attr in defined, f"{path.name}:{node.lineno}: private attribute .{node.attr}"
            if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("lightning_comhe"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name}:{node.lineno}: private import {private} from {node.module}"
    classes = [cli.ComheCLI, cli.ComheArgumentParser, TimmClassifier, ComheReport]
    classes += [DigitsDataModule, ImageFolderDataModule, CIFARDataModule]
    for cls in classes:
        bases = [b for b in cls.__mro__[1:] if not b.__module__.startswith("lightning_comhe")]
        for name in vars(cls):
            if name.startswith("_") and not name.startswith("__"):
                owner = next((b for b in bases if name in vars(b)), None)
                assert owner is None, f"{cls.__name__}.{name} overrides the private {owner.__qualname__}.{name}"


def test_fit_baseline_without_test(tmp_path, capsys):
    """``--comhe.enabled false --test_after_fit false``: no CoMHE callback, no test, the report still prints."""
    args = ["fit", "--comhe.enabled", "false", "--test_after_fit", "false", "--trainer.fast_dev_run", "true"]
    assert main([*args, "--trainer.default_root_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CoMHE report: TimmClassifier(resnet10t) on DigitsDataModule, no CoMHE" in out
    assert re.search(r"test accuracy\s+n/a", out) and re.search(r"final penalty\s+n/a", out)
    data = json.loads((tmp_path / "comhe_report.json").read_text())
    assert data["variant"] is None and data["test"] == {} and data["final_penalty"] is None


def test_no_layer_selected_is_one_line(tmp_path, capsys):
    args = ["fit", "--comhe.include", "no_such_layer", "--trainer.fast_dev_run", "true"]
    assert main([*args, "--trainer.default_root_dir", str(tmp_path)]) == 2
    _assert_one_line_error(2, capsys.readouterr().err, "No layer selected", "no_such_layer")


def test_traceback_on_request(monkeypatch):
    monkeypatch.setenv("COMHE_TRACEBACK", "1")
    with pytest.raises(Exception, match="unknown timm model"):
        main(["energy", "resnet1000"])


def test_pretrained_without_weights_is_clear(tmp_path):
    proc = run_comhe(["energy", "resnet10t", "--pretrained"], cwd=tmp_path, timeout=300, HF_HOME=str(tmp_path))
    _assert_one_line_error(proc.returncode, proc.stderr, "cannot load pretrained weights for 'resnet10t'")
