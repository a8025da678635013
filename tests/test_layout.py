"""The package layout's rules, read from the source: imports run one way, no circles, small files."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cicada_async", "backends", "protocols")
MAX_LINES = 400

# What each part may not import, at module level or inside a function.
FORBIDDEN = {
    "cicada_async.engine": ("cicada_async.service", "cicada_async.bench", "cicada_async.cli", "aiohttp.web"),
    "cicada_async.models": ("cicada_async.service", "cicada_async.bench", "cicada_async.cli"),
    "cicada_async.service": ("cicada_async.bench", "cicada_async.cli"),
    "backends": ("cicada_async",),
    "protocols": ("cicada_async", "backends"),
}


def _modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path, modules: Mapping[str, Path] = MODULES) -> list[tuple[int, str]]:
    """(line, imported module) for every import of module ``name`` anywhere in its source:
    module level, inside functions and classes, under ``if TYPE_CHECKING:``. Relative imports
    are resolved; ``from pkg import mod`` counts as importing ``pkg.mod`` too."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{a.name}") for a in node.names if f"{base}.{a.name}" in modules)
    return sorted(found)


def _graph(modules: Mapping[str, Path]) -> dict[str, list[str]]:
    """Which of ``modules`` each one imports (its own packages' ``__init__`` left out: those
    run on the way to any submodule, and are no circle of ours)."""
    return {
        m: sorted({imp for _, imp in _imports(m, p, modules)
                   if imp in modules and imp != m and not m.startswith(imp + ".")})
        for m, p in modules.items()
    }


def _cycles(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """One circle (``a -> b -> a``) for each strongly connected set of modules in ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(m: str) -> None:  # Tarjan's algorithm
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for d in graph.get(m, ()):
            if d not in index:
                connect(d)
                low[m] = min(low[m], low[d])
            elif d in on_stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            component = set()
            while True:
                x = stack.pop()
                on_stack.discard(x)
                component.add(x)
                if x == m:
                    break
            if len(component) > 1 or m in graph.get(m, ()):
                components.append(component)

    for m in sorted(graph):
        if m not in index:
            connect(m)
    return [_circle_in(graph, c) for c in components]


def _circle_in(graph: Mapping[str, list[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth first, inside it)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for d in graph.get(m, ()):
                if d == start:
                    path = [m]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if d in component and d not in came_from:
                    came_from[d] = m
                    nxt.append(d)
        frontier = nxt
    raise AssertionError(f"no circle in {sorted(component)}")  # a component of one without a self-loop


def _part(module: str) -> str | None:
    return next((p for p in FORBIDDEN if module == p or module.startswith(p + ".")), None)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m)))
def test_imports_run_one_way(module: str) -> None:
    banned = FORBIDDEN[_part(module)]  # type: ignore[index]
    bad = [f"line {line}: {imp}" for line, imp in _imports(module, MODULES[module])
           if any(imp == b or imp.startswith(b + ".") for b in banned)]
    assert not bad, f"{module} imports what its part may not: {bad}"


def test_no_import_circles() -> None:
    """Every import counts, at run time or not: a function-level or TYPE_CHECKING import
    still ties the two modules together."""
    circles = _cycles(_graph(MODULES))
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


# The engine's bottom: modules every other engine module may import, which import none of ours
# but protocols (bytes -> tensors, read sizes). Moving code here is how the knot was untied.
BOTTOM = ("cicada_async.engine.tensorbytes", "cicada_async.engine.reads")


@pytest.mark.parametrize("module", BOTTOM)
def test_bottom_modules_import_nothing_above_them(module: str) -> None:
    ours = [f"line {line}: {imp}" for line, imp in _imports(module, MODULES[module])
            if imp.partition(".")[0] in ("cicada_async", "backends")]
    assert not ours, f"{module} is a bottom module but imports {ours}"


def test_no_module_over_400_lines() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    long |= {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "tests").rglob("*.py"))
             if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The rule above would catch an engine module importing the service."""
    bad = ROOT / "cicada_async" / "engine" / "executor.py"
    fake = tmp_path / "x.py"
    fake.write_text(bad.read_text() + "\n\ndef f():\n    from cicada_async.service.scheduler import Scheduler\n")
    imps = [imp for _, imp in _imports("cicada_async.engine._probe", fake)]
    assert "cicada_async.service.scheduler" in imps


def test_the_checker_sees_hidden_circles(tmp_path: Path) -> None:
    """Circles closed by a function-level import or a TYPE_CHECKING import are found; a
    package's ``__init__`` and a one-way chain are not circles."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "from pkg import a\n",
        "a.py": "from pkg.b import g\n",  # a -> b at module level
        "b.py": "def g():\n    from . import a\n    return a\n",  # b -> a inside a function
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import X\n",
        "d.py": "import pkg.c\nX = 1\n",  # c -> d only for the type checker
        "e.py": "from pkg import a\n",  # e -> a, no way back
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules = _modules(tmp_path, ("pkg",))
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    graph = _graph(modules)
    assert graph["pkg.b"] == ["pkg.a"]
    assert graph["pkg.c"] == ["pkg.d"]
    assert sorted(_cycles(graph)) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.d", "pkg.c"]]
    assert _cycles({"x": ["y"], "y": ["z"], "z": []}) == []
    assert _cycles({"x": ["x"]}) == [["x", "x"]]
