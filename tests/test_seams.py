"""No seam is probed: what a declared protocol guarantees is called, never asked with hasattr/getattr.

Issue 23 replaced the probes (``hasattr(landing, "hold_releases")``, ``getattr(engine,
"healthy", True)``, ...) with typed protocols. A probe by name of a protocol member coming back
would mean a seam is untyped again; this test reads every module and refuses one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from cicada_async.engine.landing import Landing
from protocols.serving import ServedModel, ServingEngine
from protocols.storage import FileWatch, LocalDirectory, MappableFiles, StorageBackend

ROOT = Path(__file__).resolve().parents[1]
SEAMS = (ServedModel, ServingEngine, StorageBackend, MappableFiles, FileWatch, LocalDirectory, Landing)


def _members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n in vars(protocol) if not n.startswith("_")}
    return names


def probes(source: str) -> list[tuple[int, str]]:
    """(line, name) of every hasattr/getattr call that names an attribute by a string literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            found.append((node.lineno, node.args[1].value))
    return found


def test_the_finder_sees_a_probe() -> None:
    assert probes('if hasattr(landing, "hold_releases"):\n    x = getattr(e, "healthy", True)\n') == [
        (1, "hold_releases"), (2, "healthy")]


def test_no_protocol_member_is_probed_by_name() -> None:
    seam_names = set().union(*(_members(p) for p in SEAMS))
    assert {"healthy", "hold_releases", "map_file", "pad_token_id", "read_into"} <= seam_names
    bad = []
    for package in ("cicada_async", "backends", "protocols"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name in probes(path.read_text()):
                if name in seam_names:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: probes {name!r}")
    assert not bad, "seams probed instead of typed:\n" + "\n".join(bad)
