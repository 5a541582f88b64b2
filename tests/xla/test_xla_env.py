"""The XLA environment itself: the pinned versions, PJRT's CPU client, no metadata query, the installed package.

``.ci/run`` (step 3) installs torch and torch_xla from ``.ci/constraints-xla.txt``; Lightning and torchmetrics there
must carry the same pins as ``.ci/constraints.txt`` (the development environment's), so that the two environments
differ by torch and torch_xla only.
"""

import importlib.metadata
import os
from pathlib import Path

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed: tests/xla runs in its own environment (.ci/run)")

import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.runtime as xr  # noqa: E402
from lightning.pytorch.accelerators import XLAAccelerator  # noqa: E402
from torch_xla._internal import tpu  # noqa: E402
from xla_helpers import DEVICE  # noqa: E402

import lightning_comhe  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
XLA_ENV = os.environ.get("COMHE_XLA_ENV") == "1"
#: What conftest.py requires (COMHE_XLA_ENV=1) or sets (elsewhere).
XLA_TEST_ENV = {"PJRT_DEVICE": "CPU", "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v4-8"}


def _pins(name: str) -> dict[str, str]:
    lines = (REPO_ROOT / ".ci" / name).read_text(encoding="utf-8").splitlines()
    return dict(line.split("#")[0].strip().split("==") for line in lines if line.split("#")[0].strip())


def test_the_environment_of_the_xla_tests_is_set() -> None:
    for name, value in XLA_TEST_ENV.items():
        assert os.environ.get(name) == value, name
    assert xr.device_type() == "CPU"
    assert torch_xla.device() == DEVICE and xr.global_runtime_device_count() == 1
    assert torch.get_num_threads() == 1


def test_torch_xla_never_queries_the_metadata_server() -> None:
    with pytest.raises(RuntimeError, match="metadata server"):
        tpu._get_metadata("tpu-env")  # replaced by conftest.py
    # what Lightning asks (XLAAccelerator.auto_device_count -> tpu.num_available_devices -> tpu.version()) is
    # answered from TPU_ACCELERATOR_TYPE, and there are no TPU chips on this machine's PCI bus
    assert tpu.version() == 4
    assert tpu.num_available_devices() == 0
    assert XLAAccelerator.auto_device_count() == 0 and not XLAAccelerator.is_available()


def test_the_pinned_versions_are_installed() -> None:
    xla_pins, dev_pins = _pins("constraints-xla.txt"), _pins("constraints.txt")
    assert {"torch", "torch_xla", "lightning", "torchmetrics"} <= set(xla_pins), xla_pins
    for package in ("lightning", "torchmetrics"):
        assert xla_pins[package] == dev_pins[package], (package, xla_pins[package], dev_pins[package])
    # torch_xla is built against one torch release: the pair is pinned together
    assert xla_pins["torch"].split("+")[0] == xla_pins["torch_xla"].split("+")[0], xla_pins
    if XLA_ENV:
        for package, version in xla_pins.items():
            assert importlib.metadata.version(package).split("+")[0] == version, package


@pytest.mark.skipif(not XLA_ENV, reason="checked in the XLA environment of .ci/run only (COMHE_XLA_ENV=1)")
def test_the_installed_package_is_tested() -> None:
    """Like the light core's: ``pip install .`` and ``PYTHONSAFEPATH=1``, so the wheel is tested, not the tree."""
    source = REPO_ROOT / "lightning_comhe"
    assert not Path(lightning_comhe.__file__).resolve().is_relative_to(source), lightning_comhe.__file__
