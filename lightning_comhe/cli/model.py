"""``TimmClassifier``: any timm model as a LightningModule image classifier, and ``create_timm_model``."""

import difflib
import math
from typing import Any, Literal, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torchmetrics.classification import MulticlassAccuracy

from lightning_comhe.cli.errors import ModelError

__all__ = ["SGD_DEFAULTS", "TimmClassifier", "close_model_names", "create_timm_model"]

#: The default optimizer of :class:`TimmClassifier`: ``torch.optim.SGD(params, **SGD_DEFAULTS)``.
SGD_DEFAULTS: dict[str, float] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def close_model_names(name: str, limit: int = 5) -> list[str]:
    """Names of timm models close to ``name``: names starting with it, then similar ones, then ones containing it."""
    import timm

    base = name.split(".", 1)[0].lower()
    if not base:
        return []
    everything = timm.list_models()
    prefixed = sorted((n for n in everything if n.startswith(base)), key=len)
    similar = difflib.get_close_matches(base, everything, n=limit, cutoff=0.6)
    containing = sorted(timm.list_models(f"*{base}*"), key=len)
    return list(dict.fromkeys(prefixed[:limit] + similar + containing))[:limit]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def create_timm_model(
    model_name: str,
    num_classes: int | None = None,
    pretrained: bool = False,
    in_chans: int = 3,
    img_size: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model`` with one-line :class:`~lightning_comhe.cli.errors.ModelError` s for user mistakes.

    Args:
        model_name: A timm model name (``timm.list_models()``), optionally with a pretrained tag
            (``resnet18.a1_in1k``) or a source prefix (``hf-hub:...``, ``local-dir:...``).
        num_classes: Classifier outputs; ``None`` keeps the model's default (1000 for ImageNet models).
        pretrained: Load pretrained weights (from the Hugging Face Hub cache, downloaded on first use).
        in_chans: Input channels.
        img_size: Input size, for models that need it (ViT, Swin, ...); ``None``: the model's default.
        model_kwargs: More keyword arguments for ``timm.create_model`` (e.g. ``drop_path_rate``).

    Raises:
        ModelError: For an unknown model name (with close matches), unavailable pretrained weights, or arguments the
            model does not accept.
    """
    import timm

    if not isinstance(model_name, str) or not model_name:
        raise ModelError(f"`model_name` must be a timm model name, got {model_name!r}.")
    has_source = ":" in model_name and not model_name.startswith(("/", "\\"))
    if not has_source and not timm.is_model(model_name):
        close = close_model_names(model_name)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ModelError(f"unknown timm model {model_name!r}{hint} (all names: timm.list_models())")
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if in_chans != 3:
        kwargs["in_chans"] = in_chans
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except Exception as err:  # noqa: BLE001 - timm raises many types; all are user-facing here
        if pretrained:
            raise ModelError(
                f"cannot load pretrained weights for {model_name!r} ({_first_line(err)}). Weights come from the "
                "Hugging Face Hub on first use (network needed) and are cached under HF_HOME; pre-fill the cache, or "
                "train from random weights with pretrained=False."
            ) from err
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ModelError(
            f"cannot create timm model {model_name!r} with {shown or 'no arguments'}: {_first_line(err)}"
        ) from err


class TimmClassifier(LightningModule):
    """A timm model trained for image classification with cross-entropy.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc`` (top-1 accuracy,
    per epoch; the training loss also per step). ``predict_step`` returns class probabilities.

    From the ``comhe`` command, the optimizer and scheduler are set like any LightningCLI callable, e.g.
    ``--model.optimizer AdamW --model.optimizer.lr 1e-3`` and
    ``--model.lr_scheduler CosineAnnealingLR --model.lr_scheduler.T_max 20``.

    Args:
        model_name: A timm model name, see ``timm.list_models()`` (also ``name.tag``, ``hf-hub:...``).
        num_classes: Number of classes (the ``comhe`` command takes it from the data module).
        pretrained: Start from timm's pretrained weights (downloaded from the Hugging Face Hub on first use, then
            cached); the classifier is re-initialized when ``num_classes`` differs from the pretrained one.
        in_chans: Input channels (the ``comhe`` command takes it from the data module).
        img_size: Input size for models that need it at construction (ViT, Swin, MLP-Mixer, ...); ``None``: the
            model's default. Only for models that accept it (ResNets and most CNNs do not).
        drop_rate: Dropout before the classifier.
        label_smoothing: Label smoothing of the cross-entropy.
        model_kwargs: More keyword arguments for ``timm.create_model`` (e.g. ``{"drop_path_rate": 0.1}``).
        optimizer: A callable ``params -> Optimizer``. ``None``: SGD, lr 0.05, momentum 0.9, weight decay 5e-4.
        lr_scheduler: ``"cosine"``: cosine decay from the optimizer's learning rate to 0 over the whole run
            (``trainer.estimated_stepping_batches``, stepped every optimizer step); ``"constant"``: none; or a
            callable ``optimizer -> LRScheduler`` stepped once per epoch (``ReduceLROnPlateau`` monitors
            ``val/loss``).

    Raises:
        ModelError: For an unknown model name (with close matches) or unavailable pretrained weights.

    Example::

        >>> model = TimmClassifier("resnet10t", num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model_name: str = "resnet10t",
        num_classes: int = 10,
        pretrained: bool = False,
        in_chans: int = 3,
        img_size: int | None = None,
        drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: Union[Literal["cosine", "constant"], LRSchedulerCallable] = "cosine",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ModelError(f"`num_classes` must be an int >= 1, got {num_classes!r}.")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        kwargs = dict(model_kwargs or {})
        if drop_rate:
            kwargs["drop_rate"] = drop_rate
        self.model = create_timm_model(model_name, num_classes, pretrained, in_chans, img_size, kwargs)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.model(x)

    def _shared_step(self, batch: Any, stage: str, acc: MulticlassAccuracy) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        acc(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Cross-entropy on a training batch."""
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and accuracy on a validation batch."""
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Loss and accuracy on a test batch."""
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities ``(B, num_classes)``."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        """The configured optimizer (default SGD) and learning-rate schedule (default cosine)."""
        if self.optimizer is None:
            optimizer = torch.optim.SGD(self.parameters(), **SGD_DEFAULTS)
        else:
            optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler == "constant":
            return optimizer
        if self.lr_scheduler == "cosine":
            try:
                total = max(1, int(self.trainer.estimated_stepping_batches))
            except RuntimeError:  # not attached to a Trainer (called by hand): a one-step schedule
                total = 1

            def cosine(step: int) -> float:
                return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": LambdaLR(optimizer, cosine), "interval": "step"},
            }
        if not callable(self.lr_scheduler):
            raise ModelError(f"`lr_scheduler` must be 'cosine', 'constant' or a callable, got {self.lr_scheduler!r}.")
        scheduler = self.lr_scheduler(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
