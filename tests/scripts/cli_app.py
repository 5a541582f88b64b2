"""A tiny LightningCLI application for the CoMHE CLI tests (``tests/test_cli_callback.py``).

Usage::

    python tests/scripts/cli_app.py fit --trainer.callbacks+=lightning_comhe.CoMHE --trainer.callbacks.variant=angle
    python tests/scripts/cli_app.py fit --config config.yaml
    python tests/scripts/cli_app.py instantiate --trainer.callbacks+=lightning_comhe.CoMHE ...   # run=False

After ``fit`` (or, with ``instantiate``, right after the objects are built) it prints one line
``COMHE_REPORT {json}`` with every CoMHE callback's arguments, the ``comhe/*`` metrics and the global step.
"""

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests` and the package

from lightning_comhe import CoMHE  # noqa: E402
from tests.helpers import TinyMLP, make_loader  # noqa: E402


class CLIModel(TinyMLP):
    """The tiny MLP of the callback tests (``net.0``, ``net.2`` hidden, ``net.4`` head)."""


class TinyData(LightningDataModule):
    """A fixed regression data set of ``num_batches`` batches of 4."""

    def __init__(self, num_batches: int = 4) -> None:
        super().__init__()
        self.num_batches = num_batches

    def train_dataloader(self) -> DataLoader:
        return make_loader(num_batches=self.num_batches)


def report(cli: LightningCLI) -> None:
    trainer = cli.trainer
    names = [p for p in inspect.signature(CoMHE.__init__).parameters if p != "self"]
    callbacks = [
        {"type": type(cb).__name__, **{n: getattr(cb, n) for n in names}}
        for cb in trainer.callbacks
        if isinstance(cb, CoMHE)
    ]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("comhe")}
    print(
        "COMHE_REPORT " + json.dumps({"callbacks": callbacks, "metrics": metrics, "global_step": trainer.global_step})
    )


class CLI(LightningCLI):
    def after_fit(self) -> None:
        report(self)


def main() -> None:
    run = len(sys.argv) < 2 or sys.argv[1] != "instantiate"
    if not run:
        del sys.argv[1]  # LightningCLI(run=False) parses the arguments without a subcommand
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    cli = CLI(CLIModel, TinyData, trainer_defaults=defaults, save_config_callback=None, run=run)
    if not run:
        report(cli)


if __name__ == "__main__":
    main()
