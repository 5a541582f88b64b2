"""DataModules of the ``comhe`` command: built-in handwritten digits, an image folder, and local CIFAR-10/100.

All three are image-classification :class:`~lightning.pytorch.LightningDataModule` s with the attributes the
``comhe`` command links into the model: ``num_classes`` (known right after ``__init__``), ``image_size`` and
``in_chans``. Batches are ``(images, labels)`` with ``images`` of shape ``(B, in_chans, image_size, image_size)``.
The predict loader yields the test split. None of them downloads anything; a missing or malformed folder raises a
:class:`~lightning_comhe.cli.errors.DataNotFoundError` / :class:`~lightning_comhe.cli.errors.DataError` at
construction time, naming the path.

The modules: :mod:`~lightning_comhe.cli.data.base` (the common base and the normalization constants),
:mod:`~lightning_comhe.cli.data.digits`, :mod:`~lightning_comhe.cli.data.folders` and
:mod:`~lightning_comhe.cli.data.cifar`; every name is importable from ``lightning_comhe.cli.data``.
"""

from lightning_comhe.cli.data import base
from lightning_comhe.cli.data.base import *  # noqa: F403 (the names of base.__all__, listed once there)
from lightning_comhe.cli.data.cifar import CIFARDataModule
from lightning_comhe.cli.data.digits import DigitsDataModule
from lightning_comhe.cli.data.folders import ImageFolderDataModule

__all__ = ["CIFARDataModule", "DigitsDataModule", "ImageFolderDataModule"]
__all__ += base.__all__
