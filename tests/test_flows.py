"""Real training flows (issue #13): losses whose last op saved its output, closures, fine-tuning schedules.

Each test runs a real ``Trainer`` and compares the trained weights with a hand-written loop that adds the task
gradient and the penalty gradient at the same weights: the contract is that the gradient reaching the optimizer is
``∇task + ∇penalty`` once per optimizer step (every closure evaluation of it included).
"""

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import Tensor

from lightning_comhe import CoMHE, CoMHERegularizer
from tests.helpers import (
    TinyMLP,
    assert_params_close,
    clone_model,
    cpu_trainer,
    loader_batches,
    make_loader,
)

KW: dict[str, Any] = {"variant": "mhe", "weight": 0.3, "head_weight": 0.7}


class _RMSE(TinyMLP):
    """``sqrt(mse)``: ``sqrt`` saves its output, so an in-place change of the loss breaks (or falsifies) backward."""

    last = "sqrt"

    def task_loss(self, batch: Sequence[Tensor]) -> Tensor:
        mse = super().task_loss(batch)
        return {"sqrt": torch.sqrt, "exp": torch.exp, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[self.last](mse)


class _ManualRMSE(_RMSE):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.seen: list[tuple[Tensor, Tensor]] = []

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.task_loss(batch)
        before = loss.detach().clone()
        self.manual_backward(loss)
        self.seen.append((before, loss.detach().clone()))
        opt.step()


def _reference(model: TinyMLP, batches: list, steps: int, **kwargs: Any) -> TinyMLP:
    """SGD on ``task + penalty`` for ``steps`` steps, one batch per step, the penalty from a twin regularizer."""
    reg = CoMHERegularizer(model, **kwargs)
    opt = model.configure_optimizers()
    for step in range(steps):
        opt.zero_grad()
        reg.refresh(opt.param_groups[0]["lr"])
        (model.task_loss(batches[step % len(batches)]) + reg().penalty).backward()
        opt.step()
    return model


@pytest.mark.parametrize("last", ["sqrt", "exp", "sigmoid", "tanh"])
@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_a_loss_whose_last_op_saved_its_output_trains_exactly(last: str, manual: bool) -> None:
    cls = _ManualRMSE if manual else _RMSE
    model = cls()
    model.last = last
    ref = clone_model(model)
    loader = make_loader(num_batches=3)
    cpu_trainer(max_steps=3, callbacks=[CoMHE(**KW)]).fit(model, loader)
    _reference(ref, loader_batches(loader), 3, **KW)
    assert_params_close(model, ref)
    if manual:  # the user's tensor is left as it was
        assert all(torch.equal(a, b) for a, b in model.seen)


def test_random_projections_with_an_rmse_loss_under_a_grad_scaler() -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    kwargs = {"variant": "random", "projection_dim": 3, "num_projections": 2, "weight": 0.5, "head_weight": 0.5}
    model, loader = _RMSE(), make_loader(num_batches=3)
    ref = clone_model(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    logged: list[float] = []

    class _Log(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            logged.append(float(trainer.callback_metrics["comhe/penalty"]))

    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    cpu_trainer(max_steps=3, plugins=[plugin], callbacks=[CoMHE(**kwargs), _Log()]).fit(model, loader)
    reg = CoMHERegularizer(ref, **kwargs)
    opt = ref.configure_optimizers()
    expected = []
    for step in range(3):
        opt.zero_grad()
        reg.refresh(opt.param_groups[0]["lr"])
        with torch.autocast("cpu", dtype=torch.float16):
            task = ref.task_loss(loader_batches(loader)[step])
        penalty = reg().penalty
        expected.append(float(penalty))
        (task + penalty).backward()
        opt.step()
    assert_params_close(model, ref, atol=2e-3, rtol=2e-3)  # fp16 autocast forward on both sides
    # The logged penalty is R itself, not the scaled value that enters the backward pass (1024 x R).
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(expected), rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# closures re-evaluated within one optimizer step
# ---------------------------------------------------------------------------------------------------------------------
class _LBFGS(TinyMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=4, history_size=3)


class _CountBackwards(Callback):
    """Counts the backward passes of the fit (closure evaluations included)."""

    def __init__(self) -> None:
        self.evaluations = 0

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self.evaluations += 1


@pytest.mark.parametrize("variant", ["mhe", "random", "angle"])
def test_every_closure_evaluation_of_lbfgs_gets_the_penalty(variant: str) -> None:
    kwargs = {**KW, "variant": variant}
    if variant != "mhe":
        kwargs.update(projection_dim=3, num_projections=2 if variant == "random" else None)
    model, loader = _LBFGS(), make_loader(num_batches=2)
    ref = clone_model(model)
    counter = _CountBackwards()
    cpu_trainer(max_steps=2, callbacks=[CoMHE(**kwargs), counter]).fit(model, loader)
    assert counter.evaluations > 2  # LBFGS re-evaluated the closure within a step

    reg = CoMHERegularizer(ref, **kwargs)
    opt = ref.configure_optimizers()
    for batch in loader_batches(loader):
        reg.refresh(0.5)  # once per optimizer step, at its first evaluation

        def closure(batch: Any = batch) -> Tensor:
            opt.zero_grad()
            task = ref.task_loss(batch)
            (task + reg().penalty).backward()
            return task.detach()  # Lightning hands LBFGS the loss value without the penalty (docs/troubleshooting.md)

        opt.step(closure)
    assert_params_close(model, ref)


class _SAM(torch.optim.SGD):
    """A two-pass (SAM-style) optimizer: the gradient at ``w + rho g/|g|`` updates ``w``; the closure runs twice."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        with torch.enable_grad():
            loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
        shifts = [0.05 * p.grad / (norm + 1e-12) for p in params]
        for p, e in zip(params, shifts, strict=True):
            p.add_(e)
        for p in params:
            p.grad = None
        with torch.enable_grad():
            closure()
        for p, e in zip(params, shifts, strict=True):
            p.sub_(e)
        super().step()
        return loss


class _SAMModel(TinyMLP):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return _SAM(self.parameters(), lr=self.lr)


def test_a_two_pass_optimizer_gets_the_penalty_at_both_evaluations() -> None:
    kwargs = {**KW, "variant": "random", "projection_dim": 3, "num_projections": 2}
    model, loader = _SAMModel(), make_loader(num_batches=3)
    ref = clone_model(model)
    counter = _CountBackwards()
    cpu_trainer(max_steps=3, callbacks=[CoMHE(**kwargs), counter]).fit(model, loader)
    assert counter.evaluations == 6
    reg = CoMHERegularizer(ref, **kwargs)
    opt = ref.configure_optimizers()
    for batch in loader_batches(loader):
        reg.refresh(opt.param_groups[0]["lr"])

        def closure(batch: Any = batch) -> Tensor:
            opt.zero_grad()
            task = ref.task_loss(batch)
            (task + reg().penalty).backward()
            return task.detach()

        opt.step(closure)
    assert_params_close(model, ref)


# ---------------------------------------------------------------------------------------------------------------------
# the selection follows requires_grad and the module tree at every step
# ---------------------------------------------------------------------------------------------------------------------
class _Audit(Callback):
    """After every backward: the live gradient equals ∇(task + penalty) at the same weights, the penalty taken over
    the layers that are trainable right now (a fresh ``CoMHERegularizer`` on a copy of the model)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.diffs: list[float] = []
        self.selected: list[list[str]] = []  # the twin's selection: the layers trainable now
        self.live: list[list[str]] = []  # the callback's selection at the same backward
        self._batch: Any = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        twin = clone_model(pl_module)
        for p in twin.parameters():
            p.grad = None
        reg = CoMHERegularizer(twin, **self.kwargs)
        self.selected.append(reg.selection.names)
        comhe = next(cb for cb in trainer.callbacks if isinstance(cb, CoMHE))
        self.live.append(comhe.regularizer.selection.names)
        (twin.task_loss(self._batch) + reg().penalty).backward()
        diff = 0.0
        for (name, live), ref in zip(pl_module.named_parameters(), twin.parameters(), strict=True):
            if not live.requires_grad:
                assert live.grad is None or not live.grad.any(), name
                continue
            diff = max(diff, float((live.grad - ref.grad).abs().max()))
        self.diffs.append(diff)


class _Finetune(TinyMLP):
    """``backbone`` (two Linear layers) and ``head``, for ``BackboneFinetuning``."""

    def __init__(self) -> None:
        super().__init__()
        net = self.net
        del self.net
        self.backbone, self.head = net[:4], net[4]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=self.lr)


@pytest.mark.parametrize("comhe_first", [True, False])
def test_a_backbone_finetuning_schedule_is_followed_whatever_the_callback_order(comhe_first: bool) -> None:
    kwargs = {**KW, "head": "head"}
    comhe, audit = CoMHE(**kwargs), _Audit(**kwargs)
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5, verbose=False)
    callbacks = [comhe, finetune, audit] if comhe_first else [finetune, comhe, audit]
    cpu_trainer(max_epochs=2, max_steps=-1, callbacks=callbacks).fit(_Finetune(), make_loader(num_batches=2))
    head_only, everything = ["head"], ["backbone.0", "backbone.2", "head"]
    assert audit.selected == [head_only, head_only, everything, everything], audit.selected
    assert audit.live == audit.selected  # the frozen backbone is not penalized, and is once it trains
    assert max(audit.diffs) < 1e-6
    assert comhe.regularizer is not None and comhe.regularizer.selection.names == everything


def test_a_model_changed_between_two_fits_is_followed() -> None:
    model, comhe, audit = TinyMLP(), CoMHE(**KW), _Audit(**KW)
    trainer = cpu_trainer(max_steps=2, callbacks=[comhe, audit])
    trainer.fit(model, make_loader(num_batches=2))
    assert audit.selected[-1] == ["net.0", "net.2", "net.4"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model.net[4] = torch.nn.Linear(8, 3)  # a replaced head
    model.net[0].requires_grad_(False)  # a newly frozen layer
    cpu_trainer(max_steps=2, callbacks=[comhe, audit]).fit(model, make_loader(num_batches=2))
    assert audit.selected[-1] == ["net.2", "net.4"]
    assert audit.live == audit.selected
    assert comhe.regularizer is not None and comhe.regularizer.selection.names == ["net.2", "net.4"]
    assert max(audit.diffs) < 1e-6


def test_everything_frozen_for_a_while_gives_no_penalty_and_no_error() -> None:
    model = TinyMLP()
    comhe = CoMHE(**KW)

    class _FreezeAll(Callback):
        def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
            frozen = trainer.global_step == 1
            for name, p in pl_module.named_parameters():
                p.requires_grad_(not frozen or name.endswith("bias"))

    losses: list[float] = []

    class _Log(Callback):
        def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
            losses.append(float(trainer.callback_metrics["comhe/penalty"]))

    cpu_trainer(max_steps=3, callbacks=[_FreezeAll(), comhe, _Log()]).fit(model, make_loader(num_batches=3))
    assert losses[1] == 0.0 and losses[0] > 0 and losses[2] > 0
