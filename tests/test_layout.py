"""The floors show the architecture (issue 37): no import circle between modules nor between
folders (every import counts, one inside a function too), `dataio` imports nothing from
`trainer`, and no folder of the product holds more than 15 modules."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("dataio", "trainer")
MAX_MODULES = 15


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The product's modules ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of ``graph`` with more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}, modules


def test_no_import_circle_between_modules_or_between_folders():
    graph, modules = _graph()
    assert _cycles(graph) == []

    def folder(name: str) -> str:
        return str(modules[name].parent.relative_to(REPO))

    folders: dict[str, set[str]] = {}
    for name, targets in graph.items():
        folders.setdefault(folder(name), set()).update(folder(t) for t in targets if folder(t) != folder(name))
    assert _cycles(folders) == []


def test_dataio_imports_nothing_from_trainer():
    graph, _ = _graph()
    assert [(m, t) for m, targets in graph.items() if m.startswith("dataio") for t in targets
            if t.startswith("trainer")] == []


def test_no_folder_holds_more_than_fifteen_modules():
    counts = {str(folder.relative_to(REPO)): len(list(folder.glob("*.py")))
              for package in PACKAGES for folder in [REPO / package, *(REPO / package).rglob("*")]
              if folder.is_dir() and folder.name != "__pycache__"}
    assert {folder: n for folder, n in counts.items() if n > MAX_MODULES} == {}


def test_the_circle_check_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
