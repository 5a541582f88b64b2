"""The common base of the ``comhe`` data modules: loaders over three splits, argument checks, the seeded split."""

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_comhe.cli.errors import DataError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassificationDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"`{name}` must be an int >= 1, got {value!r}.")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise DataError(f"`{name}` must be a float in [0, 1), got {value!r}.")


def _split_indices(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Seeded random split of ``range(n)``: the first part gets the rest, the others ``round(f * n)`` each."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [round(f * n) for f in fractions]
    first = n - sum(sizes)
    if first < 1 or any(s < 1 for s, f in zip(sizes, fractions, strict=True) if f > 0):
        raise DataError(f"Cannot split {n} samples into fractions {list(fractions)}: a split would be empty.")
    parts, start = [perm[:first]], first
    for size in sizes:
        parts.append(perm[start : start + size])
        start += size
    return parts


class ClassificationDataModule(LightningDataModule):
    """Common base: loaders over ``train_set`` / ``val_set`` / ``test_set`` built in :meth:`setup`.

    Args:
        batch_size: Samples per batch (all splits).
        num_workers: DataLoader worker processes (0: load in the main process).

    Attributes:
        num_classes: Number of classes.
        image_size: Side of the (square) images in a batch.
        in_chans: Number of image channels.
        classes: Class names, in label order.
    """

    num_classes: int
    image_size: int
    in_chans: int = 3

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        _check_positive_int("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise DataError(f"`num_workers` must be an int >= 0, got {num_workers!r}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.classes: list[str] = []
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before the {split} dataloader is requested.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader(self.val_set, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader(self.test_set, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test split (labels included; the model's ``predict_step`` ignores them)."""
        return self._loader(self.test_set, "predict", shuffle=False)
