"""The layout is the architecture: subpackages in layers (core → data → evaluation → results → training →
commands), imports only downwards, no import circles, no plugin importing another plugin, no module past ~400
lines. See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "sslbench"
PLUGINS = Path(__file__).parents[1] / "plugins"
LAYERS = ["core", "data", "evaluation", "results", "training", "commands"]
TOP = len(LAYERS)  # sslbench/__init__.py, __main__.py, cli.py sit above every layer
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every sslbench module ``path`` imports, at module level or inside a function (a lazy import is still a
    dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("sslbench"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; use absolute sslbench.<layer>.<module> imports")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sslbench"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def test_imports_only_go_downwards():
    upward = [f"{m} → {d}" for m, deps in _graph().items() for d in deps
              if _layer(d) > _layer(m) and not (d == "sslbench" and m.startswith("sslbench"))]
    assert upward == []


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" → ".join(stack[stack.index(dep):] + [dep]) if dep in stack else dep)
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_plugin_imports_another_plugin():
    """A broken plugin must not break others: plugins share code only through sslbench itself."""
    names = {p.stem for p in PLUGINS.glob("*.py")}
    crossing = []
    for path in PLUGINS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                targets = [node.module or ""] if node.level == 0 else [f"sslbench_plugins.{node.module or ''}"]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            crossing += [f"{path.name} → {t}" for t in targets
                         if t.startswith("sslbench_plugins") and t.split(".")[-1] in names | {""}]
    assert crossing == []


@pytest.mark.parametrize("folder", [PACKAGE, PLUGINS], ids=["sslbench", "plugins"])
def test_no_module_past_400_lines(folder):
    long = {str(p.relative_to(folder)): n for p in folder.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_docs_the_code_cites_exist():
    """Code, recipes and READMEs cite docs/<page>.md: every cited page must be in the repository."""
    import re

    root = PACKAGE.parent
    cited = {}
    for path in [*PACKAGE.rglob("*.py"), *PLUGINS.glob("*.py"), *(root / "recipes").rglob("*.toml"),
                 *root.glob("*.md"), *(root / "recipes").glob("*.md"), *(root / "docs").glob("*.md")]:
        for page in re.findall(r"docs/([\w.-]+\.md)", path.read_text()):
            cited.setdefault(page, path.name)
    assert cited, "expected citations of docs/ pages"
    missing = {page: where for page, where in cited.items() if not (root / "docs" / page).is_file()}
    assert missing == {}
