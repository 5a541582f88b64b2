"""Lazy regularization, ``every_n_steps=m``: the penalty ×m on the steps ``step % m == 0``, nothing on the others.

Every test compares a real ``Trainer`` run with a hand-written reference loop that adds ``m · R`` on exactly the
penalized steps and refreshes the projections only there.
"""

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from lightning_comhe import CoMHE, CoMHERegularizer
from tests.helpers import (
    TinyMLP,
    assert_nested_equal,
    assert_params_close,
    assert_params_equal,
    clone_model,
    cpu_trainer,
    loader_batches,
    make_loader,
    max_abs_diff,
    reference_fit,
)


def _lazy_penalty(reg: CoMHERegularizer, every: int) -> Any:
    """The reference: refresh and add ``every · R`` only on the steps ``step % every == 0``."""

    def fn(step: int, lr: float) -> Tensor:
        if step % every:
            return torch.zeros((), requires_grad=True)
        reg.refresh(lr)
        return every * reg().penalty

    return fn


def _kwargs(variant: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"variant": variant, "projection_dim": 3, "num_projections": 2}
    if variant != "random":
        base.pop("num_projections")
    base.update(extra)
    return base


@pytest.mark.parametrize("variant", ["random", "angle", "srip"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_penalty_on_exactly_the_right_steps_times_m(variant: str, accumulate: int) -> None:
    every, steps = 3, 7
    loader = make_loader(num_batches=8)
    model = TinyMLP(momentum=0.9)
    ref = clone_model(model).double()  # float64: the steep projected energies amplify float32 reassociation
    kwargs = _kwargs(variant, resample_every=2) if variant == "random" else _kwargs(variant)
    callback = CoMHE(**kwargs, every_n_steps=every, log_every=1)
    common = {"max_steps": steps, "accumulate_grad_batches": accumulate, "precision": "64-true"}
    cpu_trainer(**common, callbacks=[callback]).fit(model, loader)
    reg = CoMHERegularizer(ref, **kwargs)
    batches = loader_batches(loader)
    penalty = _lazy_penalty(reg, every)
    reference_fit(ref, batches, max_steps=steps, accumulate=accumulate, penalty_fn=penalty, input_dtype=torch.float64)
    assert_params_close(model, ref, atol=1e-12, rtol=1e-10)
    assert callback.regularizer is not None
    assert callback.regularizer.num_refreshes == len(range(0, steps, every)) == 3
    got, want = callback.regularizer.state_dict(), reg.state_dict()
    if not callback.regularizer.family.uses_lr:  # the callback reads the optimizer's lr only for learned projections
        got.pop("last_lr"), want.pop("last_lr")
    assert got["refreshes"] == want["refreshes"] == 3
    if accumulate == 1:  # with accumulation the fitted states agree to float64 rounding only (gradient order)
        assert_nested_equal(got, want)
    # control: the every-step penalty gives other weights
    dense = clone_model(ref)
    cpu_trainer(**common, callbacks=[CoMHE(**kwargs)]).fit(dense, loader)
    assert max_abs_diff(dense, model) > 1e-4


def test_logged_penalty_is_r_on_penalized_steps_only(tmp_path: Path) -> None:
    every = 2
    logger = CSVLogger(tmp_path, name="lazy")
    callback = CoMHE(variant="mhe", every_n_steps=every, log_every=1)
    model = TinyMLP()
    ref = clone_model(model)
    trainer = cpu_trainer(max_steps=5, callbacks=[callback], logger=logger, log_every_n_steps=1)
    trainer.fit(model, make_loader(num_batches=5))
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = {int(r["step"]): float(r["comhe/penalty"]) for r in rows if r.get("comhe/penalty")}
    assert sorted(logged) == [0, 1, 2, 3, 4]  # Lightning repeats a step-level value until it is logged again
    # R (without the ×m) at the weights of each penalized step, from the reference loop
    values: dict[int, float] = {}
    reg = CoMHERegularizer(ref, "mhe")

    def fn(step: int, lr: float) -> Tensor:
        if step % every:
            return torch.zeros((), requires_grad=True)
        reg.refresh(lr)
        r = reg().penalty
        values[step] = float(r)
        return every * r

    reference_fit(ref, loader_batches(make_loader(num_batches=5)), max_steps=5, penalty_fn=fn)
    assert sorted(values) == [0, 2, 4]
    assert logged == pytest.approx({s: values[s - s % every] for s in logged}, rel=1e-5)
    assert logged[1] != pytest.approx(every * values[0])  # R, never m·R


def test_grad_scaler_scales_the_lazy_penalty() -> None:
    every, steps = 2, 4
    loader = make_loader(num_batches=4)
    model = TinyMLP()
    ref = clone_model(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    callback = CoMHE(variant="mhe", every_n_steps=every)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    cpu_trainer(max_steps=steps, plugins=plugins, callbacks=[callback]).fit(model, loader)
    reg = CoMHERegularizer(ref, "mhe")
    reference_fit(
        ref, loader_batches(loader), max_steps=steps, penalty_fn=_lazy_penalty(reg, every), autocast_dtype=torch.float16
    )
    assert max_abs_diff(model, ref) < 2e-4


def test_resume_mid_window_is_bit_exact(tmp_path: Path) -> None:
    """Checkpoint after step 3 (not a multiple of m = 2, mid-epoch): the resumed run equals the straight one."""
    kwargs = {**_kwargs("random", resample_every=2), "every_n_steps": 2}
    k = 3
    straight_cb = CoMHE(**kwargs)
    straight = TinyMLP(momentum=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    trainer = cpu_trainer(max_steps=2 * k, enable_checkpointing=True, callbacks=[straight_cb, ckpt])
    trainer.fit(straight, make_loader(k))
    path = tmp_path / f"step={k}.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][straight_cb.state_key]
    assert saved["last_refresh_step"] == 2 and saved["regularizer"]["refreshes"] == 2
    resumed_cb = CoMHE(**kwargs)
    resumed = TinyMLP(momentum=0.9, seed=123)
    cpu_trainer(max_steps=2 * k, callbacks=[resumed_cb]).fit(resumed, make_loader(k), ckpt_path=path)
    assert_params_equal(resumed, straight)
    assert_nested_equal(resumed_cb.state_dict(), straight_cb.state_dict())


class _TwoOptimizers(TinyMLP):
    """Manual optimization with two optimizers, each stepping once per batch (a GAN-like loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.added: list[tuple[int, float]] = []  # (global_step at the backward, |grad - task grad| after it)

    def configure_optimizers(self) -> Any:
        first = [p for n, p in self.named_parameters() if n.startswith("net.0")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.0")]
        return torch.optim.SGD(first, lr=0.05), torch.optim.SGD(rest, lr=0.05)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        params = list(self.parameters())
        for opt in self.optimizers():
            for p in params:
                p.grad = None
            loss = self.task_loss(batch)
            task = torch.autograd.grad(loss, params, retain_graph=True)
            step = self.trainer.global_step
            self.manual_backward(loss)
            extra = sum(float((p.grad - g).abs().sum()) for p, g in zip(params, task, strict=True))
            self.added.append((step, extra))
            opt.step()


def test_manual_optimization_with_two_optimizers_counts_every_optimizer_step() -> None:
    """Under manual optimization ``step`` is ``global_step``, which counts the steps of every optimizer."""
    model = _TwoOptimizers()
    callback = CoMHE(variant="mhe", every_n_steps=3)
    cpu_trainer(max_steps=8, callbacks=[callback]).fit(model, make_loader(num_batches=4))
    steps = [s for s, _ in model.added]
    assert steps == list(range(8))
    penalized = [s for s, added in model.added if added > 1e-6]
    assert penalized == [0, 3, 6]
    assert all(added == 0.0 for s, added in model.added if s % 3)


def test_regularizer_lazy_penalty_for_plain_pytorch() -> None:
    model = TinyMLP()
    reg = CoMHERegularizer(model, "random", projection_dim=3, num_projections=2)
    twin = CoMHERegularizer(clone_model(model), "random", projection_dim=3, num_projections=2)
    for step in range(5):
        out = reg.lazy_penalty(step, every_n_steps=2)
        if step % 2:
            assert out is None
            continue
        assert out is not None and out.scale == 2
        twin.refresh()
        expected = twin().penalty
        torch.testing.assert_close(out.penalty, 2 * expected)
        torch.testing.assert_close(out.penalty / out.scale, expected)
    assert reg.num_refreshes == 3
    with pytest.raises(ValueError, match="`every_n_steps` must be an int >= 1, got 0"):
        reg.lazy_penalty(0, every_n_steps=0)


def test_every_n_steps_is_validated() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="`every_n_steps` must be an int >= 1, got 0"):
        CoMHE(every_n_steps=0)
