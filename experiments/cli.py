"""The command line shared by the experiment scripts: common arguments, their defaults, and the resolved setup."""

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.data import DataSpec
from experiments.publishing import DEFAULT_DOC, DEFAULT_OUT
from experiments.runner import TrainSpec

#: The training recipe of the digits tables (chosen once on the baseline's validation error: plain CNNs diverge at
#: learning rates 0.05 and 0.1). CIFAR uses 32×32 inputs and the paper's width 64.
DIGITS_DEFAULTS: dict[str, Any] = {"image_size": 16, "batch_size": 128, "lr": 0.02, "width": 16, "epochs": 10}
CIFAR_DEFAULTS: dict[str, Any] = {"image_size": 32, "batch_size": 128, "lr": 0.02, "width": 64, "epochs": 30}
QUICK_DEFAULTS: dict[str, Any] = {"epochs": 2, "max_train_samples": 384, "max_eval_samples": 200}


@dataclass
class Setup:
    """Everything a script needs from the common command-line arguments."""

    data: DataSpec
    train: TrainSpec
    seeds: list[int]
    jobs: int
    threads: int
    accelerator: str
    out: Path
    doc: Path | None
    quick: bool
    command: str


def experiment_parser(module: str, doc: str, common: bool = True, **kwargs: Any) -> argparse.ArgumentParser:
    """The argument parser of ``python -m experiments.<module>``.

    Args:
        module: The script's module name under ``experiments``.
        doc: The script's docstring; its first line is the description.
        common: Add the arguments every training experiment shares (:func:`add_common_args`).
        **kwargs: Passed to :class:`argparse.ArgumentParser`.
    """
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{module}", description=doc.split("\n")[0], **kwargs)
    if common:
        add_common_args(parser)
    return parser


def add_common_args(parser: Any) -> None:
    """Arguments shared by every experiment script (see each script's ``--help``)."""
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the pipeline (not the numbers)")
    parser.add_argument("--out", type=Path, default=None, help="result folder (default experiments/results[/quick])")
    parser.add_argument("--doc", type=Path, default=None, help="Markdown file to refresh (default docs/results.md)")
    parser.add_argument("--no-doc", action="store_true", help="do not refresh the generated blocks of --doc")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the reported runs")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (same for every row)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="initial SGD learning rate (cosine to 0)")
    parser.add_argument("--width", type=int, default=None, help="base width of the models")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--cifar-root", default=None, help="a local CIFAR folder (official python format)")
    parser.add_argument("--cifar", choices=["cifar10", "cifar100"], default="cifar10", help="which CIFAR")
    parser.add_argument("--max-train-samples", type=int, default=None, help="use only this many training samples")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on this many samples")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator ('auto' on a GPU machine)")


def resolve_setup(
    args: Any,
    module: str,
    argv: Sequence[str],
    default_seeds: Sequence[int],
    defaults: dict[str, Any] | None = None,
    quick_defaults: dict[str, Any] | None = None,
) -> Setup:
    """Turn parsed common arguments into a :class:`Setup` (defaults depend on the data and on ``--quick``).

    Args:
        args: The parsed arguments (with those of :func:`add_common_args`).
        module: The script's module, for the recorded command (``python -m <module> <argv>``).
        argv: The script's arguments, for the recorded command.
        default_seeds: The reported seeds when ``--seeds`` is absent (``--quick``: seed 0).
        defaults: The script's own digits defaults (default :data:`DIGITS_DEFAULTS`; CIFAR keeps
            :data:`CIFAR_DEFAULTS`).
        quick_defaults: The script's own ``--quick`` overrides (default :data:`QUICK_DEFAULTS`).
    """
    digits = DIGITS_DEFAULTS if defaults is None else defaults
    defaults = dict(CIFAR_DEFAULTS if args.cifar_root else digits)
    if args.quick:
        defaults.update(QUICK_DEFAULTS if quick_defaults is None else quick_defaults)

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return defaults.get(name) if value is None else value

    data = DataSpec(
        kind=args.cifar if args.cifar_root else "digits",
        root=str(Path(args.cifar_root).expanduser()) if args.cifar_root else None,
        image_size=pick("image_size"),
        batch_size=pick("batch_size"),
        max_train_samples=pick("max_train_samples"),
        max_eval_samples=pick("max_eval_samples"),
    )
    train = TrainSpec(epochs=pick("epochs"), lr=pick("lr"), width=pick("width"))
    seeds = list(args.seeds) if args.seeds else ([0] if args.quick else list(default_seeds))
    out = args.out if args.out is not None else (DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    doc = None if (args.quick or args.no_doc) else (args.doc or DEFAULT_DOC)
    command = " ".join(["python -m", module, *argv])
    return Setup(data, train, seeds, args.jobs, args.threads, args.accelerator, out, doc, args.quick, command)
