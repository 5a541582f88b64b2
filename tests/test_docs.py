"""The docs stay true: their Python examples run, the API reference covers `__all__`, the site builds offline."""

import ast
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_comhe

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_RUNNABLE = ["README.md", "docs/pytorch-and-fabric.md", "docs/quickstart.md"]


def _blocks(path: Path) -> list[str]:
    return _BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", _RUNNABLE)
def test_python_examples_in_docs_run(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(ROOT / doc)
    assert blocks, f"{doc} has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for code in blocks:
        exec(compile(code, f"{doc}:example", "exec"), namespace)  # noqa: S102 - our own documentation


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _resolve(path: str) -> object:
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as err:
            if err.name is None or not ".".join(parts[:i]).startswith(err.name):
                raise  # the module exists but imports something missing: a real error
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def _documented_paths() -> dict[str, str]:
    """``{dotted path: where}``: each ``lightning_comhe.x.y`` in the docs, each ``from lightning_comhe... import``
    of their Python examples, and each name of a table of docs/api.md (in its section's module)."""
    paths: dict[str, str] = {}
    for doc in _docs():
        text = doc.read_text(encoding="utf-8")
        name = doc.relative_to(ROOT).as_posix()
        for match in re.finditer(r"lightning_comhe(?:\.[A-Za-z_]\w*)+", text):
            if not match.group(0).endswith(".md"):
                paths.setdefault(match.group(0), name)
        for block in _BLOCK.findall(text):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lightning_comhe":
                    for alias in node.names:
                        paths.setdefault(f"{node.module}.{alias.name}", f"{name} (example)")
    module = "lightning_comhe"
    for line in (ROOT / "docs/api.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            found = re.search(r"\(`(lightning_comhe(?:\.\w+)*)`\)", line)
            module = found.group(1) if found else "lightning_comhe"
        row = re.match(r"^\| `(\w+)` \|", line)
        if row:
            paths.setdefault(f"{module}.{row.group(1)}", "docs/api.md (table)")
    return paths


def test_api_reference_lists_every_public_name() -> None:
    text = (ROOT / "docs/api.md").read_text(encoding="utf-8")
    missing = [name for name in lightning_comhe.__all__ if name != "__version__" and f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document: {missing}"


def test_every_public_name_is_its_home_modules_object() -> None:
    """Each exported class and function is the very object of the module that defines it (no stale copy)."""
    assert len(set(lightning_comhe.__all__)) == len(lightning_comhe.__all__)
    checked = 0
    for name in lightning_comhe.__all__:
        obj = getattr(lightning_comhe, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        assert obj.__module__.startswith("lightning_comhe"), (name, obj.__module__)
        home = _resolve(f"{obj.__module__}.{obj.__qualname__}")
        assert home is obj, f"lightning_comhe.{name} is not {obj.__module__}.{obj.__qualname__}"
        checked += 1
    assert checked >= 20, checked


def test_every_documented_import_path_resolves() -> None:
    """Every path the docs name resolves, and to the object ``lightning_comhe`` exports when it exports the name."""
    paths = _documented_paths()
    assert "lightning_comhe.CoMHE" in paths and "lightning_comhe.hyperspherical_energy" in paths, sorted(paths)
    broken, different = [], []
    exported = set(lightning_comhe.__all__)
    for path, where in sorted(paths.items()):
        try:
            obj = _resolve(path)
        except (ImportError, AttributeError) as err:
            broken.append(f"{path} ({where}): {type(err).__name__}: {err}")
            continue
        name = path.rsplit(".", 1)[-1]
        if name in exported and path != f"lightning_comhe.{name}" and not inspect.ismodule(obj):
            if obj is not getattr(lightning_comhe, name):
                different.append(f"{path} ({where}) is not lightning_comhe.{name}")
    assert not broken, "the docs name paths that do not resolve:\n" + "\n".join(broken)
    assert not different, "\n".join(different)


def test_quickstart_ci_and_pyproject_agree() -> None:
    """The README's two commands, the extras they name, the light core, and the commands `.ci/run` runs."""
    tomllib = pytest.importorskip("tomllib")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.DOTALL)
    assert quickstart, "README.md has no Quickstart bash block"
    assert quickstart.group(1).strip().splitlines() == [
        'pip install ".[cli]" && comhe fit',
        'pip install -e ".[dev]" && python -m pytest -q',
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {re.match(r"[A-Za-z0-9_.-]+", dep).group(0): dep for dep in project["dependencies"]}
    assert set(core) == {"torch", "lightning", "torchmetrics", "numpy"}, core
    assert not any("<" in dep or "==" in dep for dep in core.values()), "the core keeps lower bounds only"
    extras = project["optional-dependencies"]
    cli = {re.match(r"[A-Za-z0-9_.-]+", dep).group(0) for dep in extras["cli"]}
    assert cli == {"timm", "torchvision", "jsonargparse", "scikit-learn", "matplotlib"}, cli
    assert "lightning-comhe[cli]" in extras["dev"] and any(dep.startswith("scipy") for dep in extras["dev"])
    assert project["scripts"]["comhe"] == "lightning_comhe.cli:main"

    ci = [line.strip() for line in (ROOT / ".ci/run").read_text(encoding="utf-8").splitlines()]
    commands = [line for line in ci if line and not line.startswith("#")]
    assert "run_pytest python -m pytest -q" in commands  # the README's test command, exactly
    assert "run_pytest python -m pytest -q tests/light" in commands
    assert any(line.endswith('pip install -q -e ".[dev]" -c "$CONSTRAINTS"') for line in commands)
    assert any(line.endswith('pip install -q . pytest -c "$CONSTRAINTS"') for line in commands)
    assert "export COMHE_LIGHT_ENV=1 PYTHONSAFEPATH=1" in commands
    pins = dict(
        line.split("==")
        for line in (ROOT / ".ci/constraints.txt").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert {"torch", "torchvision", "lightning", "torchmetrics", "timm", "jsonargparse", "deepspeed"} <= set(pins)


def test_every_nav_page_exists() -> None:
    nav = re.findall(r":\s*([\w\-/]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.MULTILINE)
    assert nav
    missing = [page for page in nav if not (ROOT / "docs" / page).is_file()]
    assert not missing, missing


def test_site_builds_offline(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    mkdocs = shutil.which("mkdocs") or f"{sys.executable} -m mkdocs"
    cmd = [*mkdocs.split(), "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").is_file()
