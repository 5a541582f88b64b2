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

:class:`ComheCLI` uses LightningCLI's public extension points only: ``parser_class`` and ``parser_kwargs`` (a
parser that knows its subcommand), ``add_arguments_to_parser`` (the ``comhe`` and ``report`` groups as plain,
not instantiated class arguments, ``--comhe.enabled``, ``--test_after_fit`` on ``fit``, the data -> model links),
``parse_arguments``, ``before_instantiate_classes`` (builds the two callbacks), ``instantiate_trainer(**kwargs)``
(adds them after ``--trainer.callbacks``) and ``after_fit``.
"""

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

if importlib.util.find_spec("jsonargparse") is None:  # the first import that would fail without the extra
    raise ModuleNotFoundError(
        "the `comhe` command needs the `cli` extra (jsonargparse, timm, torchvision, scikit-learn, matplotlib): "
        'pip install "lightning-comhe[cli]"',
        name="jsonargparse",
    )

from jsonargparse import ArgumentError, Namespace  # noqa: E402
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_comhe.callback import CoMHE
from lightning_comhe.cli.data import CIFARDataModule, ClassificationDataModule, DigitsDataModule, ImageFolderDataModule
from lightning_comhe.cli.errors import CLIError, ConfigError, DataError, DataNotFoundError, ModelError
from lightning_comhe.cli.model import SGD_DEFAULTS, TimmClassifier, create_timm_model
from lightning_comhe.cli.report import ComheReport

__all__ = [
    "CIFARDataModule",
    "CLIError",
    "ClassificationDataModule",
    "ComheArgumentParser",
    "ComheCLI",
    "ComheReport",
    "ConfigError",
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
_EPILOG = (
    "Also: `comhe energy MODEL_OR_CHECKPOINT`, the per-layer hyperspherical energy of a timm model or a `comhe fit` "
    "checkpoint next to that of random neurons (options: `comhe energy --help`)."
)


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


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _import_class(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _refuses(cls: type, kwargs: dict[str, Any]) -> bool:
    try:
        cls(**kwargs)
    except (MisconfigurationException, ValueError):
        return True
    return False


def _build_callback(group: str, cls: type[Callback], arguments: Namespace | None) -> Callback:
    """``cls(**arguments)``; a refused value becomes a :class:`ConfigError` that names the flag.

    The flag is found by trying each argument that differs from its default on its own (``--comhe.weight: ...``);
    when only a combination is refused, all of the changed arguments are named.
    """
    kwargs = arguments.as_dict() if isinstance(arguments, Namespace) else dict(arguments or {})
    try:
        return cls(**kwargs)
    except (MisconfigurationException, ValueError) as err:
        params = inspect.signature(cls).parameters
        changed = [k for k, v in kwargs.items() if k in params and not _same(v, params[k].default)]
        named = [k for k in changed if _refuses(cls, {k: kwargs[k]})] or changed
        flags = ", ".join(f"--{group}.{k}" for k in named) or f"--{group}.*"
        raise ConfigError(f"{flags}: {_one_line(err)}") from err


def _same(value: Any, default: Any) -> bool:
    try:
        return bool(value == default) and type(value) is type(default)
    except Exception:  # noqa: BLE001 - an odd __eq__: treat as changed
        return False


class ComheArgumentParser(LightningArgumentParser):
    """A :class:`~lightning.pytorch.cli.LightningArgumentParser` that knows which subcommand it parses.

    :class:`ComheCLI` passes ``comhe_subcommand`` through LightningCLI's ``parser_kwargs`` (``{"fit":
    {"comhe_subcommand": "fit"}, ...}``), so that ``add_arguments_to_parser`` can tell the parsers apart.

    Args:
        *args: Positional arguments of :class:`~lightning.pytorch.cli.LightningArgumentParser`.
        comhe_subcommand: The subcommand this parser parses; ``None`` for the main parser (and for the parsers
            jsonargparse creates internally).
        **kwargs: Keyword arguments of :class:`~lightning.pytorch.cli.LightningArgumentParser`.
    """

    def __init__(self, *args: Any, comhe_subcommand: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.comhe_subcommand = comhe_subcommand


class ComheCLI(LightningCLI):
    """LightningCLI with :class:`TimmClassifier`, the bundled data modules, CoMHE and the report as groups.

    ``main()`` builds it; build it yourself with ``ComheCLI(args=[...])`` from Python (``run=False`` to only
    instantiate the classes). A ``parser_class`` given as keyword argument must subclass
    :class:`ComheArgumentParser`; ``parser_kwargs`` are merged into the command's own.

    Attributes:
        comhe: The :class:`~lightning_comhe.CoMHE` callback built from ``--comhe.*`` (``None`` with
            ``--comhe.enabled false``); the trainer gets it after the ``--trainer.callbacks``.
        report: The :class:`~lightning_comhe.cli.report.ComheReport` built from ``--report.*``.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        parser_kwargs: dict[str, Any] = {
            "prog": "comhe",
            "description": _DESCRIPTION,
            "epilog": _EPILOG,
            "exit_on_error": False,
        }
        for sub in self.subcommands():
            parser_kwargs[sub] = {"exit_on_error": False, "comhe_subcommand": sub}
        for key, value in kwargs.pop("parser_kwargs", {}).items():
            if key in parser_kwargs and isinstance(value, dict):
                parser_kwargs[key] = {**parser_kwargs[key], **value}
            else:
                parser_kwargs[key] = value
        options: dict[str, Any] = {
            "model_class": TimmClassifier,
            "datamodule_class": LightningDataModule,
            "subclass_mode_data": True,
            "trainer_defaults": dict(TRAINER_DEFAULTS),
            "seed_everything_default": 0,
            "auto_configure_optimizers": False,
            "parser_class": ComheArgumentParser,
            "parser_kwargs": parser_kwargs,
            "save_config_kwargs": {"overwrite": True},
        }
        options.update(kwargs)
        self.comhe: CoMHE | None = None
        self.report: ComheReport | None = None
        self._comhe_parsers: dict[str | None, LightningArgumentParser] = {}  # by subcommand (None: no subcommands)
        super().__init__(args=args, run=run, **options)

    def _comhe_section(self, config: Namespace) -> Namespace:
        """The part of ``config`` of the chosen subcommand (all of it without subcommands)."""
        subcommand = config.get("subcommand")
        return config[subcommand] if subcommand else config

    # ------------------------------------------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``comhe`` and ``report`` groups, ``--test_after_fit``, the data default and the data -> model links.

        The two groups are plain class arguments (``instantiate=False``): their values stay flat
        (``--comhe.variant``, ``comhe: {variant: ...}`` in YAML) next to ``--comhe.enabled``, and
        :meth:`before_instantiate_classes` builds the callbacks.
        """
        subcommand = getattr(parser, "comhe_subcommand", None)
        self._comhe_parsers[subcommand] = parser
        parser.add_class_arguments(CoMHE, "comhe", instantiate=False, fail_untyped=False, sub_configs=True)
        parser.add_argument(
            "--comhe.enabled",
            type=bool,
            default=True,
            help="Add the CoMHE callback (false: train the same run without regularization, as a baseline).",
        )
        parser.add_class_arguments(ComheReport, "report", instantiate=False, fail_untyped=False, sub_configs=True)
        if subcommand == "fit":
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="Run `trainer.test` on the data module's test split after fit, then print the CoMHE report.",
            )
        parser.set_defaults(
            {
                "data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__name__}"},
                "model.optimizer": {"class_path": "torch.optim.SGD", "init_args": dict(SGD_DEFAULTS)},
            }
        )
        parser.link_arguments("data", "model.num_classes", compute_fn=_num_classes_of, apply_on="instantiate")
        parser.link_arguments("data", "model.in_chans", compute_fn=_in_chans_of, apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; when ``--data`` selects another class than the default, parse again on that class's defaults.

        jsonargparse keeps same-named ``init_args`` when the class changes, so without the second parse
        ``--data ImageFolderDataModule`` would inherit the digits' ``image_size=32`` instead of its own default.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        chosen = getattr(self._comhe_section(self.config).get("data"), "class_path", None)
        target = self._comhe_parsers.get(subcommand)
        if chosen is None or target is None or _import_class(chosen) is DigitsDataModule:
            return
        target.set_defaults({"data": {"class_path": chosen}})
        super().parse_arguments(parser, args)

    # ------------------------------------------------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Build the CoMHE callback (unless ``--comhe.enabled false``) and the report, before the model and data.

        Raises:
            ConfigError: When CoMHE or the report refuses a value (``comhe: `weight` must be ..., got -1.0.``).
        """
        section = self._comhe_section(self.config)
        comhe_args = section.get("comhe")
        comhe_args = comhe_args.clone() if isinstance(comhe_args, Namespace) else Namespace()
        enabled = comhe_args.pop("enabled", True)
        self.comhe = _build_callback("comhe", CoMHE, comhe_args) if enabled else None
        self.report = _build_callback("report", ComheReport, section.get("report"))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with the CoMHE callback and the report after the configured ``--trainer.callbacks``.

        Args:
            kwargs: Trainer arguments that override the configured ones (``callbacks`` too: then the CoMHE callback
                and the report follow those).
        """
        if "callbacks" in kwargs:
            callbacks = kwargs.pop("callbacks")
        else:
            callbacks = (self._comhe_section(self.config_init).get("trainer") or Namespace()).get("callbacks")
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        ours = [cb for cb in (self.comhe, self.report) if cb is not None]
        return super().instantiate_trainer(callbacks=[*callbacks, *ours], **kwargs)

    def after_fit(self) -> None:
        """Test the final weights (``--test_after_fit``), then print the CoMHE report (rank 0)."""
        if self._comhe_section(self.config).get("test_after_fit", True) and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        report = self.report
        if report is not None and report.history and self.trainer.is_global_zero:
            print(report.render(), flush=True)


# ----------------------------------------------------------------------------------------------------------------
def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its causes / contexts, outermost first, without repeats."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _argument_error_line(err: ArgumentError) -> str:
    """A jsonargparse error in one line: the headings along its ``raise ... from`` chain, then the innermost message.

    jsonargparse nests its errors (a key, a class inside ``--data``, a type inside a Union) and chains each level to
    the next with ``raise ... from``. A level's heading is what it puts in front of its cause's message
    (``Parser key "comhe.variant":``), or else its first line when that ends with ``:`` (``Problem with given
    class_path '...':``); the innermost exception states the problem and the value (``Expected a
    typing.Literal['mhe', ...]. Got value: randomm``). Nothing else of the text is interpreted.
    """
    levels: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in levels):
        levels.append(current)
        current = current.__cause__
    texts = [_one_line(level) for level in levels]
    headings: list[str] = []
    for i, level in enumerate(levels[:-1]):
        text, inner = texts[i], texts[i + 1]
        if inner and text.endswith(inner):
            heading = text[: len(text) - len(inner)].strip()
        else:
            lines = str(level).strip().splitlines()
            heading = lines[0].strip() if lines and lines[0].strip().endswith(":") else ""
        if heading and heading not in headings:
            headings.append(heading)
    return " ".join([*headings, texts[-1] or "invalid arguments"])


def _user_message(err: BaseException) -> str | None:
    """The one-line message of a user error in ``err``'s chain; ``None`` for anything else (a bug: traceback)."""
    chain = _chain(err)
    for level in chain:  # the most specific: our own errors (data, model, argument groups)
        if isinstance(level, CLIError):
            return _one_line(level)
    for level in chain:  # a configuration the callback or Lightning refuses (e.g. no layer selected, no GPU)
        if isinstance(level, MisconfigurationException):
            return _one_line(level)
    for level in chain:  # the parser's: an unknown flag, a bad type or choice, an unknown class
        if isinstance(level, ArgumentError):
            return _argument_error_line(level)
    return None


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
        message = _user_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
