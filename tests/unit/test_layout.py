"""The shape of the code: no import cycles, small folders and files, dependencies in one direction.

The import graph is built from the source (``ast``), so it sees every ``import`` statement, those
inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "megatron_eagle"
MAX_MODULES = 12  # per folder, __init__.py not counted
MAX_LINES = 600


def _modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the megatron_eagle modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(known(a.name) for a in node.names if a.name.startswith("megatron_eagle"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.startswith("megatron_eagle"):
                    deps.update(known(f"{module}.{a.name}") if f"{module}.{a.name}" in mods else known(module)
                                for a in node.names)
        deps.discard(None)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], found


def test_parallel_and_kernels_never_import_models():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(("megatron_eagle.parallel", "megatron_eagle.kernels")):
            assert not [d for d in deps if d.startswith("megatron_eagle.models")], name
        if name.startswith("megatron_eagle.kernels"):
            assert not [d for d in deps if d.startswith("megatron_eagle.parallel")], name


def _folder_sizes(root: Path) -> dict[str, int]:
    return {str(d.relative_to(REPO)): len([p for p in d.glob("*.py") if p.name != "__init__.py"])
            for d in [root, *[p for p in root.rglob("*") if p.is_dir() and p.name != "__pycache__"]]}


def test_no_folder_over_12_modules():
    big = {d: n for d, n in _folder_sizes(PACKAGE).items() if n > MAX_MODULES}
    assert big == {}, big


def test_no_file_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, long


def test_benchmarks_small_folders_and_files():
    root = REPO / "benchmarks"
    assert {d: n for d, n in _folder_sizes(root).items() if n > MAX_MODULES} == {}
    assert [str(p) for p in root.rglob("*.py") if len(p.read_text().splitlines()) > MAX_LINES] == []


def test_config_imports_only_config():
    """The config package is the bottom floor: training, data, launch, parallel and models build on it."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("megatron_eagle.config"):
            assert all(d.startswith("megatron_eagle.config") for d in deps), (name, deps)
