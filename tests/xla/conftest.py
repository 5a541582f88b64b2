"""The XLA suite: CoMHE on a real XLA device, PyTorch/XLA's CPU client (``PJRT_DEVICE=CPU``), against the CPU.

CI runs this folder in its own virtual environment (``.ci/run``, step 3: torch and torch_xla pinned together by
``.ci/constraints-xla.txt``) with ``COMHE_XLA_ENV=1``. There, a missing torch_xla or a missing environment variable
is an error at collection, and a skipped test fails the session. In any other environment without torch_xla (the
development one), every test module of this folder skips itself at import (``pytest.importorskip``) and this file
imports nothing from torch_xla.

Two traps, both handled here, at import, before any test module runs:

* Lightning asks torch_xla for the TPU version (``XLAAccelerator.auto_device_count``), and torch_xla asks Google's
  cloud metadata server for it unless ``TPU_SKIP_MDS_QUERY=1`` (the version is then parsed from
  ``TPU_ACCELERATOR_TYPE``). No test may ever let it try: under ``COMHE_XLA_ENV=1`` the variables must already be
  set (else this file raises), elsewhere they are set here before torch_xla is imported, and torch_xla's metadata
  query itself is replaced by an error.
* The XLA runtime must be initialized before the process's first backward pass, otherwise the autograd engine later
  fails with ``INTERNAL ASSERT FAILED ... device_ready_queues_`` (it sizes its device queues at the first backward):
  ``torch_xla.device()`` is called here.

torch runs with one intra-op thread (the CPU references and torch_xla's CPU fallbacks). XLA's own CPU thread pool is
left as it is: ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` made this suite's regularizer runs about 25 % more
expensive in CPU time, not less.
"""

import importlib.util
import os
from pathlib import Path

import pytest

XLA_ENV = os.environ.get("COMHE_XLA_ENV") == "1"
HAVE_XLA = importlib.util.find_spec("torch_xla") is not None

#: The environment of every XLA test: PJRT's CPU client, and torch_xla's TPU metadata answered by variables.
XLA_TEST_ENV = {"PJRT_DEVICE": "CPU", "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v4-8"}
_COMMAND = " ".join(f"{k}={v}" for k, v in XLA_TEST_ENV.items()) + " COMHE_XLA_ENV=1 python -m pytest -q tests/xla"


def _prepare_environment() -> None:
    """Check (``COMHE_XLA_ENV=1``) or set (elsewhere) the variables of :data:`XLA_TEST_ENV`, before torch_xla loads.

    Raises:
        RuntimeError: Under ``COMHE_XLA_ENV=1`` when one is missing; anywhere when one has another value.
    """
    missing = [name for name in XLA_TEST_ENV if not os.environ.get(name)]
    if XLA_ENV and missing:
        raise RuntimeError(
            f"tests/xla: COMHE_XLA_ENV=1 but {', '.join(missing)} not set; run it as .ci/run does: {_COMMAND}"
        )
    for name, value in XLA_TEST_ENV.items():
        os.environ.setdefault(name, value)
    wrong = {name: os.environ[name] for name, value in XLA_TEST_ENV.items() if os.environ[name] != value}
    if wrong:
        raise RuntimeError(
            f"tests/xla runs on PyTorch/XLA's CPU client and never queries a metadata server: it needs "
            f"{XLA_TEST_ENV}, got {wrong}."
        )


def _forbid_metadata_queries() -> None:
    """Replace torch_xla's only metadata-server request (``torch_xla._internal.tpu._get_metadata``) by an error."""
    from torch_xla._internal import tpu

    def refuse(key: str) -> str:
        raise RuntimeError(
            f"tests/xla: torch_xla tried to query the cloud metadata server ({key!r}); TPU_SKIP_MDS_QUERY=1 must "
            "keep it from doing so"
        )

    tpu._get_metadata = refuse


if XLA_ENV and not HAVE_XLA:
    raise RuntimeError(
        "tests/xla: COMHE_XLA_ENV=1 but torch_xla is not importable; install it with -c .ci/constraints-xla.txt"
    )

if HAVE_XLA:
    _prepare_environment()
    import torch
    import torch_xla

    torch.set_num_threads(1)
    _forbid_metadata_queries()
    torch_xla.device()  # initialize the runtime before any backward pass (see the module docstring)


# --------------------------------------------------------------------------------------------------------------------
# COMHE_XLA_ENV=1: a skip in this folder fails the session (an expected failure, xfail, is not a skip)
# --------------------------------------------------------------------------------------------------------------------
_HERE = Path(__file__).resolve().parent
_outcomes: dict[str, list[str]] = {"passed": [], "skipped": []}
_root: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """Remember the root directory (node ids are relative to it)."""
    _root[:] = [config.rootpath]


def _counted(report: pytest.TestReport | pytest.CollectReport) -> bool:
    """Whether ``report`` is one of this folder's, under ``COMHE_XLA_ENV=1`` (nothing is counted elsewhere)."""
    if not XLA_ENV or not _root:
        return False
    return (_root[0] / report.nodeid.split("::")[0]).resolve().is_relative_to(_HERE)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count this folder's passed and skipped tests (an xfail, ``report.wasxfail``, is neither)."""
    if not _counted(report) or hasattr(report, "wasxfail"):
        return
    if report.skipped:
        _outcomes["skipped"].append(report.nodeid)
    elif report.when == "call" and report.passed:
        _outcomes["passed"].append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Count a test module of this folder that skipped itself at import."""
    if report.skipped and _counted(report):
        _outcomes["skipped"].append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under ``COMHE_XLA_ENV=1``, a skipped test or module, or a run where no test passed, fails the session."""
    if not XLA_ENV or exitstatus != 0:
        return
    skipped, passed = _outcomes["skipped"], _outcomes["passed"]
    if skipped or not passed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"tests/xla: COMHE_XLA_ENV=1, but {len(skipped)} test(s) or module(s) were skipped "
                f"({', '.join(skipped[:5])}) and {len(passed)} passed: the XLA environment must run every test",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
