"""Plan files: the execution order a dry forward found, kept so later cold starts skip it.

Only the order is kept (``Plan.modules``, ``order_source``, ``uncalled``); shards and byte
ranges are recomputed from the headers at every load. A plan file is named by a key over
everything the order depends on: the model's config (config.json, or the factory and its
kwargs), the header layout (tensor names, dtypes and shapes per file), the serving dtype, the
input signature, and the versions of torch, transformers and cicada_async. Where it lives:

- ``<model dir>/.cicada/plan-<key>.json`` for a local directory, and inside the layout
  ``cicada pack`` writes (so a packed model copied to S3 or HTTP carries its plan);
- ``<plan_dir>/plan-<key>.json`` for remote models (and local ones whose directory is read
  only); ``plan_dir`` defaults to ``$XDG_CACHE_HOME/cicada/plans`` (``~/.cache/cicada/plans``).

A plan file is untrusted input: a wrong order costs speed, never correctness, because every
gate still waits for its own module's shards. A file that does not parse, names another key,
or whose modules are not exactly the skeleton's planned modules is ignored (one log line) and
the load plans again; a failed write is one log line too.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import torch

from protocols.errors import CheckpointError, CicadaError
from protocols.manifest import FileHeader, Plan, TensorEntry
from protocols.storage import StorageBackend

import cicada_async
from cicada_async.engine.modeldir import ModelSpec, read_small

log = logging.getLogger(__name__)

FORMAT = 1
PLAN_DIR = ".cicada"  # beside the model's files, and in packed layouts
MAX_PLAN_BYTES = 8 << 20  # a llama-1b order is ~20 KB; anything this large is not a plan
SOURCES = frozenset({"dry-forward", "registration", "given"})
Layout = dict[str, list[tuple[str, str, list[int]]]]


def default_plan_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cicada" / "plans"


@functools.cache
def library_versions() -> dict[str, str | None]:
    """Versions the dry forward's order may depend on (dist metadata: imports nothing)."""
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"torch": torch.__version__, "transformers": version("transformers"),
            "cicada_async": cicada_async.__version__}


def spec_material(spec: ModelSpec) -> dict[str, Any]:
    """What a skeleton is built from: the kind, the class or factory and the config."""
    return {"kind": spec.kind, "architecture": spec.architecture, "config": spec.config}


def digest(material: Any) -> str:
    """A short stable hash of JSON-able data (key order does not matter)."""
    raw = orjson.dumps(material, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(raw).hexdigest()[:32]


def tensor_layout(tensors: Iterable[TensorEntry]) -> Layout:
    """Per file, (name, dtype, shape) of its tensors: offsets are left out, they are re-read."""
    out: Layout = {}
    for e in tensors:
        out.setdefault(e.file, []).append((e.name, e.dtype, list(e.shape)))
    return {f: sorted(v) for f, v in sorted(out.items())}


def plan_key(spec: ModelSpec, layout: Mapping[str, Sequence[tuple[str, str, Sequence[int]]]],
             dtype: torch.dtype | None) -> str:
    inputs = sorted((n, list(shape), str(dt)) for n, (shape, dt) in spec.example_inputs.items())
    return digest({
        "format": FORMAT, "model": spec_material(spec),
        "layout": {f: sorted([n, d, list(s)] for n, d, s in v) for f, v in layout.items()},
        "dtype": str(dtype) if dtype is not None else "checkpoint", "inputs": inputs,
        "versions": library_versions(),
    })


def plan_file_name(key: str) -> str:
    return f"plan-{key}.json"


def encode(key: str, plan: Plan) -> bytes:
    return orjson.dumps({
        "format": FORMAT, "key": key, "modules": list(plan.modules),
        "order_source": plan.order_source, "uncalled": list(plan.uncalled),
        "versions": library_versions(),  # for whoever reads the file; the key holds them
    }, option=orjson.OPT_INDENT_2)


def decode(raw: bytes, key: str) -> Plan:
    """The order in a plan file, as a Plan without shards or reads; CheckpointError if the
    file is not one (bad JSON, wrong schema) or holds another key (stale)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise CheckpointError(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError("not a plan file of this format")
    if doc.get("key") != key:
        raise CheckpointError(f"stale: made for key {str(doc.get('key'))[:40]!r}")
    modules, uncalled, source = doc.get("modules"), doc.get("uncalled"), doc.get("order_source")
    if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)
            and len(set(modules)) == len(modules)):
        raise CheckpointError("'modules' is not a list of distinct module names")
    if not (isinstance(uncalled, list) and all(isinstance(m, str) and (m in modules or m == "")
                                               for m in uncalled)):
        raise CheckpointError("'uncalled' names modules outside 'modules'")
    if source not in SOURCES:
        raise CheckpointError(f"unknown order_source {source!r}")
    return Plan(tuple(modules), (), (), source, tuple(uncalled))


def order_fits(cached: Plan, planned: Sequence[str]) -> bool:
    """True when a known order names exactly the skeleton's planned modules (executor thread).

    The key should make this always true; it guards against a key that misses a dependency.
    """
    names = set(cached.modules)
    if len(names) == len(cached.modules) and names == set(planned):
        return True
    missing, extra = sorted(set(planned) - names), sorted(names - set(planned))
    log.warning("known plan does not match the skeleton (missing %s, unknown %s); planning again",
                missing[:3], extra[:3])
    return False


def write_plan(path: Path, key: str, plan: Plan) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode(key, plan))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PlanCache:
    """Where one engine looks plan files up and writes them."""

    def __init__(self, plan_dir: str | os.PathLike[str] | None = None, *, enabled: bool = True) -> None:
        self.plan_dir = Path(plan_dir) if plan_dir is not None else default_plan_dir()
        self.enabled = enabled

    def for_load(self, name: str, backend: StorageBackend, dtype: torch.dtype | None, *,
                 root: Path | None = None) -> "PlanFiles | None":
        """``root``: the model's local directory, where the backend has one (Capabilities.root)."""
        return PlanFiles(self, name, backend, dtype, root=root) if self.enabled else None


class PlanFiles:
    """One load's look-up (once the headers are known) and, after the load, its store."""

    def __init__(self, cache: PlanCache, name: str, backend: StorageBackend, dtype: torch.dtype | None,
                 *, root: Path | None = None) -> None:
        self.cache = cache
        self.name = name
        self.backend = backend
        self.dtype = dtype
        self.model_dir = root  # a local backend's model directory: plans are stored beside it
        self.key: str | None = None
        self.found: Plan | None = None

    async def lookup(self, spec: ModelSpec, hdrs: Mapping[str, FileHeader]) -> Plan | None:
        """The stored order for this key, or None; never raises (a miss just means: plan)."""
        try:
            self.key = key = plan_key(
                spec, tensor_layout(e for h in hdrs.values() for e in h.tensors.values()), self.dtype)
        except (CicadaError, TypeError, ValueError) as e:  # a config the key cannot hash
            log.warning("no plan key for %s (%s); planning", self.name, e)
            return None
        name = plan_file_name(key)
        # The model's own storage first (a local directory, a packed layout anywhere), then
        # plan_dir; a place that fails to answer is logged and the next one is asked.
        places: list[tuple[str, Callable[[], Awaitable[bytes | None]]]] = [(f"{PLAN_DIR}/{name} of the model", lambda: self._read_stored(f"{PLAN_DIR}/{name}")),
                  (str(self.cache.plan_dir / name),
                   lambda: asyncio.to_thread(_read_local, self.cache.plan_dir / name))]
        for where, read in places:
            try:
                raw = await read()
            except (CicadaError, OSError) as e:
                log.warning("cannot read plan file %s of %s (%s)", where, self.name, e)
                continue
            if raw is None:
                continue  # a plain miss: nothing to say
            try:
                self.found = decode(raw, key)
                return self.found
            except CheckpointError as e:
                log.warning("plan file %s of %s ignored (%s); planning again", where, self.name, e)
                return None
        return None

    async def store(self, plan: Plan) -> None:
        """Keep the order this load used, unless it came from the file that is there."""
        if self.key is None:
            return  # no look-up ran (the order was known in memory)
        if self.found is not None and (self.found.modules, self.found.order_source, self.found.uncalled) == (
                plan.modules, plan.order_source, plan.uncalled):
            return
        name = plan_file_name(self.key)
        # Beside a local model first; a read-only model directory falls back to plan_dir.
        targets = ([self.model_dir / PLAN_DIR / name] if self.model_dir is not None else []) + \
            [self.cache.plan_dir / name]
        errors = []
        for path in targets:
            try:
                await asyncio.to_thread(write_plan, path, self.key, plan)
                return
            except OSError as e:
                errors.append(f"{path}: {e.strerror or e}")
        log.warning("could not write the plan of %s (%s); the next cold start plans again",
                    self.name, "; ".join(errors))

    async def _read_stored(self, key: str) -> bytes | None:
        """A plan file in the model's own storage (local directory, packed layout on S3/HTTP)."""
        return await read_small(self.backend, key, limit=MAX_PLAN_BYTES,
                                too_large=lambda m: CheckpointError(f"{m}, too large for a plan file"))


def _read_local(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_PLAN_BYTES:
        raise CheckpointError(f"{path} is too large for a plan file")
    return raw
