"""``CIFARDataModule``: CIFAR-10 / CIFAR-100 from a local folder in the official python (pickle) format."""

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_comhe.cli.data.base import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    ClassificationDataModule,
    _check_fraction,
    _check_positive_int,
    _split_indices,
)
from lightning_comhe.cli.errors import DataError, DataNotFoundError

__all__ = ["CIFARDataModule"]

_CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "num_classes": 100,
    },
}


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, ImportError) as err:
        raise DataError(f"{path} is not a CIFAR python-format pickle: {err}") from err
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python-format pickle: expected a dict, got {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class _ImageTensorDataset(Dataset):
    """uint8 ``(N, C, H, W)`` images with CIFAR-style augmentation, resizing and normalization on the fly."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        image_size: int,
        padding: int = 4,
    ) -> None:
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.image_size = image_size
        self.padding = padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.images[index].float().div_(255.0)
        if self.augment:
            p = self.padding
            h, w = x.shape[-2:]
            padded = F.pad(x, (p, p, p, p))
            top, left = (int(v) for v in torch.randint(0, 2 * p + 1, (2,)))
            x = padded[:, top : top + h, left : left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
        return x, self.labels[index]


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 from a local folder in the official python (pickle) format; never downloads.

    ``root`` is the extracted ``cifar-10-batches-py`` (``data_batch_1`` … ``data_batch_5``, ``test_batch``,
    ``batches.meta``) or ``cifar-100-python`` (``train``, ``test``, ``meta``; fine labels) folder, or a folder that
    contains it. Get the archives from https://www.cs.toronto.edu/~kriz/cifar.html and extract them with
    ``tar xzf``. The files are Python pickles: only load files from a source you trust.

    The test split is the official test set. The validation split is ``val_split`` of the training set (seeded), or
    the test set when ``val_split`` is 0 (the common CIFAR practice). Training augmentation (``augment``): random
    32×32 crops of the image zero-padded by 4 pixels, and horizontal flips. Images are normalized with the dataset's
    channel statistics and resized to ``image_size`` if it is not 32.

    Args:
        root: The folder (see above).
        variant: ``"cifar10"`` or ``"cifar100"``.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_split: Fraction of the training set held out for validation (0: validate on the test set).
        seed: Seed of the split.
        augment: Random crops and flips on the training split.
        image_size: Side of the images fed to the model (bilinear resize from 32).

    Raises:
        DataNotFoundError: If the folder or one of its files is missing.
        DataError: If a file is not in the official format.
    """

    def __init__(
        self,
        root: str,
        variant: Literal["cifar10", "cifar100"] = "cifar10",
        batch_size: int = 128,
        num_workers: int = 0,
        val_split: float = 0.0,
        seed: int = 0,
        augment: bool = True,
        image_size: int = 32,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if variant not in _CIFAR_LAYOUT:
            raise DataError(f"`variant` must be 'cifar10' or 'cifar100', got {variant!r}.")
        _check_fraction("val_split", val_split)
        _check_positive_int("image_size", image_size)
        self.variant = variant
        self.layout = _CIFAR_LAYOUT[variant]
        self.folder = self._find_folder(Path(root).expanduser())
        self.val_split = val_split
        self.seed = seed
        self.augment = augment
        self.image_size = image_size
        self.in_chans = 3
        self.num_classes = int(self.layout["num_classes"])
        meta_path = self.folder / str(self.layout["meta"])
        names = _load_pickle(meta_path).get(str(self.layout["names"])) if meta_path.is_file() else None
        self.classes = [str(n) for n in names] if isinstance(names, list) else [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise DataError(f"{meta_path} lists {len(self.classes)} classes; {variant} has {self.num_classes}.")
        self.mean, self.std = (CIFAR10_MEAN, CIFAR10_STD) if variant == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)

    def _find_folder(self, root: Path) -> Path:
        layout = self.layout
        if not root.exists():
            raise DataNotFoundError(f"CIFAR folder not found: {root}")
        files: list[str] = [*layout["train"], *layout["test"]]  # type: ignore[misc]
        for candidate in (root / str(layout["folder"]), root):
            if candidate.is_dir() and all((candidate / f).is_file() for f in files):
                return candidate
        archive = root / str(layout["archive"])
        if archive.is_file():
            raise DataError(f"{archive} is not extracted: run `tar xzf {archive} -C {root}`.")
        folder = root / str(layout["folder"]) if (root / str(layout["folder"])).is_dir() else root
        missing = [f for f in files if not (folder / f).is_file()]
        raise DataNotFoundError(
            f"{self.variant} files not found in {folder}: missing {', '.join(missing)} (expected the official python "
            f"version, the extracted {layout['archive']})."
        )

    def _read(self, names: list[str]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        label_key = str(self.layout["labels"])
        for name in names:
            path = self.folder / name
            entry = _load_pickle(path)
            if "data" not in entry or label_key not in entry:
                raise DataError(f"{path} is not a {self.variant} batch: it has no 'data' and '{label_key}' entries.")
            data = np.asarray(entry["data"])
            target = np.asarray(entry[label_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(target):
                raise DataError(
                    f"{path}: 'data' must be a uint8 array of shape (N, 3072) with N labels, got {data.dtype} "
                    f"{data.shape} with {len(target)} labels."
                )
            if len(target) and (target.min() < 0 or target.max() >= self.num_classes):
                raise DataError(f"{path}: labels must be in [0, {self.num_classes}).")
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.from_numpy(target.astype(np.int64)))
        return torch.cat(images), torch.cat(labels)

    def setup(self, stage: str | None = None) -> None:
        """Read the pickles and build the splits (once)."""
        if self.train_set is not None:
            return
        train_x, train_y = self._read(list(self.layout["train"]))  # type: ignore[arg-type]
        test_x, test_y = self._read(list(self.layout["test"]))  # type: ignore[arg-type]

        def make(x: Tensor, y: Tensor, augment: bool) -> Dataset:
            return _ImageTensorDataset(x, y, self.mean, self.std, augment, self.image_size)

        self.test_set = make(test_x, test_y, augment=False)
        if self.val_split > 0:
            train_idx, val_idx = _split_indices(len(train_y), [self.val_split], self.seed)
            self.train_set = make(train_x[train_idx], train_y[train_idx], augment=self.augment)
            self.val_set = make(train_x[val_idx], train_y[val_idx], augment=False)
        else:
            self.train_set = make(train_x, train_y, augment=self.augment)
            self.val_set = self.test_set
