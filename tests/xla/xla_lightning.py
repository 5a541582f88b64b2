"""Lightning pieces of the XLA tests: an accelerator for PJRT's CPU client, a tiny module, probes, one ``fit`` helper.

Imported by the test modules of this folder after their ``pytest.importorskip("torch_xla")``.
"""

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.accelerators import XLAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceXLAStrategy
from torch import Tensor
from torch.utils.data import DataLoader
from xla_helpers import CPU, DEVICE, cpu_state, delta, make_dataset, make_net, xla_counts

from lightning_comhe import CoMHE

#: Samples per epoch and batch size: 4 optimizer steps per epoch.
SAMPLES, BATCH = 32, 8
STEPS_PER_EPOCH = SAMPLES // BATCH
#: Steps after which a Lightning run on XLA compiles nothing any more: the first epoch and the first step of the
#: second. The first step after an epoch boundary compiles one or two graphs once, as for any module that logs a
#: tensor with ``self.log(on_step=True)`` without CoMHE (measured: 1 1 0 0 1 0 ... graphs per step): Lightning's
#: logging, which CoMHE uses for ``comhe/penalty``.
WARM_UP = STEPS_PER_EPOCH + 1

for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class CPUXLAAccelerator(XLAAccelerator):
    """Lightning's ``XLAAccelerator`` on PJRT's CPU client: only the "no TPU here" check is lifted.

    Lightning counts XLA devices as TPU chips on the PCI bus: none here, so ``is_available()`` is false and
    ``Trainer(accelerator="tpu")`` refuses to start. This subclass reports one device; everything else (the
    device, ``SingleDeviceXLAStrategy``, ``XLAPrecision``, ``XLACheckpointIO``) is Lightning's own.
    """

    @staticmethod
    def is_available() -> bool:
        """PJRT's CPU client is always there."""
        return True

    @staticmethod
    def auto_device_count() -> int:
        """One device (``xla:0``)."""
        return 1


class XLANet(LightningModule):
    """:func:`xla_helpers.make_net` with an MSE loss and plain SGD on :data:`SAMPLES` fixed samples."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.net = make_net()
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(SAMPLES), batch_size=BATCH, shuffle=False)


class StepProbe(Callback):
    """Records ``xla_counts()`` at the start of training and after each batch (after Lightning's ``mark_step``).

    It also runs Python's cyclic garbage collector before each optimizer step, i.e. before the step's graph is cut:
    a penalty step leaves reference cycles behind (see ``test_xla_compile.py``), and whether the collector happens to
    free them before the cut decides which tensors the graph outputs. Uncollected, the graphs vary from step to step
    at the collector's whim (observed: one or two extra compilations in 12 steps, at unpredictable steps).
    """

    def __init__(self, on_xla: bool, collect: bool = True) -> None:
        self.on_xla = on_xla
        self.collect = collect
        self.start: dict[str, int] = {}
        self.counts: list[dict[str, int]] = []

    def on_train_start(self, *args: Any) -> None:
        if self.on_xla:
            self.start = xla_counts()

    def on_before_optimizer_step(self, *args: Any) -> None:
        if self.collect:
            gc.collect()

    def on_train_batch_end(self, *args: Any) -> None:
        if self.on_xla:
            self.counts.append(xla_counts())


class PenaltyPathProbe:
    """Two callbacks around ``CoMHE`` in the callback list: the ``xla_counts()`` growth of its ``on_before_backward``.

    Lightning calls the callbacks' hooks in list order, so ``[probe.before, comhe, probe.after]`` brackets exactly
    the callback's penalty path (refresh, penalty, its addition to the loss, logging), once per batch.
    """

    def __init__(self) -> None:
        self.deltas: list[dict[str, int]] = []
        self._start: dict[str, int] = {}
        probe = self

        class Before(Callback):
            def on_before_backward(self, *args: Any) -> None:
                probe._start = xla_counts()

        class After(Callback):
            def on_before_backward(self, *args: Any) -> None:
                probe.deltas.append(delta(probe._start, xla_counts()))

        self.before, self.after = Before(), After()


@dataclass
class FitRun:
    """What :func:`fit` records."""

    weights: dict[str, Tensor]
    start: dict[str, int] = field(default_factory=dict)
    counts: list[dict[str, int]] = field(default_factory=list)
    penalty_path: list[dict[str, int]] = field(default_factory=list)
    penalty: float = float("nan")
    checkpoints: dict[int, Path] = field(default_factory=dict)
    comhe_state: dict[str, Any] = field(default_factory=dict)
    strategy: str = ""
    device: torch.device = CPU


def fit(
    on_xla: bool,
    variant: str,
    kwargs: dict[str, Any],
    tmp_path: Path,
    *,
    steps: int = 3 * STEPS_PER_EPOCH,
    every_n_steps: int = 1,
    save_every: int | None = None,
    ckpt_path: Path | None = None,
    collect: bool = True,
) -> FitRun:
    """``Trainer.fit`` of :class:`XLANet` with ``CoMHE(variant, **kwargs)`` on ``xla:0`` or on the CPU.

    On XLA: ``CPUXLAAccelerator`` and ``SingleDeviceXLAStrategy(xla:0)``, Lightning's single-device XLA strategy.

    Args:
        on_xla: XLA, or the CPU reference.
        variant: ``CoMHE(variant=...)``.
        kwargs: The callback's other arguments (``seed`` defaults to 3).
        tmp_path: Root directory of the run (checkpoints).
        steps: ``max_steps``.
        every_n_steps: ``CoMHE(every_n_steps=...)``.
        save_every: Save a checkpoint every this many steps (``ModelCheckpoint(every_n_train_steps=...)``).
        ckpt_path: Resume from this checkpoint.
        collect: Run the cyclic garbage collector before each optimizer step (:class:`StepProbe`).

    Returns:
        The final weights, the per-step XLA figures and the checkpoints written, by step.
    """
    comhe = CoMHE(variant=variant, every_n_steps=every_n_steps, **{"seed": 3, **kwargs})
    probe, path = StepProbe(on_xla, collect), PenaltyPathProbe()
    callbacks: list[Callback] = [path.before, comhe, path.after, probe]
    root = tmp_path / ("xla" if on_xla else "cpu")
    if save_every is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=save_every, save_top_k=-1)
        )
    device_kwargs: dict[str, Any] = (
        {"accelerator": CPUXLAAccelerator(), "strategy": SingleDeviceXLAStrategy(DEVICE), "devices": 1}
        if on_xla
        else {"accelerator": "cpu", "devices": 1}
    )
    trainer = Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=save_every is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
        callbacks=callbacks,
        **device_kwargs,
    )
    model = XLANet()
    trainer.fit(model, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert trainer.global_step == steps, trainer.global_step
    checkpoints = {int(p.stem.split("=")[1]): p for p in root.glob("step=*.ckpt")} if save_every else {}
    return FitRun(
        weights=cpu_state(model),
        start=probe.start,
        counts=probe.counts,
        penalty_path=path.deltas,
        penalty=float(trainer.callback_metrics["comhe/penalty"]),
        checkpoints=checkpoints,
        comhe_state=comhe.state_dict(),
        strategy=type(trainer.strategy).__name__,
        device=trainer.strategy.root_device,
    )
