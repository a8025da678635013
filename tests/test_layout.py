"""The package layout's rules, read from the source: imports run one way, no circles, small files."""

from __future__ import annotations

import ast
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


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path, *, module_level_only: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = next(k for k, v in MODULES.items() if v == path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and module_level_only:
                continue
            if isinstance(child, ast.If) and module_level_only and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: no import at run time
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.append((child.lineno, base))
                # "from pkg import mod" imports the submodule too
                found.extend((child.lineno, f"{base}.{a.name}") for a in child.names if f"{base}.{a.name}" in MODULES)
            visit(child, top)

    visit(tree, True)
    return found


def _part(module: str) -> str | None:
    return next((p for p in FORBIDDEN if module == p or module.startswith(p + ".")), None)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m)))
def test_imports_run_one_way(module: str) -> None:
    banned = FORBIDDEN[_part(module)]  # type: ignore[index]
    bad = [f"line {line}: {imp}" for line, imp in _imports(MODULES[module], module_level_only=False)
           if any(imp == b or imp.startswith(b + ".") for b in banned)]
    assert not bad, f"{module} imports what its part may not: {bad}"


def test_no_import_circles() -> None:
    graph = {
        m: sorted({imp for _, imp in _imports(p, module_level_only=True) if imp in MODULES and imp != m})
        for m, p in MODULES.items()
    }
    # A package's __init__ is imported on the way to its submodules: not a circle of ours.
    for m in graph:
        graph[m] = [d for d in graph[m] if not m.startswith(d + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                walk(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            walk(m)


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
    MODULES["cicada_async.engine._probe"] = fake
    try:
        imps = [imp for _, imp in _imports(fake, module_level_only=False)]
    finally:
        del MODULES["cicada_async.engine._probe"]
    assert "cicada_async.service.scheduler" in imps
