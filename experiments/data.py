"""The data sets of the experiments: digits or a local CIFAR folder, split once per process."""

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class DataSpec:
    """Which data set a run uses.

    Attributes:
        kind: ``"digits"`` (scikit-learn's built-in digits, fixed 70/15/15 split with seed 0), ``"cifar10"`` or
            ``"cifar100"`` (a local folder in the official python format, 10% of the training set held out for
            validation with seed 0, the official test set for testing).
        root: The CIFAR folder (ignored for digits).
        image_size: Input side (digits are resized from 8×8).
        batch_size: Training batch size.
        max_train_samples: Use only the first this many training samples (``None``: all).
        max_eval_samples: Evaluate on only the first this many validation / test samples (``None``: all).
    """

    kind: str = "digits"
    root: str | None = None
    image_size: int = 16
    batch_size: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    @property
    def label(self) -> str:
        """A short name for tables."""
        return {"digits": "digits", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(self.kind, self.kind)


@dataclass
class Splits:
    """The three splits of a data set and its number of classes."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int


_SPLITS_CACHE: dict[DataSpec, Splits] = {}


def _head(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


def load_splits(spec: DataSpec) -> Splits:
    """Load (once per process) the splits of ``spec``, reusing the ``comhe`` CLI's DataModules.

    Raises:
        ValueError: For an unknown data kind.
        lightning_comhe.cli.errors.DataError: For a missing or malformed CIFAR folder.
    """
    if spec in _SPLITS_CACHE:
        return _SPLITS_CACHE[spec]
    from lightning_comhe.cli.data import CIFARDataModule, DigitsDataModule

    if spec.kind == "digits":
        dm: Any = DigitsDataModule(image_size=spec.image_size, batch_size=spec.batch_size, seed=0)
    elif spec.kind in ("cifar10", "cifar100"):
        if spec.root is None:
            raise ValueError("CIFAR needs a folder: pass --cifar-root.")
        dm = CIFARDataModule(
            spec.root, variant=spec.kind, batch_size=spec.batch_size, val_split=0.1, seed=0, image_size=spec.image_size
        )
    else:
        raise ValueError(f"unknown data kind {spec.kind!r}.")
    dm.setup("fit")
    splits = Splits(
        train=_head(dm.train_set, spec.max_train_samples),
        val=_head(dm.val_set, spec.max_eval_samples),
        test=_head(dm.test_set, spec.max_eval_samples),
        num_classes=int(dm.num_classes),
    )
    _SPLITS_CACHE[spec] = splits
    return splits
