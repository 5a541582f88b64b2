"""The DataModules of the ``comhe`` command on built-in data and on small files generated in ``tmp_path``."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_comhe.cli.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFARDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
)
from lightning_comhe.cli.errors import CLIError, DataError, DataNotFoundError


# --------------------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------------------
def test_digits_split_shapes_and_normalization():
    dm = DigitsDataModule(image_size=16, batch_size=32)
    assert (dm.num_classes, dm.in_chans, dm.image_size) == (10, 3, 16)
    dm.setup("fit")
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (1257, 270, 270)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) <= 9
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated to 3 channels
    train_x = dm.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and float(train_x.std()) == pytest.approx(1.0, abs=1e-3)
    assert len(dm.predict_dataloader().dataset) == 270


def test_digits_split_is_seeded_and_disjoint():
    def split(seed):
        dm = DigitsDataModule(image_size=8, seed=seed)
        dm.setup()
        return dm.indices

    a, b, c = split(1), split(1), split(2)
    assert a == b and a != c
    assert sorted(a["train"] + a["val"] + a["test"]) == list(range(1797))


def test_digits_no_test_fraction_uses_val():
    dm = DigitsDataModule(image_size=8, val_fraction=0.2, test_fraction=0.0)
    dm.setup()
    assert dm.test_set is dm.val_set


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"image_size": -1}, {"val_fraction": 1.5}, {"val_fraction": 0.6, "test_fraction": 0.5}],
)
def test_digits_bad_arguments(kwargs):
    with pytest.raises(DataError):
        DigitsDataModule(**kwargs)


def test_loaders_need_setup():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


# --------------------------------------------------------------------------------------------------------------------
# image folder
# --------------------------------------------------------------------------------------------------------------------
def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _class_folder(root: Path, classes: dict[str, int]) -> None:
    colors = {"cat": (250, 10, 10), "dog": (10, 250, 10), "owl": (10, 10, 250)}
    for name, count in classes.items():
        for i in range(count):
            _png(root / name / f"{i:03d}.png", colors[name])


def test_image_folder_train_val_test_layout(tmp_path):
    _class_folder(tmp_path / "train", {"cat": 3, "dog": 2, "owl": 1})
    _class_folder(tmp_path / "val", {"cat": 1, "dog": 1, "owl": 1})
    _class_folder(tmp_path / "test", {"cat": 1, "dog": 1, "owl": 0})
    (tmp_path / "test" / "owl").mkdir()  # an empty class folder is fine outside train
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=4, augment=False)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "owl"]
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 3, 2)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 8, 8)
    assert y.tolist() == [0, 1, 2]
    # the class colour survives resizing and normalization: the red channel is largest for "cat"
    assert int(x[0].mean(dim=(1, 2)).argmax()) == 0 and int(x[1].mean(dim=(1, 2)).argmax()) == 1
    augmented = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=2)
    augmented.setup()
    x, _ = next(iter(augmented.train_dataloader()))
    assert x.shape == (2, 3, 8, 8)


def test_image_folder_single_folder_is_split(tmp_path):
    _class_folder(tmp_path, {"cat": 5, "dog": 5})
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=16, val_split=0.2, seed=3)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (8, 2)
    assert dm.test_set is dm.val_set
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    again = ImageFolderDataModule(str(tmp_path), image_size=8, val_split=0.2, seed=3)
    again.setup()
    assert again.val_set.indices == dm.val_set.indices
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 8, 8)


def test_image_folder_train_without_val_is_split(tmp_path):
    _class_folder(tmp_path / "train", {"cat": 4, "dog": 4})
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_split=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (6, 2)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderDataModule(str(tmp_path / "nope"))


def test_image_folder_root_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file"):
        ImageFolderDataModule(str(tmp_path / "x.png"))


def test_image_folder_without_class_folders(tmp_path):
    _png(tmp_path / "a.png", (0, 0, 0))
    _png(tmp_path / "b.png", (0, 0, 0))
    with pytest.raises(DataError, match="no class sub-folders") as info:
        ImageFolderDataModule(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "a.png" in str(info.value)
    with pytest.raises(DataError, match="the folder is empty"):
        (tmp_path / "empty").mkdir()
        ImageFolderDataModule(str(tmp_path / "empty"))


def test_image_folder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataModule(str(tmp_path))


def test_image_folder_empty_training_class(tmp_path):
    _class_folder(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    dm = ImageFolderDataModule(str(tmp_path))
    with pytest.raises(DataError, match="cannot read image folder"):
        dm.setup()


def test_image_folder_val_classes_differ(tmp_path):
    _class_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _class_folder(tmp_path / "val", {"cat": 1, "owl": 1})
    with pytest.raises(DataError, match="missing: \\['dog'\\], extra: \\['owl'\\]"):
        ImageFolderDataModule(str(tmp_path))


def test_errors_are_cli_errors():
    assert issubclass(DataError, CLIError) and issubclass(DataError, ValueError)
    assert issubclass(DataNotFoundError, CLIError) and issubclass(DataNotFoundError, FileNotFoundError)


# --------------------------------------------------------------------------------------------------------------------
# CIFAR, official python format
# --------------------------------------------------------------------------------------------------------------------
def _dump(path: Path, obj: dict, bytes_keys: bool) -> None:
    if bytes_keys:  # as the official (python 2) pickles load with encoding="bytes"
        obj = {k.encode(): v for k, v in obj.items()}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def make_cifar10(root: Path, per_batch: int = 4, bytes_keys: bool = True) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        labels = [(i + j) % 10 for j in range(per_batch)]
        _dump(
            folder / f"data_batch_{i}",
            {"batch_label": f"b{i}", "data": _images(per_batch, i), "labels": labels},
            bytes_keys,
        )
    _dump(folder / "test_batch", {"data": _images(6, 0), "labels": [0, 1, 2, 3, 4, 5]}, bytes_keys)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch}, bytes_keys)
    return folder


def make_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = {"data": _images(10, 1), "fine_labels": list(range(90, 100)), "coarse_labels": [0] * 10}
    _dump(folder / "train", train, bytes_keys=False)
    _dump(folder / "test", {"data": _images(5, 2), "fine_labels": [0, 10, 20, 30, 99], "coarse_labels": [1] * 5}, False)
    _dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, False)
    return folder


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).round()


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar10_reads_official_layout(tmp_path, bytes_keys):
    make_cifar10(tmp_path, bytes_keys=bytes_keys)
    dm = CIFARDataModule(str(tmp_path), batch_size=6, augment=False)
    assert dm.num_classes == 10 and dm.classes[0] == "airplane" and dm.image_size == 32
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.test_set)) == (20, 6)
    assert dm.val_set is dm.test_set  # val_split=0: validate on the test set
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 1, 2, 3, 4, 5]
    # pixel layout: each row is R(32x32) G(32x32) B(32x32), row-major
    expected = torch.from_numpy(_images(6, 0).reshape(6, 3, 32, 32).astype(np.float32))
    torch.testing.assert_close(_unnormalize(x), expected)


def test_cifar10_folder_itself_val_split_augmentation_and_resize(tmp_path):
    folder = make_cifar10(tmp_path, per_batch=4)
    dm = CIFARDataModule(str(folder), val_split=0.25, seed=0, image_size=16, batch_size=32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 6)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (15, 3, 16, 16)
    # augmentation: random crops of the zero-padded image and flips change the training images
    torch.manual_seed(0)
    plain = CIFARDataModule(str(folder), augment=False)
    plain.setup()
    aug = CIFARDataModule(str(folder), augment=True)
    aug.setup()
    diffs = [not torch.equal(aug.train_set[i][0], plain.train_set[i][0]) for i in range(20)]
    assert sum(diffs) >= 10
    assert torch.equal(aug.test_set[0][0], plain.test_set[0][0])  # no augmentation outside training


def test_cifar100_fine_labels(tmp_path):
    make_cifar100(tmp_path)
    dm = CIFARDataModule(str(tmp_path), variant="cifar100", batch_size=10)
    assert dm.num_classes == 100 and dm.classes[99] == "c99"
    dm.setup()
    _, y = next(iter(dm.test_dataloader()))
    assert y.tolist() == [0, 10, 20, 30, 99]


def test_cifar_missing_folder_and_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="CIFAR folder not found"):
        CIFARDataModule(str(tmp_path / "nope"))
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="missing data_batch_3"):
        CIFARDataModule(str(tmp_path))
    with pytest.raises(DataNotFoundError, match="cifar100 files not found"):
        CIFARDataModule(str(tmp_path), variant="cifar100")


def test_cifar_archive_not_extracted(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="tar xzf"):
        CIFARDataModule(str(tmp_path))


def test_cifar_wrong_format(tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_2").write_bytes(b"this is not a pickle")
    dm = CIFARDataModule(str(tmp_path))
    with pytest.raises(DataError, match="not a CIFAR python-format pickle"):
        dm.setup()

    _dump(folder / "data_batch_2", {"data": np.zeros((2, 100), dtype=np.uint8), "labels": [0, 1]}, True)
    with pytest.raises(DataError, match=r"shape \(N, 3072\)"):
        CIFARDataModule(str(tmp_path)).setup()

    _dump(folder / "data_batch_2", {"pixels": _images(2, 0)}, True)
    with pytest.raises(DataError, match="no 'data' and 'labels'"):
        CIFARDataModule(str(tmp_path)).setup()

    _dump(folder / "data_batch_2", {"data": _images(2, 0), "labels": [0, 10]}, True)
    with pytest.raises(DataError, match="labels must be in"):
        CIFARDataModule(str(tmp_path)).setup()


def test_cifar_bad_variant(tmp_path):
    with pytest.raises(DataError, match="variant"):
        CIFARDataModule(str(tmp_path), variant="cifar1000")  # type: ignore[arg-type]
