"""What the callback needs to know about Lightning's strategies: the optimizer-step counter and what is refused."""

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["check_strategy", "optimizer_step_index"]


def optimizer_step_index(trainer: "pl.Trainer") -> int:
    """The number of optimizer steps taken so far: constant within an accumulation window.

    ``trainer.global_step`` in general. A strategy that handles gradient accumulation itself (DeepSpeed) gets an
    optimizer-step call on every micro-batch, so ``global_step`` no longer counts real steps; its engine's own
    counter (``global_steps``, advanced only at the engine's accumulation boundaries) is used instead.
    """
    if trainer.strategy.handles_gradient_accumulation:
        steps = getattr(trainer.strategy.model, "global_steps", None)
        if isinstance(steps, int):
            return steps
    return trainer.global_step


def check_strategy(strategy: Any) -> None:
    """Refuse FSDP v1 and DeepSpeed ZeRO-3, whose weights are flat shards or empty inside the backward pass."""
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover - depends on the lightning build
        FSDPStrategy = None  # noqa: N806
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover - depends on the lightning build
        DeepSpeedStrategy = None  # noqa: N806
    if FSDPStrategy is not None and isinstance(strategy, FSDPStrategy):
        raise MisconfigurationException(
            "CoMHE does not support `FSDPStrategy` (FSDP v1): inside its backward pass the weights are flat 1-D "
            "shards, so the neurons cannot be formed where the penalty is added. HINT: use FSDP2 instead: "
            "`strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with "
            "`torch.distributed.fsdp.fully_shard` applied in `LightningModule.configure_model`, or DDP."
        )
    if DeepSpeedStrategy is not None and isinstance(strategy, DeepSpeedStrategy):
        try:
            stage3 = bool(strategy.zero_stage_3)
        except Exception:  # noqa: BLE001 - an unconfigured strategy has no config yet
            stage3 = False
        if stage3:
            raise MisconfigurationException(
                "CoMHE does not support DeepSpeed ZeRO stage 3: outside the forward pass its parameters are "
                "empty placeholders, so the neurons cannot be read when the penalty is added. HINT: use ZeRO "
                "stage 1 or 2 (`strategy='deepspeed_stage_2'`), or FSDP2 through `ModelParallelStrategy`."
            )
