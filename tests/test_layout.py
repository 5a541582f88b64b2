"""The package's shape (issue #10): no module over about 400 lines, no import cycle, a Lightning-free core.

Static checks over the source tree (``ast``, nothing imported): every ``import`` of a ``lightning_comhe`` module,
at module level or inside a function (a call-time import is still a cycle), is an edge of the module graph.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_comhe"
MAX_LINES = 400
#: The pure-PyTorch core (docs/architecture.md): no Lightning import, direct or through another module.
CORE = ("lightning_comhe.functional", "lightning_comhe.projections", "lightning_comhe.energies")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(``lightning_comhe`` modules imported by ``path``, other top-level packages imported)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target in modules:
                inner.add(target)
            elif not target.startswith("lightning_comhe"):
                outer.add(target.split(".")[0])
    inner.discard(name)
    return inner, outer


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = _modules()
    inner, outer = {}, {}
    for name, path in modules.items():
        inner[name], outer[name] = _imports(path, modules)
    return inner, outer


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_is_over_about_400_lines(name: str) -> None:
    lines = len(_modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}: one module, one job): split it"


def test_no_import_cycle() -> None:
    graph, _ = _graph()
    # A package's __init__ re-exporting its submodules is not a cycle of the submodules through it: drop the edges
    # from a module to the packages that contain it (Python imports the parent first, and the parent's re-exports
    # are what a submodule must not rely on; the remaining edges must form a DAG).
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_core_never_imports_lightning() -> None:
    graph, outer = _graph()
    for root in [m for m in graph if m.startswith(CORE)]:
        seen, todo = set(), [root]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            assert not outer[m] & {"lightning", "pytorch_lightning", "torchmetrics"}, (
                f"{root} reaches {m}, which imports {sorted(outer[m] & {'lightning', 'torchmetrics'})}"
            )
            todo.extend(graph[m] - {p for p in graph if root.startswith(p + ".")})


def test_the_graph_sees_the_known_edges() -> None:
    """The checks above can fail: the parser finds edges that are known to exist."""
    graph, outer = _graph()
    assert "lightning_comhe.regularizer" in graph["lightning_comhe.callback"]
    assert "lightning" in outer["lightning_comhe.callback"]
    assert "lightning_comhe.functional._pairwise" in graph["lightning_comhe.functional._tiled"]
