"""The process's first millisecond: read the configured models' weights while torch imports.

``cicada serve`` and ``cicada run`` call ``start_for_cli`` as their very first statement. When
asked for (``[server] prefetch = true``, ``CICADA_PREFETCH=1``; off by default, measured in
docs/process-start.md: the first load's fetch already overlaps the transformers import) it
finds the local weight files of the models the command will serve (from the TOML config, the
model repository or the ``run`` argument, with nothing but the standard library) and starts two
threads that pull them into the page cache. The engine's mapped landing later finds the pages
there, so a fresh process pays about imports + skeleton + forward, not that plus the read.

Why this way:
- ``posix_fadvise(WILLNEED)`` is only a hint; measured here it queued 8 MB of a 1.4 GB file.
- ``MADV_POPULATE_READ`` on a short-lived mapping of each chunk makes the kernel read straight
  into page-cache pages: no copy into a user buffer (``pread`` into a scratch buffer cost
  1-5 s of CPU for gpt2-medium on 2 cores, competing with the imports), and the ctypes call
  releases the GIL, so the imports on the main thread go on meanwhile. Each chunk is unmapped
  at once, so the process's RSS does not grow by the file.
- Remote models (S3, HTTP) are not prefetched: their bytes would have to land in buffers the
  landing adopts later (see docs/process-start.md).

This module must import nothing heavy: it runs before torch, numpy or aiohttp are loaded.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cicada_async.engine.procfs import kib_field

CHUNK_BYTES = 32 << 20  # one GIL hand-over per 32 MiB read: rare enough not to slow the imports
THREADS = 2  # measured on 2 cores: 2 readers beat 1 and 4 (the disk, not the CPU, limits)
_MADV_POPULATE_READ = 22  # Linux 5.14+
ENV_SWITCH = "CICADA_PREFETCH"  # "1" on, "0" off, whatever the config says (benchmarks compare both)


@dataclass
class Prefetch:
    """Weight files being read into the page cache by background threads."""

    files: list[Path]
    total_bytes: int
    started_at: float = field(default_factory=time.time)  # wall clock, for log lines
    torch_loaded_at_start: bool = field(default_factory=lambda: "torch" in sys.modules)
    done_bytes: int = 0
    finished_at: float | None = None
    error: str | None = None
    skipped: list[str] = field(default_factory=list)  # what was not prefetched, and why
    _chunks: list[tuple[Path, int, int]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)

    def start(self, threads: int = THREADS) -> "Prefetch":
        self._chunks = [(f, off, min(CHUNK_BYTES, size - off))
                        for f, size in ((f, f.stat().st_size) for f in self.files)
                        for off in range(0, size, CHUNK_BYTES)]
        self._chunks.reverse()  # pop() from the end takes them in file order
        self._running = threads
        for i in range(threads):
            t = threading.Thread(target=self._work, name=f"cicada-prefetch-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _work(self) -> None:
        populate = _populate_fn()
        while True:
            with self._lock:
                if not self._chunks or self.error is not None:
                    break
                path, off, length = self._chunks.pop()
            try:
                _read_chunk(path, off, length, populate)
            except OSError as e:  # a vanished or unreadable file: the load will say why
                with self._lock:
                    self.error = f"{path}: {e.strerror or e}"
                break
            with self._lock:
                self.done_bytes += length
        with self._lock:
            self._running -= 1
            if self._running == 0:
                self.finished_at = time.time()

    def wait(self, timeout: float | None = None) -> bool:
        """True once every thread has finished (for tests and benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "started_at": self.started_at,
                "torch_loaded_at_start": self.torch_loaded_at_start,
                "files": [str(f) for f in self.files],
                "bytes": self.total_bytes,
                "done_bytes": self.done_bytes,
                "seconds": None if self.finished_at is None else round(self.finished_at - self.started_at, 6),
                "error": self.error,
                "skipped": list(self.skipped),
            }


_current: Prefetch | None = None


def current() -> Prefetch | None:
    """The prefetch this process started, if any (the server logs it with its start line)."""
    return _current


def start_for_cli(argv: list[str]) -> Prefetch | None:
    """Start prefetching for ``cicada serve ...`` or ``cicada run MODEL``; never raises."""
    global _current
    env = os.environ.get(ENV_SWITCH)
    if env == "0" or not argv or argv[0] not in ("serve", "run"):
        return None
    try:
        # Off unless asked for: with the engine's warm import of transformers overlapping the
        # first load's fetch, the prefetch only slowed the torch import it overlaps
        # (docs/process-start.md).
        forced = env == "1"
        if argv[0] == "serve":
            targets = _serve_targets(argv[1:], forced)
        else:
            targets = _run_targets(argv[1:]) if forced else None
        if targets is None:
            return None
        dirs, skipped, budget = targets
        _current = prefetch_dirs(dirs, budget=budget, skipped=skipped)
    except Exception as e:  # noqa: BLE001 - a prefetch is an optimization: the command must run
        _current = Prefetch([], 0, error=f"{type(e).__name__}: {e}")
    return _current


def prefetch_dirs(dirs: list[Path], *, budget: int | None = None,
                  skipped: list[str] | None = None) -> Prefetch:
    """Prefetch the weight files of ``dirs`` in order, as many whole models as fit ``budget``."""
    budget = available_bytes() // 2 if budget is None else budget
    files: list[Path] = []
    total = 0
    skipped = list(skipped or [])
    for d in dirs:
        wf = weight_files(d)
        size = sum(f.stat().st_size for f in wf)
        if not wf:
            skipped.append(f"{d}: no safetensors weights found")
        elif total + size > budget:
            skipped.append(f"{d}: {size} bytes do not fit the prefetch budget of {budget}")
        else:
            files += wf
            total += size
    return Prefetch(files, total, skipped=skipped).start()


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files the engine will read, found as modeldir.read_model_spec does."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_bytes()).get("weight_map") or {}
        names = sorted({v for v in weight_map.values() if isinstance(v, str) and v.endswith(".safetensors")})
        return [p for n in names if (p := model_dir / n).is_file() and _inside(p, model_dir)]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where unknown: then nothing is prefetched)."""
    return kib_field("/proc/meminfo", b"MemAvailable:") or 0


def local_dir(uri: str) -> Path | None:
    """The directory of a local model URI (a path or file://), None for a remote one."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:  # s3://, http(s):// (a one-letter scheme is a drive)
        return None
    return Path(uri)


def _serve_targets(argv: list[str], forced: bool) -> tuple[list[Path], list[str], int | None] | None:
    """Model directories of ``cicada serve --config F`` or ``--model-repository D``; None when
    neither ``forced`` nor the config's ``[server] prefetch = true`` asks for a prefetch."""
    config, repo = _flag(argv, "--config"), _flag(argv, "--model-repository")
    dirs: list[Path] = []
    skipped: list[str] = []
    budget = None
    if config is not None:
        with open(config, "rb") as f:
            doc = tomllib.load(f)
        server = doc.get("server") or {}
        if not forced and server.get("prefetch") is not True:
            return None
        if isinstance(server.get("memory_budget_bytes"), int):
            budget = min(server["memory_budget_bytes"], available_bytes() // 2)
        for name, table in (doc.get("models") or {}).items():
            uri = table.get("uri") if isinstance(table, dict) else None
            d = local_dir(uri) if isinstance(uri, str) else None
            if d is None:
                skipped.append(f"{name}: remote ({uri}); not prefetched")
            elif d.is_dir():
                dirs.append(d)
        if isinstance(doc.get("model_repository"), str):
            dirs += [d for d in _repository(Path(doc["model_repository"])) if d not in dirs]
    elif not forced:
        return None
    elif repo is not None:
        dirs = _repository(Path(repo))
    return dirs, skipped, budget


def _repository(root: Path) -> list[Path]:
    """Model folders of a repository directory, in the order config.scan_repository takes."""
    if not root.is_dir():
        return []
    return [d for d in sorted(root.iterdir()) if d.is_dir() and not d.is_symlink()
            and ((d / "config.json").is_file() or (d / "cicada.json").is_file())]


def _run_targets(argv: list[str]) -> tuple[list[Path], list[str], int | None]:
    """The model directory of ``cicada run MODEL`` (the first positional argument)."""
    takes_value = {"--input", "--output", "--strategy", "--timeline", "--plot", "--device", "--dtype"}
    it = iter(argv)
    for a in it:
        if a in takes_value:
            next(it, None)
        elif not a.startswith("-"):
            d = local_dir(a)
            return ([d] if d is not None and d.is_dir() else []), ([] if d else [f"{a}: remote"]), None
    return [], [], None


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _populate_fn() -> Any:
    """libc's madvise where MADV_POPULATE_READ works, else None (then chunks are pread)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _read_chunk(path: Path, off: int, length: int, populate: Any) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if populate is not None and off % mmap.ALLOCATIONGRANULARITY == 0:
            # Private and writable only so ctypes can take its address; nothing writes to it.
            m = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
            try:
                buf = (ctypes.c_char * length).from_buffer(m)
                ok = populate(ctypes.addressof(buf), length, _MADV_POPULATE_READ) == 0
                del buf
            finally:
                m.close()
            if ok:
                return
        scratch = bytearray(min(length, 8 << 20))  # fallback: pread through the page cache
        done = 0
        while done < length:
            n = os.preadv(fd, [memoryview(scratch)[: length - done]], off + done)
            if n <= 0:
                return
            done += n
    finally:
        os.close(fd)
