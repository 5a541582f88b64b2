"""DataModules of the ``comhe`` command: built-in handwritten digits, an image folder, and local CIFAR-10/100.

All three are image-classification :class:`~lightning.pytorch.LightningDataModule` s with the attributes the
``comhe`` command links into the model: ``num_classes`` (known right after ``__init__``), ``image_size`` and
``in_chans``. Batches are ``(images, labels)`` with ``images`` of shape ``(B, in_chans, image_size, image_size)``.
The predict loader yields the test split. None of them downloads anything; a missing or malformed folder raises a
:class:`~lightning_comhe.cli.errors.DataNotFoundError` / :class:`~lightning_comhe.cli.errors.DataError` at
construction time, naming the path.
"""

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_comhe.cli.errors import DataError, DataNotFoundError

__all__ = [
    "CIFARDataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"`{name}` must be an int >= 1; got {value!r}.")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise DataError(f"`{name}` must be a float in [0, 1); got {value!r}.")


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
            raise DataError(f"`num_workers` must be an int >= 0; got {num_workers!r}.")
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


# ----------------------------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------------------------
class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's handwritten digits (1,797 grey 8×8 images, 10 classes), the built-in default: no download.

    The images (values 0..16) are scaled to [0, 1], resized to ``image_size`` with bilinear interpolation, repeated
    to 3 channels, and normalized with the mean and standard deviation of the training pixels. The split is a fixed
    seeded permutation (70/15/15 by default), identical on every process and every run. No augmentation.

    Args:
        image_size: Side of the resized images.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of the samples in the validation split.
        test_fraction: Fraction of the samples in the test split.
        seed: Seed of the split.

    Attributes:
        indices: After :meth:`setup`, the indices into ``sklearn.datasets.load_digits()`` of each split.

    Example::

        >>> dm = DigitsDataModule(image_size=16)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes
        ((128, 3, 16, 16), 10)
    """

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        _check_positive_int("image_size", image_size)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise DataError("`val_fraction` + `test_fraction` must be < 1.")
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_classes = 10
        self.in_chans = 3
        self.classes = [str(i) for i in range(10)]
        self.indices: dict[str, list[int]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load, resize, normalize and split the digits (once)."""
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        train_idx, val_idx, test_idx = _split_indices(len(labels), [self.val_fraction, self.test_fraction], self.seed)
        self.indices = {"train": train_idx, "val": val_idx, "test": test_idx}
        train_pixels = images[train_idx]
        mean, std = train_pixels.mean(), train_pixels.std()
        images = ((images - mean) / std).expand(-1, self.in_chans, -1, -1).contiguous()
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx]) if test_idx else self.val_set


# ----------------------------------------------------------------------------------------------------------------
# image folder
# ----------------------------------------------------------------------------------------------------------------
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
            raise DataError(f"{path} has no val folder, so `val_split` must be > 0; got {val_split}.")
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


# ----------------------------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------------------------
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
            raise DataError(f"`variant` must be 'cifar10' or 'cifar100'; got {variant!r}.")
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
                    f"{path}: 'data' must be a uint8 array of shape (N, 3072) with N labels; got {data.dtype} "
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
