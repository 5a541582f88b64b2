"""Single-process tests of the CoMHE Lightning callback against hand-written SGD references (CPU, tiny models)."""

import csv
import inspect
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_comhe.callback import CoMHE
from lightning_comhe.config import EnergyConfig, ScheduleConfig, SelectionConfig, config_fields
from lightning_comhe.regularizer import CoMHERegularizer
from tests.helpers import (
    HIDDEN,
    IN_DIM,
    ManualMLP,
    NoWeights,
    TinyCNN,
    TinyMLP,
    assert_nested_equal,
    assert_params_close,
    assert_params_equal,
    clone_model,
    cpu_trainer,
    functional_mhe_penalty,
    loader_batches,
    make_loader,
    max_abs_diff,
    reference_fit,
    reference_fit_manual,
    regularizer_penalty,
)

# Small projections so the tiny layers (d = 6 or 8, 18 for the CNN) are really projected (d > k), and smaller
# weights: energies of 8 neurons projected to k = 4 are large and steep, and a well-conditioned trajectory keeps
# float rounding differences (e.g. summation order under accumulation) at the 1e-7 level.
_PROJECTED = {"weight": 0.1, "head_weight": 1.0}
SMALL = {
    "random": {"projection_dim": 4, "num_projections": 3, **_PROJECTED},
    "angle": {"projection_dim": 4, **_PROJECTED},
    "adversarial": {"projection_dim": 4, "inner_steps": 2, **_PROJECTED},
    "mhe": {},
    "half_mhe": {},
}


def _kwargs(variant: str, **extra: Any) -> dict[str, Any]:
    return {"variant": variant, "seed": 7, **SMALL[variant], **extra}


class _Spy(Callback):
    """Counts the penalty evaluations of the CoMHE callbacks (wraps ``regularizer.compute`` at train start)."""

    def __init__(self) -> None:
        self.calls = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for cb in trainer.callbacks:
            if isinstance(cb, CoMHE) and cb.regularizer is not None:
                inner = cb.regularizer.compute

                def counted(*args: Any, inner: Any = inner) -> Any:
                    self.calls += 1
                    return inner(*args)

                cb.regularizer.compute = counted  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------------------------------
# 1. 32-true against hand-written references
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mhe", "half_mhe", "random", "angle", "adversarial"])
def test_fp32_matches_reference(variant: str) -> None:
    loader = make_loader(num_batches=3)
    model = TinyMLP(momentum=0.9)
    ref, plain = clone_model(model), clone_model(model)
    kwargs = _kwargs(variant)
    callback = CoMHE(**kwargs)
    cpu_trainer(max_steps=4, callbacks=[callback]).fit(model, loader)

    if variant in ("mhe", "half_mhe"):
        # Independent of the regularizer: the functional energies with the official kappa (hidden 1, head 10).
        penalty = functional_mhe_penalty(
            ref, ["net.0", "net.2"], "net.4", weight=1.0, head_weight=10.0, half_space=variant == "half_mhe"
        )
    else:
        penalty = regularizer_penalty(CoMHERegularizer(ref, **kwargs))
    reference_fit(ref, loader_batches(loader), max_steps=4, penalty_fn=penalty)
    reference_fit(plain, loader_batches(loader), max_steps=4)

    assert_params_close(model, ref)
    assert max_abs_diff(model, plain) > 1e-3  # the penalty changed the weights
    assert callback.regularizer is not None and callback.regularizer.num_refreshes == 4


def test_fp32_cnn_random_matches_reference() -> None:
    loader = make_loader(num_batches=2, image=True)
    model = TinyCNN()
    ref, plain = clone_model(model), clone_model(model)
    kwargs = _kwargs("random", projection_dim=5)
    cpu_trainer(max_steps=3, callbacks=[CoMHE(**kwargs)]).fit(model, loader)
    reference_fit(
        ref, loader_batches(loader), max_steps=3, penalty_fn=regularizer_penalty(CoMHERegularizer(ref, **kwargs))
    )
    reference_fit(plain, loader_batches(loader), max_steps=3)
    assert_params_close(model, ref)
    assert max_abs_diff(model, plain) > 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# 2. precision
# ---------------------------------------------------------------------------------------------------------------------
def test_bf16_mixed_matches_reference() -> None:
    loader = make_loader(num_batches=3)
    model = TinyMLP()
    ref, plain = clone_model(model), clone_model(model)
    kwargs = _kwargs("random")
    cpu_trainer(max_steps=3, precision="bf16-mixed", callbacks=[CoMHE(**kwargs)]).fit(model, loader)
    batches = loader_batches(loader)
    penalty = regularizer_penalty(CoMHERegularizer(ref, **kwargs))
    reference_fit(ref, batches, max_steps=3, penalty_fn=penalty, autocast_dtype=torch.bfloat16)
    reference_fit(plain, batches, max_steps=3, autocast_dtype=torch.bfloat16)
    assert_params_close(model, ref, atol=1e-5, rtol=1e-4)
    assert max_abs_diff(model, plain) > 1e-3


def test_bf16_true_matches_reference() -> None:
    loader = make_loader(num_batches=3)
    model = TinyMLP()
    ref, plain = clone_model(model).to(torch.bfloat16), clone_model(model).to(torch.bfloat16)
    kwargs = _kwargs("half_mhe")
    cpu_trainer(max_steps=3, precision="bf16-true", callbacks=[CoMHE(**kwargs)]).fit(model, loader)
    assert model.net[0].weight.dtype == torch.bfloat16
    batches = loader_batches(loader)
    penalty = regularizer_penalty(CoMHERegularizer(ref, **kwargs))
    reference_fit(ref, batches, max_steps=3, penalty_fn=penalty, input_dtype=torch.bfloat16)
    reference_fit(plain, batches, max_steps=3, input_dtype=torch.bfloat16)
    assert_params_close(model, ref, atol=1e-2, rtol=1e-2)
    assert max_abs_diff(model, plain) > 5e-2


def test_fp16_grad_scaler_effective_weight_is_kappa() -> None:
    """The hook sees the scaled loss; the penalty must be scaled too, else its weight would be kappa / 1024."""
    init_scale = 1024.0
    loader = make_loader(num_batches=3)
    model = TinyMLP()
    ref, unscaled = clone_model(model), clone_model(model)
    kwargs = _kwargs("mhe")
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer = cpu_trainer(
        max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[CoMHE(**kwargs)]
    )
    assert trainer.precision_plugin.scaler is scaler
    trainer.fit(model, loader)
    assert scaler.get_scale() == init_scale  # no overflow, no growth: every step was taken with this scale

    batches = loader_batches(loader)
    reference_fit(
        ref,
        batches,
        max_steps=3,
        penalty_fn=regularizer_penalty(CoMHERegularizer(ref, **kwargs)),
        autocast_dtype=torch.float16,
    )
    reference_fit(  # what an unscaled penalty would do: weight kappa / scale
        unscaled,
        batches,
        max_steps=3,
        penalty_fn=regularizer_penalty(CoMHERegularizer(unscaled, **kwargs)),
        penalty_scale=1.0 / init_scale,
        autocast_dtype=torch.float16,
    )
    tol = 2e-4
    assert max_abs_diff(model, ref) < tol
    assert max_abs_diff(model, unscaled) > 50 * tol


# ---------------------------------------------------------------------------------------------------------------------
# 3. accumulation with a ragged last window
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("accumulate", "max_steps"), [(2, 6), (3, 4)])
def test_accumulation_counts_penalty_once_per_step(accumulate: int, max_steps: int) -> None:
    """5 batches per epoch: windows of 2+2+1 (or 3+2) micro-batches, two epochs.

    Runs in float64 ("64-true"): the reference sums the gradient pieces in another order than Lightning's single
    backward, and the steep projected energies amplify float32 rounding to ~1e-5 over a few steps.
    """
    loader = make_loader(num_batches=5)
    model = TinyMLP()
    ref, wrong = clone_model(model).double(), clone_model(model).double()
    kwargs = _kwargs("random")
    spy = _Spy()
    callback = CoMHE(**kwargs)
    trainer = cpu_trainer(
        max_steps=max_steps, precision="64-true", accumulate_grad_batches=accumulate, callbacks=[callback, spy]
    )
    trainer.fit(model, loader)
    assert trainer.global_step == max_steps and model.net[0].weight.dtype == torch.float64

    batches = loader_batches(loader)
    common = {"max_steps": max_steps, "accumulate": accumulate, "input_dtype": torch.float64}
    reference_fit(ref, batches, penalty_fn=regularizer_penalty(CoMHERegularizer(ref, **kwargs)), **common)
    # Adding penalty / A to every micro-batch (Lightning's task normalisation) would weigh it r / A in the ragged
    # last window of r < A micro-batches.
    wrong_penalty = regularizer_penalty(CoMHERegularizer(wrong, **kwargs))
    reference_fit(wrong, batches, penalty_fn=wrong_penalty, penalty_scale=lambda r: r / accumulate, **common)
    assert_params_close(model, ref, atol=1e-12, rtol=1e-10)
    assert max_abs_diff(model, wrong) > 1e-4
    assert callback.regularizer is not None and callback.regularizer.num_refreshes == max_steps
    assert spy.calls == max_steps  # one energy evaluation per optimizer step, not per micro-batch


# ---------------------------------------------------------------------------------------------------------------------
# 4. gradient clipping
# ---------------------------------------------------------------------------------------------------------------------
def test_gradient_clipping_clips_task_and_penalty_together() -> None:
    clip = 0.05
    loader = make_loader(num_batches=3)
    model = TinyMLP()
    ref, unclipped = clone_model(model), clone_model(model)
    kwargs = _kwargs("half_mhe")
    cpu_trainer(max_steps=3, gradient_clip_val=clip, callbacks=[CoMHE(**kwargs)]).fit(model, loader)
    batches = loader_batches(loader)
    reference_fit(
        ref,
        batches,
        max_steps=3,
        gradient_clip_val=clip,
        penalty_fn=regularizer_penalty(CoMHERegularizer(ref, **kwargs)),
    )
    reference_fit(
        unclipped, batches, max_steps=3, penalty_fn=regularizer_penalty(CoMHERegularizer(unclipped, **kwargs))
    )
    assert_params_close(model, ref)
    assert max_abs_diff(model, unclipped) > 1e-3  # clipping did bite


# ---------------------------------------------------------------------------------------------------------------------
# 5. manual optimization
# ---------------------------------------------------------------------------------------------------------------------
def test_manual_optimization_adds_penalty_once_per_optimizer_step() -> None:
    loader = make_loader(num_batches=3)
    model = ManualMLP(chunks=2)
    ref = clone_model(model)
    kwargs = _kwargs("random")
    callback = CoMHE(**kwargs)
    cpu_trainer(max_steps=3, callbacks=[callback]).fit(model, loader)

    reg = CoMHERegularizer(ref, **kwargs)
    reference_fit_manual(ref, loader_batches(loader), max_steps=3, refresh=reg.refresh, penalty=lambda: reg().penalty)
    assert_params_close(model, ref)
    assert callback.regularizer is not None and callback.regularizer.num_refreshes == 3
    # The tensors given to manual_backward are left as they were (the penalty's gradient comes through hooks).
    assert len(model.seen) == 6
    for before, after in model.seen:
        assert torch.equal(after, before)


class _HalvingLR(TinyMLP):
    def configure_optimizers(self) -> Any:
        opt = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("variant", ["angle", "adversarial"])
def test_inner_lr_follows_the_main_optimizer_lr(variant: str) -> None:
    seen: list[Any] = []

    class _Record(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            reg = trainer.callbacks[0].regularizer
            refresh = reg.refresh

            def recorded(lr: Any = None, share: Any = None) -> None:
                seen.append(lr)
                refresh(lr, share)

            reg.refresh = recorded

    cpu_trainer(max_steps=3, callbacks=[CoMHE(**_kwargs(variant)), _Record()]).fit(_HalvingLR(), make_loader(3))
    assert seen == [0.05, 0.025, 0.0125]


# ---------------------------------------------------------------------------------------------------------------------
# 6. resume bit-exactly
# ---------------------------------------------------------------------------------------------------------------------
def _straight_run_with_checkpoint(
    kwargs: dict[str, Any], tmp_path: Path, k: int, model_cls: type[TinyMLP] = TinyMLP
) -> tuple[TinyMLP, CoMHE, Path]:
    """2k steps (two epochs of k batches), checkpointing after step k (an epoch end) with ModelCheckpoint."""
    callback = CoMHE(**kwargs)
    model = model_cls(momentum=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_top_k=-1, filename="{step}")
    cpu_trainer(max_steps=2 * k, enable_checkpointing=True, callbacks=[callback, ckpt]).fit(model, make_loader(k))
    return model, callback, tmp_path / f"step={k}.ckpt"


@pytest.mark.parametrize("variant", ["random", "angle", "adversarial"])
def test_resume_is_bit_exact(variant: str, tmp_path: Path) -> None:
    """2k steps straight == k steps, checkpoint, then k more from ``fit(ckpt_path=...)`` with fresh objects.

    The checkpoint is at an epoch end: Lightning does not fast-forward a plain DataLoader when resuming mid-epoch.
    """
    k = 3
    kwargs = _kwargs(variant, resample_every=2) if variant == "random" else _kwargs(variant)
    straight, straight_cb, ckpt = _straight_run_with_checkpoint(kwargs, tmp_path, k)
    assert ckpt.exists()
    saved = torch.load(ckpt, weights_only=False)["callbacks"][straight_cb.state_key]
    assert saved["last_refresh_step"] == k - 1 and saved["regularizer"]["refreshes"] == k

    resumed_cb = CoMHE(**kwargs)
    resumed = TinyMLP(momentum=0.9, seed=123)  # other initial weights: everything must come from the checkpoint
    cpu_trainer(max_steps=2 * k, callbacks=[resumed_cb]).fit(resumed, make_loader(k), ckpt_path=ckpt)

    assert_params_equal(resumed, straight)
    assert_nested_equal(resumed_cb.state_dict(), straight_cb.state_dict())


def test_resume_without_callback_state_differs(tmp_path: Path) -> None:
    """Control for the resume test: dropping the callback state (fresh projections) changes the weights."""
    k = 3
    kwargs = _kwargs("adversarial")
    straight, _, ckpt = _straight_run_with_checkpoint(kwargs, tmp_path, k)
    state = torch.load(ckpt, weights_only=False)
    state["callbacks"] = {}
    torch.save(state, ckpt)
    resumed = TinyMLP(momentum=0.9, seed=123)
    cpu_trainer(max_steps=2 * k, callbacks=[CoMHE(**kwargs)]).fit(resumed, make_loader(k), ckpt_path=ckpt)
    assert max_abs_diff(resumed, straight) > 0


def test_projection_kind_needs_the_random_variant() -> None:
    assert CoMHE(variant="random", projection_kind="srht").regularizer_kwargs()["projection_kind"] == "srht"
    with pytest.raises(MisconfigurationException, match="projection_kind"):
        CoMHE(variant="angle", projection_kind="sparse")
    with pytest.raises(MisconfigurationException, match="projection_kind"):
        CoMHE(variant="random", projection_kind="dense")


def test_every_argument_reaches_the_regularizer() -> None:
    """Each CoMHE argument (but the schedule: ``every_n_steps``, ``log_every``, ``name``, ``shard``) reaches the
    regularizer."""
    values = {
        "variant": "adversarial",
        "weight": 0.3,
        "head_weight": 2.0,
        "power": "a1",
        "angular": True,
        "projection_dim": 5,
        "num_projections": 1,
        "resample_every": 3,
        "inner_steps": 4,
        "inner_lr": 0.2,
        "lookahead": "second",
        "include": ["net"],
        "exclude": "x",
        "head": "net.4",
        "grouped": "skip",
        "std_conv": "standardized",
        "projection_kind": "gaussian",
        "seed": 11,
        "ortho_normalize": True,
        "srip_iterations": 2,
        "srip_squared": True,
        "eps": 1e-3,
    }
    callback_params = set(inspect.signature(CoMHE).parameters) - {"every_n_steps", "log_every", "name", "shard"}
    assert callback_params == set(values)
    callback = CoMHE(**values)
    forwarded = callback.regularizer_kwargs()
    assert forwarded == values
    model = TinyMLP()
    reg = CoMHERegularizer(model, **{**forwarded, "std_conv": "raw", "include": None, "head": "auto"})
    assert reg.config == callback.energy_config
    assert reg.eps == 1e-3 and reg.seed == 11 and reg.inner_lr == 0.2 and reg.projection_dim == 5


def _owner(name: str) -> type:
    return next(cls for cls in (EnergyConfig, SelectionConfig, ScheduleConfig) if name in cls.__dataclass_fields__)


def test_signature_matches_the_config_fields() -> None:
    """The flat CoMHE signature is the one copy of the config fields: same names, order, defaults and types."""
    params = list(inspect.signature(CoMHE).parameters.values())
    config = config_fields()
    assert [p.name for p in params] == list(config)
    hints = typing.get_type_hints(CoMHE.__init__)
    for p in params:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, p.name
        assert p.default == config[p.name].default, p.name
        assert hints[p.name] == typing.get_type_hints(_owner(p.name))[p.name], p.name


def test_state_key_uses_identity_fields_only() -> None:
    a = CoMHE(variant="random", weight=1.0)
    b = CoMHE(variant="random", weight=3.0, projection_dim=10)
    assert a.state_key == b.state_key
    assert a.state_key != CoMHE(variant="random", include="net").state_key
    assert a.state_key != CoMHE(variant="random", name="x").state_key
    assert a.state_key != CoMHE(variant="angle").state_key


# ---------------------------------------------------------------------------------------------------------------------
# 7. several instances
# ---------------------------------------------------------------------------------------------------------------------
def test_two_instances_coexist(recwarn: pytest.WarningsRecorder) -> None:
    loader = make_loader(num_batches=3)
    model = TinyMLP()
    ref = clone_model(model)
    backbone = _kwargs("random", include=r"^net\.[02]$", head=None)
    head = {"variant": "mhe", "include": r"^net\.4$", "head": "net.4", "head_weight": 5.0}
    callbacks = [CoMHE(**backbone, name="backbone"), CoMHE(**head, name="head")]
    trainer = cpu_trainer(max_steps=3, callbacks=callbacks)
    trainer.fit(model, loader)
    regs = (CoMHERegularizer(ref, **backbone), CoMHERegularizer(ref, **head))
    reference_fit(ref, loader_batches(loader), max_steps=3, penalty_fn=regularizer_penalty(*regs))
    assert_params_close(model, ref)
    assert [layer.name for layer in callbacks[0].regularizer.selection.layers] == ["net.0", "net.2"]
    assert [layer.name for layer in callbacks[1].regularizer.selection.layers] == ["net.4"]
    assert {"comhe/backbone/penalty", "comhe/head/penalty"} <= set(trainer.callback_metrics)
    assert not [w for w in recwarn if "overwrite each other" in str(w.message)]


def test_duplicate_state_key_raises() -> None:
    with pytest.raises(RuntimeError, match="state_key"):
        Trainer(callbacks=[CoMHE(variant="random"), CoMHE(variant="random", weight=2.0)])


def test_instances_without_names_warn_about_log_collisions() -> None:
    callbacks = [CoMHE(variant="mhe", include=r"^net\.0$", head=None), CoMHE(variant="mhe", include=r"^net\.2$")]
    with pytest.warns(UserWarning, match="overwrite each other"):
        cpu_trainer(max_steps=1, callbacks=callbacks).fit(TinyMLP(), make_loader(num_batches=1))


# ---------------------------------------------------------------------------------------------------------------------
# 8. bad configuration
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"variant": "spherical"},
            r"`variant` must be one of 'mhe', 'half_mhe', 'random', 'angle', 'adversarial'.*got 'spherical'",
        ),
        ({"projection_dim": 0}, r"`projection_dim` must be an int >= 1.*got 0"),
        ({"num_projections": 0}, r"`num_projections` must be an int >= 1.*got 0"),
        ({"variant": "angle", "num_projections": 4}, r"`num_projections` must be 1 .*got 4"),
        ({"weight": -1.0}, r"`weight` must be a finite float >= 0.*got -1.0"),
        ({"head_weight": float("nan")}, r"`head_weight` must be a finite float >= 0.*got nan"),
        ({"resample_every": 0}, r"`resample_every` must be an int >= 1, got 0"),
        ({"log_every": 0}, r"`log_every` must be an int >= 1, got 0"),
        ({"inner_steps": -1}, r"`inner_steps` must be an int >= 0.*got -1"),
        ({"inner_lr": 0.0}, r"`inner_lr` must be a finite float > 0.*got 0.0"),
        ({"power": "b2"}, r"`power` must be .*got 'b2'"),
        ({"power": -1.0}, r"`power` must be .*got -1.0"),
        ({"lookahead": "third"}, r"`lookahead` must be one of 'none', 'first', 'second', got 'third'"),
        ({"grouped": "merge"}, r"`grouped` must be one of 'per_group', 'skip', got 'merge'"),
        ({"std_conv": "whitened"}, r"`std_conv` must be one of 'raw', 'standardized', got 'whitened'"),
        ({"include": "net.("}, r"`include` must hold valid regular expressions, got 'net.\('"),
        ({"exclude": ["ok", 3]}, r"`exclude` must be a regex string, a list of regex strings or None, got \['ok', 3\]"),
        ({"seed": -1}, r"`seed` must be an int >= 0, got -1"),
        ({"name": "a/b"}, r"`name` must be None or a non-empty string without '/', got 'a/b'"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(MisconfigurationException, match=match):
        CoMHE(**kwargs)


def test_include_matching_nothing_raises_at_setup() -> None:
    trainer = cpu_trainer(max_steps=1, callbacks=[CoMHE(variant="mhe", include=r"^backbone\.")])
    with pytest.raises(MisconfigurationException, match="No layer selected") as excinfo:
        trainer.fit(TinyMLP(), make_loader(num_batches=1))
    assert "include='^backbone\\\\.'" in str(excinfo.value)  # the message quotes the regex
    assert trainer.global_step == 0


def test_model_without_weights_raises() -> None:
    trainer = cpu_trainer(max_steps=1, callbacks=[CoMHE()])
    with pytest.raises(MisconfigurationException, match="cannot regularize NoWeights.*No layer selected"):
        trainer.fit(NoWeights(), make_loader(num_batches=1))


def test_single_neuron_layer_is_skipped_with_warning() -> None:
    model = TinyMLP(out_dim=1)  # the head has N = 1 neuron
    callback = CoMHE(variant="mhe")
    with pytest.warns(UserWarning, match=r"CoMHE skipped 1 layer.*net\.4: 1 neuron per set"):
        cpu_trainer(max_steps=1, callbacks=[callback]).fit(model, make_loader(num_batches=1))
    assert [layer.name for layer in callback.regularizer.selection.layers] == ["net.0", "net.2"]


def test_head_naming_a_missing_module_raises() -> None:
    trainer = cpu_trainer(max_steps=1, callbacks=[CoMHE(variant="mhe", head="classifier")])
    with pytest.raises(MisconfigurationException, match="head"):
        trainer.fit(TinyMLP(), make_loader(num_batches=1))


def test_fsdp_v1_configurations_it_cannot_serve_are_refused() -> None:
    """FSDP v1 runs (tests/test_distributed.py), except without ``use_orig_params`` or with hybrid sharding."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lightning_comhe._strategy import check_strategy

    # the check `CoMHE.setup` runs, on real strategies (Lightning itself refuses FSDPStrategy without CUDA, below)
    check_strategy(FSDPStrategy(), accumulate=4)  # Lightning's defaults: FULL_SHARD, use_orig_params=True
    check_strategy(FSDPStrategy(sharding_strategy="SHARD_GRAD_OP"), accumulate=1)
    with pytest.raises(MisconfigurationException, match=r"use_orig_params=True.*got use_orig_params=False.*HINT"):
        check_strategy(FSDPStrategy(use_orig_params=False), accumulate=1)
    for hybrid in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        with pytest.raises(MisconfigurationException, match=rf"FULL_SHARD, SHARD_GRAD_OP or NO_SHARD, got {hybrid}\."):
            check_strategy(FSDPStrategy(sharding_strategy=hybrid, auto_wrap_policy={torch.nn.Linear}), accumulate=1)


def test_lightning_itself_refuses_fsdp_v1_on_cpu() -> None:
    """Why the FSDP v1 tests run a subclass (``CPUFSDPStrategy``): Lightning runs ``FSDPStrategy`` only on CUDA."""
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
        Trainer(strategy=FSDPStrategy(), accelerator="cpu", devices=1, callbacks=[CoMHE()], logger=False)


def test_deepspeed_zero3_with_accumulation_is_refused() -> None:
    """ZeRO-3 is supported (tests/test_distributed.py), except with gradient accumulation: a clear error."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the [dev] extra on Linux; CI installs it")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_comhe._strategy import check_strategy

    with pytest.raises(MisconfigurationException, match=r"ZeRO stage 3 with gradient accumulation.*=2\).*HINT"):
        check_strategy(DeepSpeedStrategy(stage=3), accumulate=2)
    check_strategy(DeepSpeedStrategy(stage=3), accumulate=1)
    check_strategy(DeepSpeedStrategy(stage=2), accumulate=2)


def test_setup_ignores_other_stages() -> None:
    callback = CoMHE()
    callback.setup(SimpleNamespace(strategy=None, callbacks=[]), TinyMLP(), "validate")  # type: ignore[arg-type]
    assert callback.regularizer is None


# ---------------------------------------------------------------------------------------------------------------------
# deferred building: configure_model and lazy modules
# ---------------------------------------------------------------------------------------------------------------------
class _ConfiguredMLP(TinyMLP):
    """Creates its layers in ``configure_model`` (as FSDP2 / large-model code does)."""

    def build_net(self, seed: int, out_dim: int) -> nn.Module:
        self._seed, self._out_dim = seed, out_dim
        return None  # type: ignore[return-value]

    def configure_model(self) -> None:
        if self.net is None:
            self.net = super().build_net(self._seed, self._out_dim)


def test_layers_created_in_configure_model_are_found() -> None:
    model = _ConfiguredMLP()
    ref = TinyMLP()
    callback = CoMHE(variant="mhe")
    cpu_trainer(max_steps=2, callbacks=[callback]).fit(model, make_loader(num_batches=2))
    assert [layer.name for layer in callback.regularizer.selection.layers] == ["net.0", "net.2", "net.4"]
    penalty = functional_mhe_penalty(ref, ["net.0", "net.2"], "net.4", weight=1.0, head_weight=10.0, half_space=False)
    reference_fit(ref, loader_batches(make_loader(num_batches=2)), max_steps=2, penalty_fn=penalty)
    assert_params_close(model, ref)


def test_resume_with_deferred_build_applies_pending_state(tmp_path: Path) -> None:
    """With ``configure_model`` the regularizer is built in ``on_fit_start``, after Lightning restored the callback
    state: the state is kept until then."""
    k = 3
    kwargs = _kwargs("random")
    straight, straight_cb, ckpt = _straight_run_with_checkpoint(kwargs, tmp_path, k, model_cls=_ConfiguredMLP)
    resumed_cb = CoMHE(**kwargs)
    resumed = _ConfiguredMLP(momentum=0.9, seed=123)
    cpu_trainer(max_steps=2 * k, callbacks=[resumed_cb]).fit(resumed, make_loader(k), ckpt_path=ckpt)
    assert_params_equal(resumed, straight)
    assert_nested_equal(resumed_cb.state_dict(), straight_cb.state_dict())


def test_state_before_build_round_trips() -> None:
    state = {"version": 1, "last_refresh_step": 4, "regularizer": {"variant": "random", "refreshes": 5}}
    callback = CoMHE()
    callback.load_state_dict(state)
    assert callback.regularizer is None
    assert_nested_equal(callback.state_dict(), state)


class _LazyMLP(TinyMLP):
    def build_net(self, seed: int, out_dim: int) -> nn.Module:
        return nn.Sequential(nn.LazyLinear(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, out_dim))


def test_lazy_modules_are_built_at_first_backward() -> None:
    callback = CoMHE(variant="mhe")
    cpu_trainer(max_steps=2, callbacks=[callback]).fit(_LazyMLP(), make_loader(num_batches=2))
    layers = callback.regularizer.selection.layers
    assert [(layer.name, tuple(layer.module.weight.shape)) for layer in layers] == [
        ("net.0", (HIDDEN, IN_DIM)),
        ("net.2", (3, HIDDEN)),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# 9. logging
# ---------------------------------------------------------------------------------------------------------------------
def test_logging_penalty_every_step_and_energies_every_log_every(tmp_path: Path) -> None:
    callback = CoMHE(**_kwargs("random", log_every=2))
    logger = CSVLogger(tmp_path, name="logs", version=0)
    trainer = cpu_trainer(max_steps=5, callbacks=[callback], logger=logger, log_every_n_steps=1)
    trainer.fit(TinyMLP(), make_loader(num_batches=5))
    assert {"comhe/penalty", "comhe/energy/net.0", "comhe/energy/net.2", "comhe/energy/net.4"} <= set(
        trainer.logged_metrics
    )
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("comhe/penalty")}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    energy = {step: row["comhe/energy/net.0"] for step, row in rows.items()}
    # New energies at optimizer steps 0, 2, 4; in between Lightning re-emits the last value of a step-level key.
    assert energy[1] == energy[0] and energy[3] == energy[2]
    assert energy[0] != energy[2] != energy[4]
    assert len({row["comhe/penalty"] for row in rows.values()}) == 5  # the penalty is new at every step
    # The logged penalty is R = sum kappa * E (hidden kappa 0.1, head 1.0 here), logged before any scaling.
    row = rows[2]
    expected = 0.1 * sum(float(row[f"comhe/energy/net.{i}"]) for i in (0, 2)) + float(row["comhe/energy/net.4"])
    assert float(row["comhe/penalty"]) == pytest.approx(expected, rel=1e-5)


def test_named_instance_logs_under_its_prefix() -> None:
    trainer = cpu_trainer(max_steps=1, callbacks=[CoMHE(variant="mhe", name="reg")])
    trainer.fit(TinyMLP(), make_loader(num_batches=1))
    assert {"comhe/reg/penalty", "comhe/reg/energy/net.4"} <= set(trainer.callback_metrics)
    assert "comhe/penalty" not in trainer.callback_metrics


# ---------------------------------------------------------------------------------------------------------------------
# 10. torch.compile
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_submodule(backend: str) -> None:
    """``aot_eager`` exercises dynamo + AOTAutograd in about a second; ``inductor`` (C++ codegen) takes ~15 s."""
    loader = make_loader(num_batches=2)
    model = TinyMLP(compile_backend=backend)
    ref = TinyMLP()
    kwargs = _kwargs("random")
    callback = CoMHE(**kwargs)
    cpu_trainer(max_steps=2, callbacks=[callback]).fit(model, loader)
    names = [layer.name for layer in callback.regularizer.selection.layers]
    assert names == ["net._orig_mod.0", "net._orig_mod.2", "net._orig_mod.4"]
    # Reference on the uncompiled twin; projection streams are keyed by neuron-set shape, not by layer name.
    penalty = regularizer_penalty(CoMHERegularizer(ref, **kwargs))
    reference_fit(ref, loader_batches(loader), max_steps=2, penalty_fn=penalty)
    assert_params_close(model, ref, atol=1e-5, rtol=1e-4)


def test_compiled_lightning_module() -> None:
    """``trainer.fit(torch.compile(module))``: Lightning unwraps it, so the hooks see the original module."""
    loader = make_loader(num_batches=2)
    model = TinyMLP()
    ref = clone_model(model)
    kwargs = _kwargs("half_mhe")
    callback = CoMHE(**kwargs)
    cpu_trainer(max_steps=2, callbacks=[callback]).fit(torch.compile(model, backend="aot_eager"), loader)
    assert [layer.name for layer in callback.regularizer.selection.layers] == ["net.0", "net.2", "net.4"]
    reference_fit(
        ref, loader_batches(loader), max_steps=2, penalty_fn=regularizer_penalty(CoMHERegularizer(ref, **kwargs))
    )
    assert_params_close(model, ref, atol=1e-5, rtol=1e-4)


class _ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader with ``state_dict`` / ``load_state_dict`` (what Lightning needs to resume mid-epoch): it
    remembers how many batches of the current epoch it handed out, and skips them after a restore."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skip = 0
        self._served = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._served = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                self._served += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["served"]


@pytest.mark.parametrize("variant", ["random", "adversarial"])
def test_resume_from_a_mid_epoch_checkpoint_is_bit_exact(variant: str, tmp_path: Path) -> None:
    """A checkpoint after step 3 of 4-batch epochs (mid-epoch, off the resample window of 2), resumed with a
    loader Lightning can fast-forward: the same weights and callback state as the uninterrupted run."""
    kwargs = _kwargs(variant, resample_every=2) if variant == "random" else _kwargs(variant)

    def loader() -> _ResumableLoader:
        return _ResumableLoader(make_loader(4).dataset, batch_size=4, shuffle=False)

    straight_cb, straight = CoMHE(**kwargs), TinyMLP(momentum=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    cpu_trainer(max_steps=7, enable_checkpointing=True, callbacks=[straight_cb, ckpt]).fit(straight, loader())
    path = tmp_path / "step=3.ckpt"
    saved = torch.load(path, weights_only=False)
    assert saved["callbacks"][straight_cb.state_key]["last_refresh_step"] == 2
    assert saved["epoch"] == 0  # mid-epoch

    resumed_cb, resumed = CoMHE(**kwargs), TinyMLP(momentum=0.9, seed=123)
    cpu_trainer(max_steps=7, callbacks=[resumed_cb]).fit(resumed, loader(), ckpt_path=path)
    assert_params_equal(resumed, straight)
    assert_nested_equal(resumed_cb.state_dict(), straight_cb.state_dict())
