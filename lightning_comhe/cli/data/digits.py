"""``DigitsDataModule``: scikit-learn's handwritten digits, the built-in default of ``comhe fit`` (no download)."""

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from lightning_comhe.cli.data.base import ClassificationDataModule, _check_fraction, _check_positive_int, _split_indices
from lightning_comhe.cli.errors import DataError

__all__ = ["DigitsDataModule"]


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
