"""LightningCLI integration of the CoMHE callback, through a real CLI application in a subprocess.

``tests/scripts/cli_app.py`` is a tiny ``LightningCLI`` app (``TinyMLP`` + a data module). It prints one
``COMHE_REPORT {json}`` line with the arguments of every CoMHE callback the parser built and the ``comhe/*`` metrics
of the fit, so the tests check what the CLI really instantiated and what the callback really logged.
"""

import inspect
import json
import re
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

from lightning_comhe.callback import CoMHE
from lightning_comhe.regularizer import CoMHERegularizer
from tests.dist_helpers import REPO_ROOT, base_env, python_script
from tests.helpers import TinyMLP

TIMEOUT = 120  # seconds per CLI run; typical: 5-10 s
CALLBACK = "--trainer.callbacks+=lightning_comhe.CoMHE"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        python_script("cli_app.py", *args),
        cwd=REPO_ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _report(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("COMHE_REPORT ")]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0].removeprefix("COMHE_REPORT "))


def _expected_penalty(**kwargs: Any) -> float:
    """The penalty of the first optimizer step of the CLI app's model (``TinyMLP()``, SGD lr 0.05)."""
    reg = CoMHERegularizer(TinyMLP(), **kwargs)
    reg.refresh(0.05)
    return reg().penalty.item()


def _init_params() -> list[str]:
    return [name for name in inspect.signature(CoMHE.__init__).parameters if name != "self"]


def _docstring_args() -> dict[str, str]:
    """``{argument: description}`` from the ``Args:`` section of CoMHE's Google docstring."""
    lines = (inspect.getdoc(CoMHE) or "").splitlines()
    entries: dict[str, list[str]] = {}
    current = None
    for line in lines[lines.index("Args:") + 1 :]:
        if line and not line.startswith(" "):
            break  # the next section (Raises:)
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = [match.group(2)]
        elif current is not None and line.strip():
            entries[current].append(line.strip())
    return {name: " ".join(parts) for name, parts in entries.items()}


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_flags_select_the_variant_and_fit_logs_its_penalty() -> None:
    proc = _cli(
        "fit",
        CALLBACK,
        "--trainer.callbacks.variant=angle",
        "--trainer.callbacks.init_args.projection_dim=4",  # the long form works too
        "--trainer.callbacks.weight=0.5",
        "--trainer.callbacks.log_every=1",
        "--trainer.max_steps=1",
    )
    report = _report(proc)
    assert report["global_step"] == 1
    [cb] = report["callbacks"]
    assert cb["type"] == "CoMHE"
    assert (cb["variant"], cb["projection_dim"], cb["weight"], cb["log_every"]) == ("angle", 4, 0.5, 1)
    assert cb["head_weight"] is None and cb["inner_lr"] is None  # untouched arguments keep their defaults
    expected = _expected_penalty(variant="angle", projection_dim=4, weight=0.5)
    assert report["metrics"]["comhe/penalty"] == pytest.approx(expected, rel=1e-6)
    assert {"comhe/energy/net.0", "comhe/energy/net.2", "comhe/energy/net.4"} <= report["metrics"].keys()


def test_yaml_class_path_init_args(tmp_path: Path) -> None:
    """Two instances from a YAML config: random projections on the hidden layers, full MHE on the whole net."""
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  max_steps: 1
  callbacks:
    - class_path: lightning_comhe.CoMHE
      init_args:
        variant: random
        projection_dim: 4
        num_projections: 2
        include: ['net\\.0', 'net\\.2']
        head: null
        seed: 3
        name: hidden
    - class_path: lightning_comhe.CoMHE
      init_args:
        variant: mhe
        name: full
"""
    )
    report = _report(_cli("fit", "--config", str(config)))
    hidden, full = report["callbacks"]
    assert (hidden["variant"], hidden["projection_dim"], hidden["num_projections"]) == ("random", 4, 2)
    assert (hidden["include"], hidden["head"], hidden["seed"], hidden["name"]) == (
        ["net\\.0", "net\\.2"],
        None,
        3,
        "hidden",
    )
    assert (full["variant"], full["name"], full["head"]) == ("mhe", "full", "auto")
    metrics = report["metrics"]
    expected_hidden = _expected_penalty(
        variant="random", projection_dim=4, num_projections=2, include=["net\\.0", "net\\.2"], head=None, seed=3
    )
    assert metrics["comhe/hidden/penalty"] == pytest.approx(expected_hidden, rel=1e-6)
    assert metrics["comhe/full/penalty"] == pytest.approx(_expected_penalty(variant="mhe"), rel=1e-6)


def test_bad_choice_is_rejected_by_the_parser() -> None:
    proc = _cli("instantiate", CALLBACK, "--trainer.callbacks.variant=bogus")
    assert proc.returncode != 0
    assert "COMHE_REPORT" not in proc.stdout  # nothing was instantiated
    message = proc.stderr
    assert "error:" in message and "variant" in message and "bogus" in message, message[-3000:]
    allowed = typing.get_args(inspect.signature(CoMHE.__init__).parameters["variant"].annotation)
    assert {"mhe", "half_mhe", "random", "angle", "adversarial"} <= set(allowed)
    for value in allowed:
        assert f"'{value}'" in message, f"{value!r} missing from the error message:\n{message[-3000:]}"
    assert "Traceback" not in message  # a parser message, not a crash


def test_help_documents_every_argument() -> None:
    proc = _cli("fit", "--trainer.callbacks.help", "lightning_comhe.CoMHE")
    assert proc.returncode == 0, proc.stderr[-3000:]
    help_text = proc.stdout
    documented = _docstring_args()
    params = _init_params()
    assert params, "CoMHE.__init__ has no arguments?"
    squashed = _squash(help_text)
    for name in params:
        assert name in documented, f"`{name}` is not documented in CoMHE's Args: section"
        assert f"--trainer.callbacks.{name}" in help_text, f"`{name}` missing from the CLI help"
        assert _squash(documented[name]) in squashed, f"the help of `{name}` lacks its description {documented[name]!r}"
    # Literal choices are listed, and defaults are shown
    assert "{mhe,half_mhe,random,angle,adversarial" in help_text
    assert "default: random" in help_text


def test_instantiate_without_running_builds_the_callback() -> None:
    """``LightningCLI(run=False)``: every flag reaches the instance; nothing is trained."""
    report = _report(
        _cli(
            "instantiate",
            CALLBACK,
            "--trainer.callbacks.variant=adversarial",
            "--trainer.callbacks.inner_steps=3",
            "--trainer.callbacks.inner_lr=0.01",
            "--trainer.callbacks.lookahead=second",
            "--trainer.callbacks.power=a1",
            "--trainer.callbacks.exclude=net\\.4",
            "--trainer.callbacks.head=null",
        )
    )
    [cb] = report["callbacks"]
    assert report["global_step"] == 0 and report["metrics"] == {}
    assert (cb["variant"], cb["inner_steps"], cb["inner_lr"], cb["lookahead"]) == ("adversarial", 3, 0.01, "second")
    assert (cb["power"], cb["exclude"], cb["head"]) == ("a1", "net\\.4", None)
    # the same arguments given directly build an equal callback
    direct = CoMHE(
        variant="adversarial",
        inner_steps=3,
        inner_lr=0.01,
        lookahead="second",
        power="a1",
        exclude="net\\.4",
        head=None,
    )
    assert {k: v for k, v in cb.items() if k != "type"} == {n: getattr(direct, n) for n in _init_params()}
