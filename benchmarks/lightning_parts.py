"""The Lightning pieces the benchmarks share: an image classifier around a network, and a quiet one-device Trainer.

Imported lazily by the benchmarks that time a real Lightning step (``overhead``, ``ladder``, the GPU checks), so the
kernel benchmarks run without Lightning's import cost.
"""

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Classifier", "quiet_trainer"]


class Classifier(pl.LightningModule):
    """``net`` trained with cross-entropy and SGD (the paper's CIFAR recipe: momentum 0.9, decay 5e-4)."""

    def __init__(self, net: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def quiet_trainer(device: torch.device, max_steps: int, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    """A one-device Trainer on ``device`` without logger, checkpoints, progress bar or model summary."""
    defaults: dict[str, Any] = {
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, **{**defaults, **kwargs})
