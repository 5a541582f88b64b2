"""``ImageFolderDataModule``: your own images in class sub-folders (``torchvision.datasets.ImageFolder``)."""

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from lightning_comhe.cli.data.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataModule,
    _check_fraction,
    _check_positive_int,
    _split_indices,
)
from lightning_comhe.cli.errors import DataError, DataNotFoundError

__all__ = ["ImageFolderDataModule"]

_VAL_NAMES = ("val", "valid", "validation")


def _first_image(folder: Path) -> Path | None:
    from torchvision.datasets.folder import is_image_file

    for dirpath, _, filenames in os.walk(folder, followlinks=True):
        for filename in filenames:
            if is_image_file(filename):
                return Path(dirpath) / filename
    return None


def _folder_classes(folder: Path) -> list[str]:
    """Class names of an ImageFolder directory, with a clear error when it is not one."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        found = [p.name for p in folder.iterdir()][:5]
        raise DataError(
            f"{folder} has no class sub-folders: expected {folder}/<class name>/<image>, e.g. {folder}/cat/001.png"
            + (f" (found files: {', '.join(found)})" if found else " (the folder is empty)")
            + "."
        )
    if _first_image(folder) is None:
        raise DataError(
            f"{folder} has class sub-folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) but no "
            f"images in them (accepted extensions: {' '.join(IMG_EXTENSIONS)})."
        )
    return classes


class ImageFolderDataModule(ClassificationDataModule):
    """Your own images in class sub-folders (``torchvision.datasets.ImageFolder``).

    Accepted layouts:

    * ``root/train/<class>/*.png`` with ``root/val/<class>/...`` (also ``valid`` or ``validation``) and optionally
      ``root/test/<class>/...``. Without a val folder, ``val_split`` of ``train`` is held out (seeded).
    * ``root/<class>/*.png``: a single folder, split into train and val by ``val_split`` (seeded).

    Without a test folder, the test split is the validation split. Class names and label order come from the
    training folder; the val and test folders must have the same class sub-folders (they may be empty).
    Images are converted to RGB. Training: ``RandomResizedCrop(image_size)`` and horizontal flips (``augment``);
    evaluation: resize to ``image_size / 0.875`` and center crop.

    Args:
        root: The dataset folder.
        image_size: Side of the square crops fed to the model.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_split: Fraction of the training images held out for validation when there is no val folder.
        seed: Seed of the split.
        augment: Random resized crops and flips on the training split.
        mean: Per-channel normalization mean (default: ImageNet's, as for timm models).
        std: Per-channel normalization standard deviation.

    Raises:
        DataNotFoundError: If ``root`` does not exist.
        DataError: If the layout is wrong (no class sub-folders, no images, different classes in train and val).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 0,
        val_split: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(batch_size, num_workers)
        _check_positive_int("image_size", image_size)
        _check_fraction("val_split", val_split)
        path = Path(root).expanduser()
        if not path.exists():
            raise DataNotFoundError(f"image folder not found: {path}")
        if not path.is_dir():
            raise DataError(f"image folder {path} is a file, not a folder of class sub-folders.")
        self.root = path
        self.image_size = image_size
        self.val_split = val_split
        self.seed = seed
        self.augment = augment
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.in_chans = 3

        train_dir = path / "train"
        self.train_dir = train_dir if train_dir.is_dir() else path
        self.val_dir = next((path / n for n in _VAL_NAMES if (path / n).is_dir()), None) if train_dir.is_dir() else None
        self.test_dir = (path / "test") if train_dir.is_dir() and (path / "test").is_dir() else None
        self.classes = _folder_classes(self.train_dir)
        for other in (self.val_dir, self.test_dir):
            if other is None:
                continue
            other_classes = sorted(entry.name for entry in os.scandir(other) if entry.is_dir())
            if other_classes != self.classes:
                missing = sorted(set(self.classes) - set(other_classes))
                extra = sorted(set(other_classes) - set(self.classes))
                raise DataError(
                    f"{other} must have the same class sub-folders as {self.train_dir}; "
                    f"missing: {missing[:5] or 'none'}, extra: {extra[:5] or 'none'}."
                )
        if self.val_dir is None and val_split <= 0:
            raise DataError(f"{path} has no val folder, so `val_split` must be > 0, got {val_split}.")
        self.num_classes = len(self.classes)

    def _transforms(self, train: bool) -> Any:
        from torchvision import transforms as T

        if train and self.augment:
            ops = [T.RandomResizedCrop(self.image_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
        else:
            ops = [T.Resize(int(round(self.image_size / 0.875))), T.CenterCrop(self.image_size)]
        return T.Compose([*ops, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def _image_folder(self, folder: Path, train: bool, allow_empty: bool) -> Dataset:
        from torchvision.datasets import ImageFolder

        try:
            dataset = ImageFolder(str(folder), transform=self._transforms(train), allow_empty=allow_empty)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"cannot read image folder {folder}: {err}") from err
        if dataset.classes != self.classes:
            raise DataError(f"{folder} must have the class sub-folders of {self.train_dir}.")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Index the image files (once)."""
        if self.train_set is not None:
            return
        train_full = self._image_folder(self.train_dir, train=True, allow_empty=False)
        if self.val_dir is not None:
            self.train_set = train_full
            self.val_set = self._image_folder(self.val_dir, train=False, allow_empty=True)
        else:
            train_idx, val_idx = _split_indices(len(train_full), [self.val_split], self.seed)
            self.train_set = Subset(train_full, train_idx)
            self.val_set = Subset(self._image_folder(self.train_dir, train=False, allow_empty=False), val_idx)
        if self.test_dir is not None:
            self.test_set = self._image_folder(self.test_dir, train=False, allow_empty=True)
        else:
            self.test_set = self.val_set
