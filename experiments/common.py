"""Shared pieces of the experiments: models, data, one training run, statistics, environment and result files.

Every run is a Lightning ``Trainer.fit`` of a small :class:`Classifier` with the :class:`~lightning_comhe.CoMHE`
callback (no callback for the baseline), followed by a plain evaluation of the final weights on the validation and
test splits. A run is fully described by a :class:`RunSpec` (a picklable dataclass), so sweeps can run in worker
processes and every number can be traced back to its seed and settings.
"""

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import shutil
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "experiments" / "results"
DEFAULT_DOC = REPO_ROOT / "docs" / "results.md"

ARCHS: tuple[str, ...] = ("cnn6", "cnn9", "resnet10t")
ARCH_LABELS = {"cnn6": "CNN-6", "cnn9": "CNN-9", "resnet10t": "ResNet-10t (timm)"}
#: Table rows, in the poster's order; "baseline" trains without the callback.
ROWS: tuple[str, ...] = (
    "baseline",
    "orthogonal",
    "orthonormal",
    "srip",
    "mhe",
    "half_mhe",
    "random",
    "angle",
    "adversarial",
)
ROW_LABELS = {
    "baseline": "Baseline",
    "orthogonal": "Orthogonal (SO)",
    "orthonormal": "Orthonormal",
    "srip": "SRIP",
    "mhe": "MHE",
    "half_mhe": "Half-space MHE",
    "random": "RP-CoMHE",
    "angle": "AP-CoMHE",
    "adversarial": "Adversarial CoMHE",
}
ENERGY_VARIANTS = ("mhe", "half_mhe", "random", "angle", "adversarial")


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------
class PlainCNN(nn.Module):
    """The poster's plain CNN-6 / CNN-9 (``algorithm.md`` §6.1), with a width parameter.

    Three stages of ``convs_per_stage`` 3×3 conv + BN + ReLU layers (SAME padding) with ``width``, ``2·width`` and
    ``4·width`` filters, each stage followed by 2×2 max-pooling; then ``fc`` (a VALID conv over the whole remaining
    map to ``4·width`` channels, no BN, no ReLU) and ``score`` (a 1×1 conv to the classes). CNN-6 has 2 convs per
    stage, CNN-9 has 3 (the official code's net with width 64). Conv weights are initialized N(0, 2/fan_in), BN with
    γ = 1, β = 0 and eps 1e-3, as in the official code. BN keeps PyTorch's momentum 0.1 (the official EMA decay 0.999
    needs far more steps than these short runs have).

    Args:
        convs_per_stage: 2 (CNN-6) or 3 (CNN-9).
        num_classes: Number of classes.
        image_size: Input side; must be divisible by 8.
        width: Filters of the first stage.
    """

    def __init__(self, convs_per_stage: int, num_classes: int, image_size: int, width: int = 16) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"PlainCNN needs an image size divisible by 8; got {image_size}.")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch, index = 3, 0
        for stage, out_ch in enumerate((width, 2 * width, 4 * width), start=1):
            for _ in range(convs_per_stage):
                index += 1
                layers[f"conv{index}"] = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
                layers[f"bn{index}"] = nn.BatchNorm2d(out_ch, eps=1e-3)
                layers[f"relu{index}"] = nn.ReLU(inplace=True)
                in_ch = out_ch
            layers[f"pool{stage}"] = nn.MaxPool2d(2)
        layers["fc"] = nn.Conv2d(in_ch, in_ch, image_size // 8)
        layers["score"] = nn.Conv2d(in_ch, num_classes, 1)
        layers["flatten"] = nn.Flatten()
        self.net = nn.Sequential(layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.in_channels * m.kernel_size[0] * m.kernel_size[1])))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.net(x)


def build_model(arch: str, num_classes: int, image_size: int, width: int) -> tuple[nn.Module, str]:
    """Build an architecture of the tables; returns the model and its classifier's module name (for ``head``).

    Args:
        arch: ``"cnn6"``, ``"cnn9"`` or ``"resnet10t"`` (timm's ResNet-10-T with stage widths ``width · (1, 2, 4,
            8)`` and stem width ``width / 2``; the timm default is ``width = 64``).
        num_classes: Number of classes.
        image_size: Input side.
        width: Base width.

    Raises:
        ValueError: For an unknown architecture.
    """
    if arch in ("cnn6", "cnn9"):
        return PlainCNN(2 if arch == "cnn6" else 3, num_classes, image_size, width), "net.score"
    if arch == "resnet10t":
        import timm

        channels = (width, 2 * width, 4 * width, 8 * width)
        return timm.create_model(
            "resnet10t", num_classes=num_classes, channels=channels, stem_width=max(4, width // 2)
        ), "fc"
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}.")


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """Which data set a run uses.

    Attributes:
        kind: ``"digits"`` (scikit-learn's built-in digits, fixed 70/15/15 split with seed 0), ``"cifar10"`` or
            ``"cifar100"`` (a local folder in the official python format, 10% of the training set held out for
            validation with seed 0, the official test set for testing).
        root: The CIFAR folder (ignored for digits).
        image_size: Input side (digits are resized from 8×8).
        batch_size: Training batch size.
        max_train_samples: Use only the first this many training samples (``None``: all).
        max_eval_samples: Evaluate on only the first this many validation / test samples (``None``: all).
    """

    kind: str = "digits"
    root: str | None = None
    image_size: int = 16
    batch_size: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    @property
    def label(self) -> str:
        """A short name for tables."""
        return {"digits": "digits", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(self.kind, self.kind)


@dataclass
class Splits:
    """The three splits of a data set and its number of classes."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int


_SPLITS_CACHE: dict[DataSpec, Splits] = {}


def _head(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


def load_splits(spec: DataSpec) -> Splits:
    """Load (once per process) the splits of ``spec``, reusing the ``comhe`` CLI's DataModules.

    Raises:
        ValueError: For an unknown data kind.
        lightning_comhe.cli.errors.DataError: For a missing or malformed CIFAR folder.
    """
    if spec in _SPLITS_CACHE:
        return _SPLITS_CACHE[spec]
    from lightning_comhe.cli.data import CIFARDataModule, DigitsDataModule

    if spec.kind == "digits":
        dm: Any = DigitsDataModule(image_size=spec.image_size, batch_size=spec.batch_size, seed=0)
    elif spec.kind in ("cifar10", "cifar100"):
        if spec.root is None:
            raise ValueError("CIFAR needs a folder: pass --cifar-root.")
        dm = CIFARDataModule(
            spec.root, variant=spec.kind, batch_size=spec.batch_size, val_split=0.1, seed=0, image_size=spec.image_size
        )
    else:
        raise ValueError(f"unknown data kind {spec.kind!r}.")
    dm.setup("fit")
    splits = Splits(
        train=_head(dm.train_set, spec.max_train_samples),
        val=_head(dm.val_set, spec.max_eval_samples),
        test=_head(dm.test_set, spec.max_eval_samples),
        num_classes=int(dm.num_classes),
    )
    _SPLITS_CACHE[spec] = splits
    return splits


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSpec:
    """The training budget, identical for every row of a table.

    Attributes:
        epochs: Training epochs.
        lr: Initial SGD learning rate (cosine decay to 0 over the run, stepped every optimizer step).
        momentum: SGD momentum.
        weight_decay: SGD weight decay on every parameter (BN included, as the official code).
        width: Base width of the models.
    """

    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        arch: Architecture (:data:`ARCHS`).
        variant: ``"baseline"`` or a ``CoMHE`` variant.
        seed: Seed of the weights, the batch order, the augmentation and the regularizer's own generators.
        kappa_mult: Multiplier of the variant's default κ (hidden and classifier alike).
        data: The data set.
        train: The training budget.
        comhe: Extra ``CoMHE`` arguments (e.g. ``projection_dim``, ``num_projections``).
        energy_every: Record the full-space energy of every regularized layer every this many steps (``None``: no).
        time_penalty: Also time the penalty alone (refresh + forward + backward) on the final weights.
        threads: ``torch.set_num_threads`` for this run.
        accelerator: Lightning accelerator (``"cpu"`` here; ``"auto"`` on a machine with a GPU).
    """

    arch: str
    variant: str
    seed: int
    kappa_mult: float = 1.0
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    comhe: tuple[tuple[str, Any], ...] = ()
    energy_every: int | None = None
    time_penalty: bool = False
    threads: int = 1
    accelerator: str = "cpu"


def default_kappas(variant: str) -> tuple[float, float]:
    """The library's default κ of a variant: ``(hidden, head)``."""
    from lightning_comhe.regularizer import PEER_DEFAULT_WEIGHTS

    if variant in PEER_DEFAULT_WEIGHTS:
        return PEER_DEFAULT_WEIGHTS[variant], PEER_DEFAULT_WEIGHTS[variant]
    return 1.0, 10.0


def comhe_kwargs(spec: RunSpec, head: str) -> dict[str, Any] | None:
    """The ``CoMHE`` callback arguments of a run (``None`` for the baseline)."""
    if spec.variant == "baseline":
        return None
    hidden, head_kappa = default_kappas(spec.variant)
    kwargs: dict[str, Any] = {
        "variant": spec.variant,
        "head": head,
        "weight": hidden * spec.kappa_mult,
        "head_weight": head_kappa * spec.kappa_mult,
        "seed": spec.seed,
        "log_every": 1_000_000,
    }
    kwargs.update(dict(spec.comhe))
    return kwargs


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available.*")
    warnings.filterwarnings("ignore", message=".*TPU available.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)`.*")


def _make_classifier(net: nn.Module, train: TrainSpec) -> Any:
    from lightning.pytorch import LightningModule

    class Classifier(LightningModule):
        """Cross-entropy training of ``net`` with SGD and a per-step cosine schedule."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
            x, y = batch[0], batch[1]
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(
                self.parameters(), lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay
            )
            total = max(1, int(self.trainer.estimated_stepping_batches))

            def cosine(step: int) -> float:
                return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Classifier()


def layer_energies(model: nn.Module, head: str, half_space: bool = False) -> dict[str, float]:
    """Hyperspherical energy (s = 2, chordal, unprojected) of every layer CoMHE would regularize.

    The energy of a layer is the mean over its neuron sets (one per conv group). ``half_space=False`` gives the
    full-space energy of the neurons ``W``, ``True`` the half-space energy of ``[W; -W]``.
    """
    from lightning_comhe import discover_layers, hyperspherical_energy

    out: dict[str, float] = {}
    with torch.no_grad():
        for layer in discover_layers(model, head=head).layers:
            values = [
                hyperspherical_energy(s.detach(), power=2, half_space=half_space).mean()
                for s in layer.neuron_sets()
                if s.shape[1] > 1
            ]
            if values:
                out[layer.name] = float(torch.stack(values).mean())
    return out


def _callbacks(spec: RunSpec, head: str, record: dict[str, Any]) -> list[Any]:
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Wall time of every training step (forward, penalty, backward, optimizer step)."""

        def __init__(self) -> None:
            self.start = 0.0
            self.times: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.times.append(time.perf_counter() - self.start)

    class EnergyTracker(Callback):
        """Full-space energy of each regularized layer at step 0, every ``every`` steps, and at the end."""

        def __init__(self, every: int) -> None:
            self.every = every

        def _record(self, pl_module: Any, step: int) -> None:
            for key, half in (("energy", False), ("energy_half", True)):
                for name, value in layer_energies(pl_module.net, head, half_space=half).items():
                    record[key].setdefault(name, []).append((step, value))

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._record(pl_module, 0)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step % self.every == 0:
                self._record(pl_module, trainer.global_step)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_step % self.every:
                self._record(pl_module, trainer.global_step)

    timer = StepTimer()
    record["_timer"] = timer
    callbacks: list[Any] = [timer]
    if spec.energy_every:
        record["energy"], record["energy_half"] = {}, {}
        callbacks.append(EnergyTracker(spec.energy_every))
    return callbacks


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 500) -> float:
    """Top-1 error (%) of ``model`` on ``dataset`` (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    wrong, total = 0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        wrong += int((model(x.to(device)).argmax(dim=1).cpu() != y).sum())
        total += len(y)
    return 100.0 * wrong / max(1, total)


def time_penalty(regularizer: Any, repeats: int = 10) -> float:
    """Mean seconds of one ``refresh`` + penalty forward + backward on the current weights."""
    params = [layer.module.weight for layer in regularizer.selection.layers]
    for p in params:
        p.grad = None
    regularizer.refresh(0.01)
    regularizer().penalty.backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        regularizer.refresh(0.01)
        regularizer().penalty.backward()
    elapsed = (time.perf_counter() - start) / repeats
    for p in params:
        p.grad = None
    return elapsed


def run(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one run; returns a JSON-friendly record.

    The record holds the spec, ``val_error`` and ``test_error`` (%, final weights), ``fit_seconds``, ``steps``,
    ``step_ms`` (median wall time of a training step, warm-up steps excluded), ``penalty_ms`` (with
    ``time_penalty``), and with ``energy_every`` ``energy`` (full-space) and ``energy_half`` (half-space), each
    ``{layer: [[step, energy], ...]}``.
    """
    from lightning.pytorch import Trainer, seed_everything

    from lightning_comhe import CoMHE

    _quiet()
    torch.set_num_threads(spec.threads)
    splits = load_splits(spec.data)
    seed_everything(spec.seed, workers=False, verbose=False)
    net, head = build_model(spec.arch, splits.num_classes, spec.data.image_size, spec.train.width)
    module = _make_classifier(net, spec.train)
    record: dict[str, Any] = {"spec": asdict(spec)}
    callbacks = _callbacks(spec, head, record)
    kwargs = comhe_kwargs(spec, f"net.{head}")  # module names as seen from the LightningModule
    comhe = CoMHE(**kwargs) if kwargs is not None else None
    if comhe is not None:
        callbacks.append(comhe)
    loader = DataLoader(
        splits.train,
        batch_size=spec.data.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(spec.seed),
        drop_last=False,
    )
    trainer = Trainer(
        accelerator=spec.accelerator,
        devices=1,
        max_epochs=spec.train.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    record["fit_seconds"] = time.perf_counter() - start
    record["steps"] = int(trainer.global_step)
    all_times = record.pop("_timer").times
    times = all_times[3:] if len(all_times) > 4 else all_times[1:]  # skip warm-up steps
    record["step_ms"] = 1000.0 * statistics.median(times) if times else float("nan")
    record["val_error"] = evaluate(net, splits.val)
    record["test_error"] = evaluate(net, splits.test)
    if spec.time_penalty and comhe is not None and comhe.regularizer is not None:
        record["penalty_ms"] = 1000.0 * time_penalty(comhe.regularizer)
    for key in ("energy", "energy_half"):
        if key in record:
            record[key] = {k: [[s, v] for s, v in pts] for k, pts in record[key].items()}
    return record


def _run_in_worker(spec: RunSpec) -> dict[str, Any]:
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115 - closed with the worker
        return run(spec)


def run_many(
    specs: Sequence[RunSpec], jobs: int = 1, progress: Callable[[int, int, dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Run ``specs`` (in order of the returned list), in ``jobs`` worker processes when ``jobs > 1``."""
    results: list[dict[str, Any]] = []
    if jobs <= 1:
        for i, spec in enumerate(specs):
            results.append(run(spec))
            if progress:
                progress(i + 1, len(specs), results[-1])
        return results
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for i, record in enumerate(pool.map(_run_in_worker, specs)):
            results.append(record)
            if progress:
                progress(i + 1, len(specs), record)
    return results


def print_progress(done: int, total: int, record: dict[str, Any]) -> None:
    """A one-line progress report."""
    s = record["spec"]
    print(
        f"[{done}/{total}] {s['arch']:>9} {s['variant']:>11} seed={s['seed']:<3} x{s['kappa_mult']:<5g} "
        f"val={record['val_error']:.2f}% test={record['test_error']:.2f}% ({record['fit_seconds']:.1f}s, "
        f"{record['step_ms']:.1f} ms/step)",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# statistics, environment, files
# ----------------------------------------------------------------------------------------------------------------
def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = list(values)
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def fmt_mean_std(values: Iterable[float], digits: int = 2) -> str:
    """``"m ± s"``."""
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def environment() -> dict[str, Any]:
    """Software versions, hardware and date of this run."""
    import lightning
    import numpy
    import sklearn
    import timm

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


def environment_markdown(env: dict[str, Any], command: str, seconds: float, threads: int, jobs: int) -> str:
    """A short Markdown paragraph: command, wall time, versions and hardware."""
    return (
        f"Command: `{command}` ({seconds / 60:.1f} min wall time, {jobs} worker process(es) × {threads} thread(s), "
        f"{env['date']}).  \n"
        f"Software: Python {env['python']}, torch {env['torch']}, lightning {env['lightning']}, timm {env['timm']}, "
        f"scikit-learn {env['scikit-learn']}.  \n"
        f"Hardware: {env['cpu']}, {env['cpu_count']} logical CPU(s), no GPU ({env['platform']})."
    )


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def update_doc_block(doc: Path, name: str, content: str) -> None:
    """Replace the generated block ``name`` of a Markdown file (appended at the end when absent).

    A block is the text between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``.
    """
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{content.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(doc, text)


def doc_figure(png: Path, doc: Path) -> str:
    """Copy a figure next to a Markdown page (``<page dir>/figures/``) and return its relative link.

    MkDocs only serves files under ``docs/``, so the pages link copies, not ``experiments/results/``.
    """
    target = doc.parent / "figures" / png.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, target)
    return f"figures/{png.name}"


def relpath(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when possible (for links in Markdown)."""
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)


def with_updates(spec: RunSpec, **changes: Any) -> RunSpec:
    """A copy of ``spec`` with some fields changed."""
    return replace(spec, **changes)


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
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


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported lazily: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (PNG, 110 dpi; parent folders created) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def experiment_parser(module: str, doc: str, common: bool = True, **kwargs: Any) -> argparse.ArgumentParser:
    """The argument parser of ``python -m experiments.<module>`` (description: ``doc``'s first line).

    With ``common`` it carries the arguments every training experiment shares (:func:`add_common_args`);
    ``kwargs`` go to :class:`argparse.ArgumentParser`.
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


def resolve_setup(args: Any, module: str, argv: Sequence[str], default_seeds: Sequence[int]) -> Setup:
    """Turn parsed common arguments into a :class:`Setup` (defaults depend on the data and on ``--quick``)."""
    defaults = dict(CIFAR_DEFAULTS if args.cifar_root else DIGITS_DEFAULTS)
    if args.quick:
        defaults.update(QUICK_DEFAULTS)

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


def setup_markdown(setup: Setup) -> str:
    """The data set and training budget, as one Markdown sentence."""
    d, t = setup.data, setup.train
    extra = f", first {d.max_train_samples} training samples" if d.max_train_samples else ""
    return (
        f"Data: {d.label} ({d.image_size}×{d.image_size}{extra}). Training: {t.epochs} epochs, batch {d.batch_size}, "
        f"SGD (momentum {t.momentum}, weight decay {t.weight_decay}) with learning rate {t.lr} and a per-step cosine "
        f"decay to 0, base width {t.width}; the final weights are evaluated (no early stopping)."
    )


def publish(
    setup: Setup,
    stem: str,
    results: dict[str, Any],
    plot_fn: Callable[[dict[str, Any], Path], None],
    intro: str,
    text: str,
    seconds: float,
    alt: str,
) -> None:
    """Write ``<stem>.{json,png,md}`` under ``setup.out``, refresh the ``docs/results.md`` block, print ``text``."""
    write_json(setup.out / f"{stem}.json", results)
    png = setup.out / f"{stem}.png"
    plot_fn(results, png)
    env = environment_markdown(results["environment"], setup.command, seconds, setup.threads, setup.jobs)

    def body(link: str) -> str:
        return f"{setup_markdown(setup)} {intro}\n\n{text}\n![{alt}]({link})\n\n{env}\n"

    write_text(setup.out / f"{stem}.md", body(png.name))
    if setup.doc is not None:
        update_doc_block(setup.doc, stem, body(doc_figure(png, setup.doc)))
    print(text)
