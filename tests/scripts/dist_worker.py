"""Worker for the distributed CoMHE tests: runs several short ``Trainer.fit`` calls in one process group.

Started by ``tests/test_distributed.py`` (never by pytest directly)::

    python tests/scripts/dist_worker.py --mode ddp --out DIR --configs '[{"name": "random", ...}]'

Modes:

- ``ddp``: ``Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(gloo))``. Started once by the test; Lightning's
  own launcher re-runs this script for local rank 1 (the real ``strategy="ddp"`` path).
- ``multinode``: ``Trainer(num_nodes=2, devices=1, strategy=DDPStrategy(gloo))``. The test starts one process per
  "node" by hand with ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK``/``WORLD_SIZE``/``LOCAL_RANK``.
- ``fsdp2``: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` applied
  to every ``Linear`` and to ``net`` in ``configure_model``.
- ``fsdp1``: Lightning's ``FSDPStrategy`` (FSDP v1, ``auto_wrap_policy={nn.Linear}``: one unit per layer) on CPU,
  see :class:`CPUFSDPStrategy`, with ``sharding_strategy=config.get("sharding", "FULL_SHARD")``.
- ``deepspeed``: Lightning's ``DeepSpeedStrategy(stage=config["stage"])`` on DeepSpeed's CPU accelerator
  (``DS_ACCELERATOR=cpu``, gloo), see :class:`CPUDeepSpeedStrategy`. float32 (DeepSpeed has no float64 path).

For every config it saves ``<out>/<name>_rank<global rank>.pt``: the final full weights, the callback state, the
last logged ``comhe/penalty``, the global step and the (float64) inputs of every training batch the rank saw.
"""

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests` and the package

from lightning_comhe import CoMHE  # noqa: E402
from lightning_comhe._fsdp1 import Fsdp1Layout  # noqa: E402
from lightning_comhe._gathered import GatheredWeights  # noqa: E402
from tests.helpers import TinyMLP, make_dataset  # noqa: E402

TIMEOUT = timedelta(seconds=120)  # collectives fail instead of hanging when the other rank is gone


class FSDP2MLP(TinyMLP):
    """:class:`TinyMLP` whose layers are sharded with FSDP2 (``fully_shard``) in ``configure_model``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)
        self._sharded = True


class LateMLP(TinyMLP):
    """:class:`TinyMLP` with a ``configure_model`` hook: CoMHE then builds after the strategy wrapped the model."""

    def configure_model(self) -> None:
        pass


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy``, unchanged except for its CUDA-only guard.

    DeepSpeed itself runs on CPUs (its ``cpu`` accelerator, gloo collectives); Lightning refuses any accelerator but
    CUDA in ``setup_environment``. This subclass skips only that check, and the test passes indexed CPU devices
    (``cpu:0``, ``cpu:1``) because Lightning hands the root device's index to ``deepspeed.initialize``. The engine,
    the ZeRO optimizer, Lightning's DeepSpeed precision plugin and its accumulation handling are the real ones.
    """

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # everything DeepSpeedStrategy does, minus the CUDAAccelerator check


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP v1), unchanged except for the device it hands to FSDP.

    ``FullyShardedDataParallel`` runs on CPUs (gloo) when it is given ``device_id=torch.device("cpu")``; Lightning
    passes the root device's index (``None`` on CPU, which FSDP refuses) and refuses any accelerator but CUDA for the
    class itself (``type(strategy) is FSDPStrategy``). This subclass passes the CPU device; the wrapping, the
    sharding strategy, Lightning's FSDP precision plugin, its checkpointing and optimizer handling are the real ones.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def fsdp1_strategy(config: dict[str, Any]) -> CPUFSDPStrategy:
    return CPUFSDPStrategy(
        auto_wrap_policy={nn.Linear},
        sharding_strategy=config.get("sharding", "FULL_SHARD"),
        process_group_backend="gloo",
        timeout=TIMEOUT,
    )


class BatchRecorder(Callback):
    """Records the inputs of every training batch this rank saw."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.inputs.append(batch[0].detach().double())  # lossless for float32 and float64 runs


def full_weights(model: nn.Module, trainer: Trainer) -> dict[str, torch.Tensor]:
    """Plain tensors of the parameters (FSDP2 ``DTensor`` shards, FSDP v1 fragments and ZeRO-3 partitions are
    gathered: collectives)."""
    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
            return {k.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for k, p in model.named_parameters()}
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id"):  # a DeepSpeed ZeRO-3 partition: gathered (a collective)
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().clone()
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.clone()
    return out


def run(mode: str, config: dict[str, Any], out: Path) -> None:
    if mode == "fsdp2":
        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
        model: TinyMLP = FSDP2MLP(momentum=0.9).double()
        devices, num_nodes = 2, 1
    elif mode == "fsdp1":
        strategy = fsdp1_strategy(config)
        # float32: Lightning's FSDP precision plugin has no "64-true"
        model = (LateMLP if config.get("configure_model") else TinyMLP)(momentum=0.9)
        devices, num_nodes = 2, 1
    elif mode == "deepspeed":
        cpus = [torch.device("cpu", i) for i in range(2)]
        strategy = CPUDeepSpeedStrategy(
            stage=config["stage"], process_group_backend="gloo", parallel_devices=cpus, timeout=TIMEOUT
        )
        model = TinyMLP(momentum=0.9)
        devices, num_nodes = 2, 1
    else:
        strategy = DDPStrategy(process_group_backend="gloo", timeout=TIMEOUT)
        model = TinyMLP(momentum=0.9)
        devices, num_nodes = (2, 1) if mode == "ddp" else (1, 2)
    dataset = make_dataset(num_batches=5, batch_size=3)  # 15 samples: the sampler pads one index per epoch
    precision = "32-true" if mode in ("deepspeed", "fsdp1") else "64-true"
    if mode == "fsdp2":
        # ModelParallelStrategy refuses "64-true": the model is built in float64 above and fed float64 data.
        precision = "32-true"
        dataset = TensorDataset(*(t.double() for t in dataset.tensors))
    loader = DataLoader(dataset, batch_size=config["batch_size"], shuffle=False)
    callback = CoMHE(**config["comhe"])
    recorder = BatchRecorder()
    resume_at = config.get("resume_at")
    extra: list[Callback] = []
    ckpt_dir = out / f"{config['name']}_ckpt"
    if resume_at:  # checkpoint after step `resume_at` of the straight run, then resume a fresh run from it
        extra.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=resume_at, save_top_k=-1, filename="{step}"))

    def trainer_for(callbacks: list[Callback]) -> Trainer:
        return Trainer(
            accelerator="cpu",
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            max_steps=config["max_steps"],
            accumulate_grad_batches=config["accumulate"],
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=bool(resume_at),
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )

    trainer = trainer_for([callback, recorder, *extra])
    GatheredWeights.high_water = 0
    trainer.fit(model, loader)
    gathered_peak = GatheredWeights.high_water
    fragments = mode == "fsdp1" and all(p.ndim == 1 for p in callback._regularizer.parameters())  # still sharded
    layout = Fsdp1Layout(trainer.strategy.model) if mode == "fsdp1" else None
    numel = [
        layout.shape(p).numel() if layout else int(getattr(p, "ds_numel", p.numel()))
        for p in callback._regularizer.parameters()
    ]
    weights = full_weights(model, trainer)
    resumed: dict[str, Any] = {}
    if resume_at:
        # built in float64: the checkpoint is restored into the module before "64-true" would convert it
        fresh_cb, fresh = CoMHE(**config["comhe"]), TinyMLP(momentum=0.9, seed=123)
        if mode == "deepspeed":  # a fresh engine, loaded from the DeepSpeed checkpoint (a directory)
            strategy = CPUDeepSpeedStrategy(
                stage=config["stage"], process_group_backend="gloo", parallel_devices=cpus, timeout=TIMEOUT
            )
        elif mode == "fsdp1":
            strategy = fsdp1_strategy(config)
        else:
            fresh = fresh.double()
            strategy = DDPStrategy(process_group_backend="gloo", timeout=TIMEOUT)
        again = trainer_for([fresh_cb])
        again.fit(fresh, loader, ckpt_path=str(ckpt_dir / f"step={resume_at}.ckpt"))
        resumed = {"weights": full_weights(fresh, again), "callback_state": fresh_cb.state_dict()}
    result = {
        "world_size": trainer.world_size,
        "global_rank": trainer.global_rank,
        "node_rank": trainer.node_rank,
        "global_step": trainer.global_step,
        "weights": weights,
        "callback_state": callback.state_dict(),
        "penalty": trainer.callback_metrics["comhe/penalty"].clone(),
        "inputs": recorder.inputs,
        "sharded": any(type(p).__name__ == "DTensor" for p in model.parameters()),
        "zero3_partitioned": any(hasattr(p, "ds_id") for p in model.parameters()),
        "fsdp1_fragments": fragments,
        "engine": type(trainer.strategy.model).__name__,
        "zero_stage": trainer.strategy.config["zero_optimization"]["stage"] if mode == "deepspeed" else None,
        "engine_steps": getattr(trainer.strategy.model, "global_steps", None),
        "shard": None if callback._shard is None else tuple(callback._shard),
        "resumed": resumed,
        "gathered_peak": gathered_peak,
        "regularized_numel": sum(numel),
        "checkpoint": str(ckpt_dir / f"step={resume_at}.ckpt") if resume_at else None,
    }
    torch.save(result, out / f"{config['name']}_rank{trainer.global_rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["ddp", "multinode", "fsdp1", "fsdp2", "deepspeed"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", type=str, required=True, help="JSON list of configs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for config in json.loads(args.configs):
        run(args.mode, config, args.out)
    # A clean shutdown: without it a rank whose peer has already exited can abort at interpreter exit
    # ("terminate called without an active exception").
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
