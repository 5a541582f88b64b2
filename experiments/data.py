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
        per_class: Train on a stratified subset of this many images per class, drawn from the training split with
            the run's seed (:func:`per_class_subset`; ``None``: the whole training split). The validation and test
            splits stay whole.
    """

    kind: str = "digits"
    root: str | None = None
    image_size: int = 16
    batch_size: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    per_class: int | None = None

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


def _labels(dataset: Dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def per_class_subset(dataset: Dataset, per_class: int, seed: int) -> Subset:
    """A seeded, stratified subset: ``per_class`` images of every class, in a seeded order.

    The same ``(dataset, per_class, seed)`` always gives the same subset, so runs that share a seed share their
    training images (the rows of a low-data table are paired by subset). The subsets of two sizes with one seed are
    nested (the first ``per_class`` of one seeded permutation per class).

    Args:
        dataset: The training split (items ``(x, label)``).
        per_class: Images per class, ``>= 1``.
        seed: Seed of the draw.

    Raises:
        ValueError: When ``per_class < 1`` or a class has fewer than ``per_class`` images.
    """
    import torch

    if per_class < 1:
        raise ValueError(f"`per_class` must be >= 1, got {per_class!r}.")
    labels = torch.tensor(_labels(dataset))
    gen = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in sorted(set(labels.tolist())):
        members = torch.nonzero(labels == label).flatten()
        if len(members) < per_class:
            raise ValueError(
                f"`per_class` must be at most {len(members)} (the images of class {label}), got {per_class}."
            )
        chosen += members[torch.randperm(len(members), generator=gen)[:per_class]].tolist()
    order = torch.randperm(len(chosen), generator=gen).tolist()
    return Subset(dataset, [chosen[i] for i in order])


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
