"""timm sweep: layer discovery and one real ``Trainer`` step per variant on 40+ timm architectures.

Every model is created with random weights at a small size (32×32 inputs where the architecture allows, a few
blocks fewer for the deepest ones) and wrapped in the project's :class:`TimmClassifier`. For each architecture:

* discovery selects exactly the weights that an independent oracle (written here from the documented rules, not
  from :mod:`lightning_comhe.discovery`) expects: the ``weight`` of every trainable ``Linear`` / ``Conv*`` /
  ``ConvTranspose*`` / timm ``CondConv2d`` with at least two neurons per group of dimension ``d >= 2``, and
  nothing else (no norms,
  embeddings, tokens, position tables, layer scales, biases); the head is ``get_classifier()``;
* a real ``Trainer`` step runs with each variant of the callback; the task loss is multiplied by 0, so the gradient
  seen in ``on_before_optimizer_step`` is the penalty's alone: it must be finite and non-zero on every selected
  weight and exactly zero on every other parameter; the logged penalty is finite and positive, and a finite energy
  is logged for every selected layer.

Projections are kept small (k = 8, C = 2, two adversarial inner steps) so the ~350 Trainer steps fit the CI budget.
"""

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from timm.layers import CondConv2d, MixedConv2d
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_comhe import CoMHE
from lightning_comhe.cli.model import TimmClassifier
from lightning_comhe.discovery import discover_layers
from tests.helpers import cpu_trainer

NUM_CLASSES = 5

# name -> (family, timm.create_model kwargs, input size)
ARCHS: dict[str, tuple[str, dict[str, Any], int]] = {
    # ResNet / ResNeXt / ResNet-v2 (BiT: weight-standardized convs)
    "resnet18": ("resnet", {"layers": [1, 1, 1, 1]}, 32),
    "resnet10t": ("resnet", {}, 32),
    "resnext26ts": ("resnet", {}, 32),
    "seresnext26d_32x4d": ("resnet", {"layers": [1, 1, 1, 1]}, 32),
    "resnetv2_18": ("resnet", {}, 32),
    "resnetv2_50x1_bit": ("resnet", {}, 32),
    # RegNet
    "regnetx_002": ("regnet", {}, 32),
    "regnety_002": ("regnet", {}, 32),
    # EfficientNet / MobileNet (depthwise convs)
    "efficientnet_b0": ("efficientnet", {}, 32),
    "mobilenetv2_035": ("efficientnet", {}, 32),
    "mobilenetv3_small_050": ("efficientnet", {}, 32),
    "tinynet_e": ("efficientnet", {}, 32),
    "lcnet_050": ("efficientnet", {}, 32),
    # CondConv and MixedConv
    "efficientnet_cc_b0_4e": ("condconv", {}, 32),
    "mixnet_s": ("mixconv", {}, 32),
    # ConvNeXt
    "convnext_atto": ("convnext", {}, 32),
    "test_convnext": ("convnext", {}, 32),
    # ViT / DeiT and relatives (fused qkv)
    "vit_tiny_patch16_224": ("vit", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "deit_tiny_distilled_patch16_224": ("vit", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "eva02_tiny_patch14_224": ("vit", {"img_size": 28, "patch_size": 7, "depth": 2}, 28),
    "cait_xxs24_224": ("vit", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "beit_base_patch16_224": (
        "vit",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
        32,
    ),
    "xcit_nano_12_p16_224": ("vit", {"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "pit_ti_224": ("vit", {"img_size": 32}, 32),
    "levit_128s": ("vit", {"img_size": 32}, 32),
    # Swin
    "swin_tiny_patch4_window7_224": (
        "swin",
        {"img_size": 32, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1)},
        32,
    ),
    "swinv2_cr_tiny_224": ("swin", {"img_size": 32, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1)}, 32),
    # MLP-Mixer and relatives
    "mixer_s16_224": ("mlp_mixer", {"img_size": 32}, 32),
    "resmlp_12_224": ("mlp_mixer", {"img_size": 32}, 32),
    "gmlp_ti16_224": ("mlp_mixer", {"img_size": 32}, 32),
    # DenseNet
    "densenet121": ("densenet", {"block_config": (1, 1, 1, 1)}, 32),
    # more families
    "ghostnet_050": ("ghostnet", {}, 32),
    "repvgg_a0": ("repvgg", {}, 32),
    "dla34": ("dla", {}, 32),
    "cspresnet50": ("cspnet", {}, 32),
    "nf_resnet26": ("nfnet", {}, 32),
    "hrnet_w18_small": ("hrnet", {}, 64),
    "rexnet_100": ("rexnet", {}, 32),
    "edgenext_xx_small": ("edgenext", {}, 32),
    "mobilevit_xxs": ("mobilevit", {}, 64),
    "fastvit_t8": ("fastvit", {}, 32),
    "poolformerv2_s12": ("metaformer", {}, 32),
    "dpn48b": ("dpn", {}, 32),
    "test_maxvit": ("maxvit", {}, 160),
}

REQUIRED_FAMILIES = {
    "resnet",
    "regnet",
    "efficientnet",
    "convnext",
    "vit",
    "swin",
    "mlp_mixer",
    "densenet",
    "condconv",
    "mixconv",
}

VARIANTS: dict[str, dict[str, Any]] = {
    "mhe": {},
    "half_mhe": {},
    "random": {"projection_dim": 8, "num_projections": 2},
    "angle": {"projection_dim": 8, "inner_steps": 1},
    "adversarial": {"projection_dim": 8, "inner_steps": 2},
    "orthogonal": {},
    "orthonormal": {},
    "srip": {},
}


def test_sweep_covers_the_required_families():
    families = {family for family, _, _ in ARCHS.values()}
    assert len(ARCHS) >= 30 and len(families) >= 10
    assert REQUIRED_FAMILIES <= families
    assert set(VARIANTS) == set(CoMHE.__init__.__annotations__["variant"].__args__)


# ------------------------------------------------------------------------------------------------ helpers
class _GradientOnly(TimmClassifier):
    """The classifier with its task loss multiplied by 0: after backward, ``p.grad`` is the penalty's gradient."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return 0.0 * super().training_step(batch, batch_idx)


def _module(name: str) -> TimmClassifier:
    _, kwargs, _ = ARCHS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _GradientOnly(name, num_classes=NUM_CLASSES, model_kwargs=kwargs, lr_scheduler="constant")


def _loader(name: str) -> DataLoader:
    size = ARCHS[name][2]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=g)
    y = torch.tensor([0, 3])
    return DataLoader(TensorDataset(x, y), batch_size=2)


def _neurons_per_group(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.out_channels // module.groups  # Conv*, ConvTranspose*, CondConv2d


def _neuron_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels // module.groups * math.prod(module.kernel_size)  # Conv*, ConvTranspose*, CondConv2d


def expected_weights(model: nn.Module) -> set[str]:
    """The oracle: qualified names of the parameters CoMHE must regularize, from the documented rules alone.

    A weight is regularized when it has at least two neurons per group and neurons of dimension d >= 2 (neurons of
    dimension 1 are all collinear).
    """
    expected = set()
    for module_name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or not weight.requires_grad:
            continue
        if (
            isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, CondConv2d))
            and _neurons_per_group(module) >= 2
            and _neuron_dim(module) >= 2
        ):
            expected.add(f"{module_name}.weight" if module_name else "weight")
    return expected


def covered_weights(model: nn.Module, selection: Any) -> set[str]:
    """Qualified names of the parameters entering the selection's neuron sets."""
    names = {id(p): n for n, p in model.named_parameters()}
    covered = set()
    for layer in selection:
        params = layer.module.parameters() if isinstance(layer.module, MixedConv2d) else [layer.module.weight]
        covered.update(names[id(p)] for p in params if p.ndim >= 2)
    return covered


class _GradCapture(Callback):
    """Copies every parameter's gradient right before the optimizer step (after the penalty's backward)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor | None] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in pl_module.named_parameters()}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(ARCHS))
def test_discovery_matches_oracle(name):
    module = _module(name)
    selection = discover_layers(module)

    expected = expected_weights(module)
    assert covered_weights(module, selection) == expected

    # every candidate weight that is not selected is reported as skipped, with a reason
    skipped = dict(selection.skipped)
    modules = dict(module.named_modules())
    for module_name, mod in modules.items():
        if (
            isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, CondConv2d))
            and f"{module_name}.weight" not in expected
        ):
            parents = [p for p in skipped if module_name == p or module_name.startswith(p + ".")]
            assert parents, f"{module_name} neither selected nor skipped"
            reason = skipped[parents[0]]
            if _neurons_per_group(mod) < 2:
                assert "1 neuron per set" in reason, reason
            else:  # then d = 1
                assert reason == "neurons of dimension d=1 are all collinear (no energy to minimize)", reason

    # the head(s) are timm's classifier(s), with NUM_CLASSES neurons
    classifiers = module.model.get_classifier()
    classifiers = classifiers if isinstance(classifiers, (tuple, list)) else [classifiers]
    head_modules = [layer.module for layer in selection.heads]
    assert head_modules and len(head_modules) == len(classifiers)
    for head, classifier in zip(head_modules, classifiers, strict=True):
        assert head is classifier or any(head is m for m in classifier.modules())
    assert all(layer.shapes()[0][:2] == (1, NUM_CLASSES) for layer in selection.heads)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(ARCHS))
def test_trainer_step(name, variant):
    module = _module(name)
    expected = expected_weights(module)
    # A zero neuron has no direction, so its energy gradient is exactly 0 (official code too); timm zero-initializes
    # some heads (MLP-Mixer, ResMLP). Such weights must stay finite and untouched; every other one must move.
    zero_init = {n for n, p in module.named_parameters() if n in expected and not p.any()}
    comhe = CoMHE(variant=variant, seed=3, log_every=1, **VARIANTS[variant])
    capture = _GradCapture()
    trainer = cpu_trainer(max_steps=1, callbacks=[comhe, capture])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(name))
    assert trainer.global_step == 1

    selection = comhe.regularizer.selection
    assert covered_weights(module, selection) == expected
    assert zero_init <= covered_weights(module, selection.heads), "only zero-initialized heads may have no gradient"

    penalty = float(trainer.callback_metrics["comhe/penalty"])
    assert math.isfinite(penalty) and penalty > 0, penalty
    for layer in selection:
        energy = trainer.callback_metrics[f"comhe/energy/{layer.name}"]
        assert torch.isfinite(energy), layer.name

    grads = capture.grads
    assert grads, "on_before_optimizer_step did not run"
    for pname, grad in grads.items():
        if pname in expected:
            assert grad is not None and torch.isfinite(grad).all(), pname
            if pname in zero_init:
                assert not grad.any(), pname
            else:
                assert grad.abs().max() > 0, f"no penalty gradient reached selected weight {pname}"
        else:
            assert grad is None or not grad.any(), f"penalty gradient leaked into {pname}"


def test_docs_list_the_swept_architectures():
    text = (Path(__file__).resolve().parents[1] / "docs" / "discovery.md").read_text(encoding="utf-8")
    missing = [name for name in ARCHS if f"`{name}`" not in text]
    assert not missing, f"docs/discovery.md does not list {missing}"
