"""The ``comhe`` command: LightningCLI for timm classifiers with CoMHE, plus ``comhe energy``.

``comhe fit`` with no arguments trains a small timm ResNet (``resnet10t``) with RP-CoMHE on scikit-learn's
handwritten digits (built in, no download) on a laptop CPU in a few minutes, tests it, and prints a summary table
(test accuracy, final penalty, full-space energy of each regularized layer at start and end); the run folder gets a
PNG plot. Everything is a LightningCLI argument, settable from flags or YAML (``--config``):

* ``--model.*``: :class:`~lightning_comhe.cli.model.TimmClassifier` (``--model.model_name``,
  ``--model.pretrained``, ``--model.optimizer``, ``--model.lr_scheduler``, ...). ``num_classes`` and ``in_chans``
  come from the data module.
* ``--data``: :class:`~lightning_comhe.cli.data.DigitsDataModule` (default), ``ImageFolderDataModule``,
  ``CIFARDataModule``, or any LightningDataModule with a ``num_classes`` attribute.
* ``--comhe.*``: the :class:`~lightning_comhe.CoMHE` callback (``--comhe.variant angle``, ``--comhe.weight``, ...).
  ``--comhe.enabled false`` trains the same run without it (a baseline).
* ``--report.*``: the :class:`~lightning_comhe.cli.report.ComheReport` callback (plot and table).
* ``--trainer.*``: the Lightning Trainer; ``--test_after_fit false`` skips the test at the end of ``fit``.

Bad input (an unknown model, a missing or malformed data folder, a bad choice) gives a one-line ``error: ...`` on
stderr and exit status 2; set ``COMHE_TRACEBACK=1`` for the full traceback.
"""

import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_comhe.callback import CoMHE
from lightning_comhe.cli.data import CIFARDataModule, ClassificationDataModule, DigitsDataModule, ImageFolderDataModule
from lightning_comhe.cli.errors import CLIError, DataError, DataNotFoundError, ModelError
from lightning_comhe.cli.model import SGD_DEFAULTS, TimmClassifier, create_timm_model
from lightning_comhe.cli.report import ComheReport

__all__ = [
    "CIFARDataModule",
    "CLIError",
    "ClassificationDataModule",
    "ComheCLI",
    "ComheReport",
    "DataError",
    "DataNotFoundError",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ModelError",
    "TimmClassifier",
    "TRAINER_DEFAULTS",
    "create_timm_model",
    "main",
]

#: Trainer defaults of ``comhe fit``: the default run (resnet10t, digits at 32x32) takes about a minute on 2 CPU cores.
TRAINER_DEFAULTS: dict[str, Any] = {"max_epochs": 6, "log_every_n_steps": 10}

_DESCRIPTION = (
    "Train timm image classifiers with (compressive) minimum hyperspherical energy regularization. "
    "`comhe fit` trains the built-in default; `comhe energy MODEL_OR_CHECKPOINT` measures a model's energy."
)
_LIBRARY_PACKAGE = str(Path(__file__).resolve().parents[1]) + os.sep


def _num_classes_of(data: Any) -> int:
    num = getattr(data, "num_classes", None)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise DataError(
            f"the data module {type(data).__name__} has no `num_classes` attribute (an int >= 1), which the comhe "
            "command passes to the model; set it in its __init__."
        )
    return num


def _in_chans_of(data: Any) -> int:
    num = getattr(data, "in_chans", 3)
    return num if isinstance(num, int) and not isinstance(num, bool) and num >= 1 else 3


class ComheCLI(LightningCLI):
    """LightningCLI with :class:`TimmClassifier`, the bundled data modules, CoMHE and the report as groups.

    ``main()`` builds it; build it yourself with ``ComheCLI(args=[...])`` from Python (``run=False`` to only
    instantiate the classes).
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        parser_kwargs: dict[str, Any] = {"prog": "comhe", "description": _DESCRIPTION, "exit_on_error": False}
        for sub in self.subcommands():
            parser_kwargs[sub] = {"exit_on_error": False}
        options: dict[str, Any] = {
            "model_class": TimmClassifier,
            "datamodule_class": LightningDataModule,
            "subclass_mode_data": True,
            "trainer_defaults": dict(TRAINER_DEFAULTS),
            "seed_everything_default": 0,
            "auto_configure_optimizers": False,
            "parser_kwargs": parser_kwargs,
            "save_config_kwargs": {"overwrite": True},
        }
        options.update(kwargs)
        self._comhe_enabled = True
        super().__init__(args=args, run=run, **options)

    # ------------------------------------------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``comhe`` and ``report`` groups, the data default and the data -> model links."""
        parser.add_lightning_class_args(CoMHE, "comhe")
        parser.add_argument(
            "--comhe.enabled",
            type=bool,
            default=True,
            help="Add the CoMHE callback (false: train the same run without regularization, as a baseline).",
        )
        parser.add_lightning_class_args(ComheReport, "report")
        parser.set_defaults(
            {
                "data": {"class_path": f"{DigitsDataModule.__module__}.DigitsDataModule"},
                "model.optimizer": {"class_path": "torch.optim.SGD", "init_args": dict(SGD_DEFAULTS)},
            }
        )
        parser.link_arguments("data", "model.num_classes", compute_fn=_num_classes_of, apply_on="instantiate")
        parser.link_arguments("data", "model.in_chans", compute_fn=_in_chans_of, apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="Run `trainer.test` on the data module's test split after fit, then print the CoMHE report.",
            )
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        from lightning_comhe.cli.energy_cmd import build_parser

        # only for `comhe --help`: `main()` runs `comhe energy` before LightningCLI sees it
        subcommands = parser._subcommands_action
        subcommands.add_subcommand("energy", build_parser(prog="comhe energy"), help=build_parser.__doc__)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; when ``--data`` selects another class than the default, parse again on that class's defaults.

        jsonargparse keeps same-named ``init_args`` when the class changes, so without the second parse
        ``--data ImageFolderDataModule`` would inherit the digits' ``image_size=32`` instead of its own default.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else self.config
        chosen = getattr(section.get("data"), "class_path", None)
        if chosen is None or chosen.rsplit(".", 1)[-1] == DigitsDataModule.__name__:
            return
        target = self._subcommand_parsers[subcommand] if subcommand else parser
        target.set_defaults({"data": {"class_path": chosen}})
        super().parse_arguments(parser, args)

    # ------------------------------------------------------------------------------------------------------------
    def _section(self, config: Namespace) -> Namespace:
        return config[self.subcommand] if self.subcommand else config

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does, without the ``comhe.enabled`` switch (not a CoMHE argument)."""
        config = self.config.clone()
        section = self._section(config)
        self._comhe_enabled = bool(section.get("comhe.enabled", True))
        if "comhe.enabled" in section:
            del section["comhe.enabled"]
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if not self._comhe_enabled:
            comhe = self._get(self.config_init, "comhe")
            callbacks = [cb for cb in callbacks if cb is not comhe]
        return super()._instantiate_trainer(config, callbacks)

    @property
    def report(self) -> ComheReport | None:
        """The report callback of the trainer."""
        return next((cb for cb in self.trainer.callbacks if isinstance(cb, ComheReport)), None)

    def after_fit(self) -> None:
        """Test the final weights (``--test_after_fit``), then print the CoMHE report (rank 0)."""
        if self._section(self.config).get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        report = self.report
        if report is not None and report.history and self.trainer.is_global_zero:
            print(report.render(), flush=True)


# ----------------------------------------------------------------------------------------------------------------
_LITERAL_RE = re.compile(r"Expected an? typing\.Literal\[(.*)\]\. Got value: (.*)")


def _one_line(message: str) -> str:
    """Condense a (multi-line, nested) jsonargparse error into one line with the key, the problem and the value."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    head, body = lines[0].rstrip(":"), lines[1:]
    if not body:
        return _LITERAL_RE.sub(r"expected one of \1; got \2", head)
    given = next((line[len("Given value: ") :] for line in body if line.startswith("Given value: ")), None)
    detail = None
    for i, line in enumerate(body):
        if "Problem with given class_path" in line:  # the nested parser's own error is the most specific
            skip = ("- ", "Given value", "Subtypes", "Errors")
            nested = [x for x in body[i + 1 :] if not x.startswith(skip)]
            detail = " ".join(nested[:2]) if nested else None
            given = None
            break
    if detail is None:
        errors = [line[2:] for line in body if line.startswith("- ")]
        errors = [
            e for e in errors if "NoneType" not in e and not e.startswith(("Does not validate", "Expected a path"))
        ]
        if errors and errors[0].startswith("Expected a dot import path string"):
            detail = f"unknown class {given!r}: give the name of an imported class or its full import path"
            given = None
        elif errors:
            detail = "; ".join(errors)
        else:
            detail = body[0]
    text = _LITERAL_RE.sub(r"expected one of \1; got \2", f"{head}: {detail}")
    if given and given not in text:
        text += f" (got {given})"
    return text


def _user_error(err: BaseException) -> BaseException | None:
    """The user-facing error in ``err``'s cause chain: a CLIError, or a configuration error raised by this library."""
    seen: set[int] = set()
    current: BaseException | None = err
    found: BaseException | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CLIError):
            return current
        if found is None and isinstance(current, (MisconfigurationException, ValueError, TypeError)):
            frames = traceback.extract_tb(current.__traceback__)
            if frames and frames[-1].filename.startswith(_LIBRARY_PACKAGE):
                found = current
        current = current.__cause__ or current.__context__
    return found


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``comhe`` console script.

    Args:
        args: Command-line arguments without the program name; ``None``: ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 2 for a user error (printed as one ``error: ...`` line on stderr).
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get("COMHE_TRACEBACK", "") not in ("", "0")
    try:
        if argv and argv[0] == "energy":
            from lightning_comhe.cli.energy_cmd import energy_main

            return energy_main(argv[1:])
        if not argv:
            argv = ["--help"]
        # LightningCLI reads sys.argv (and DDP relaunches the command from it): make it this command line
        saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "comhe", *argv]
        try:
            ComheCLI(args=None)
        finally:
            sys.argv = saved
        return 0
    except Exception as err:
        if debug:
            raise
        user_error = _user_error(err)
        if user_error is not None:
            message = str(user_error) if isinstance(user_error, CLIError) else _one_line(str(user_error))
        elif isinstance(err, ArgumentError):
            message = _one_line(str(err))
        else:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
