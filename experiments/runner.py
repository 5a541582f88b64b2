"""One training run of the experiments, and sweeps of them in worker processes.

Every run is a Lightning ``Trainer.fit`` of a small classifier with the :class:`~lightning_comhe.CoMHE` callback (no
callback for the baseline), followed by a plain evaluation of the final weights on the validation and test splits. A
run is fully described by a :class:`RunSpec` (a picklable dataclass), so sweeps can run in worker processes and every
number can be traced back to its seed and settings.
"""

import contextlib
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from experiments.data import DataSpec, load_splits, per_class_subset
from experiments.measures import evaluate, layer_energies, time_penalty
from experiments.models import build_model

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


@dataclass(frozen=True)
class TrainSpec:
    """The training budget, identical for every row of a table.

    Attributes:
        epochs: Training epochs (ignored when ``steps`` is set).
        lr: Initial SGD learning rate (cosine decay to 0 over the run, stepped every optimizer step).
        momentum: SGD momentum.
        weight_decay: SGD weight decay on every parameter (BN included, as the official code).
        width: Base width of the models.
        steps: Train for exactly this many optimizer steps instead of ``epochs`` (as many passes over the data as
            that takes; the cosine decay spans the steps). Low-data runs use it, so every size gets the same budget.
    """

    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    width: int = 16
    steps: int | None = None


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        arch: Architecture (:data:`ARCHS`).
        variant: ``"baseline"`` or a ``CoMHE`` variant.
        seed: Seed of the weights, the batch order, the augmentation and the regularizer's own generators.
        kappa_mult: Multiplier of the run's default κ (:func:`default_kappas`; hidden and classifier alike).
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


def default_kappas(variant: str, comhe: Iterable[Sequence[Any]] = ()) -> tuple[float, float]:
    r"""The library's default :math:`\kappa` of a run, ``(hidden, head)``, before its ``kappa_mult``.

    The values come from :func:`lightning_comhe.config.default_weights`, given the run's ``power`` and ``angular``
    when its ``CoMHE`` arguments set them (else the library's own defaults): 1 / 10, 0.1 / 1 for the angular powers
    ``s > 0``, and :data:`~lightning_comhe.config.PEER_DEFAULT_WEIGHTS` for the peers.

    Args:
        variant: A ``CoMHE`` variant (not ``"baseline"``).
        comhe: The run's extra ``CoMHE`` arguments as ``(name, value)`` pairs: :attr:`RunSpec.comhe`, or the lists
            of its JSON record.

    Returns:
        The default κ of the hidden layers and of the classifier.
    """
    from lightning_comhe.config import default_weights

    options = dict(comhe)
    return default_weights(variant, **{key: options[key] for key in ("power", "angular") if key in options})


def comhe_kwargs(spec: RunSpec, head: str) -> dict[str, Any] | None:
    """The ``CoMHE`` callback arguments of a run (``None`` for the baseline).

    κ is the run's :func:`default_kappas` times its ``kappa_mult``; an explicit ``weight`` or ``head_weight`` in
    :attr:`RunSpec.comhe` overrides it, like every other ``CoMHE`` argument there.

    Args:
        spec: The run.
        head: The classifier's module name, as seen from the LightningModule.
    """
    if spec.variant == "baseline":
        return None
    hidden, head_kappa = default_kappas(spec.variant, spec.comhe)
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
    per_class = spec.data.per_class
    train_set = splits.train if per_class is None else per_class_subset(splits.train, per_class, spec.seed)
    loader = DataLoader(
        train_set,
        batch_size=spec.data.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(spec.seed),
        drop_last=False,
    )
    trainer = Trainer(
        accelerator=spec.accelerator,
        devices=1,
        max_epochs=spec.train.epochs if spec.train.steps is None else -1,
        max_steps=-1 if spec.train.steps is None else spec.train.steps,
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
    """Run ``specs`` (in order of the returned list), in ``jobs`` worker processes when ``jobs > 1``.

    Args:
        specs: The runs.
        jobs: Worker processes (spawned; their stderr is silenced); ``<= 1`` runs in this process.
        progress: Called as ``progress(done, total, record)`` after each run.

    Returns:
        The record of each run (:func:`run`), in the order of ``specs``.
    """
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


def run_cached(
    specs: Sequence[RunSpec],
    cache: dict[RunSpec, dict[str, Any]],
    jobs: int = 1,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_many` through a cache: a spec already in ``cache`` (or twice in ``specs``) is trained once.

    The experiments of one sweep share their identical runs this way (a run is fully described by its spec).

    Args:
        specs: The runs.
        cache: ``{spec: record}``, filled with the new runs.
        jobs: Worker processes.
        progress: As in :func:`run_many` (called for the new runs only).

    Returns:
        The record of each spec, in the order of ``specs``.
    """
    missing = list(dict.fromkeys(spec for spec in specs if spec not in cache))
    for spec, record in zip(missing, run_many(missing, jobs, progress), strict=True):
        cache[spec] = record
    return [cache[spec] for spec in specs]


def print_progress(done: int, total: int, record: dict[str, Any]) -> None:
    """A one-line progress report."""
    s = record["spec"]
    print(
        f"[{done}/{total}] {s['arch']:>9} {s['variant']:>11} seed={s['seed']:<3} x{s['kappa_mult']:<5g} "
        f"val={record['val_error']:.2f}% test={record['test_error']:.2f}% ({record['fit_seconds']:.1f}s, "
        f"{record['step_ms']:.1f} ms/step)",
        flush=True,
    )
