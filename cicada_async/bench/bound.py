"""The physical lower bound of one cold start, measured in a fresh process each repetition.

cold bound = max(cold read of the weight files, warm forward, host-to-device copy) + skeleton
warm bound = warm forward + skeleton

The read is the fastest of several ways to read the same bytes from a cold cache, each measured
after the files were evicted and checked with ``mincore``: a sequential buffered read and a
sequential O_DIRECT read (16 MiB, one thread), and the engine's own parallelism (4 threads,
8 MiB reads) with O_DIRECT and with ``MADV_POPULATE_READ`` on a mapping (what the engine does
for local files). Taking the minimum keeps the bound low where the device gains from queue
depth: a bound that is too high makes every ratio to it look better.
The skeleton is the fastest of three builds on meta and the warm forward the fastest of five
after a first one: on a shared machine other processes only ever add time (a median of three
forwards on two busy cores once put gpt2's bound above every strategy's whole cold start). The bound ignores that the engine overlaps the skeleton with the read, so it is
lower than what the engine could ever reach only by that (a few ms).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cicada_async.bench.pagecache import libc, make_cold, weight_files

SEQ_BYTES = 16 << 20
ENGINE_READERS = 4  # Engine(read_concurrency=4)
ENGINE_READ_BYTES = 8 << 20  # plan.DEFAULT_READ_BYTES; not imported, so this module needs no torch
_MADV_POPULATE_READ = 22


def _sequential(files: list[Path], flags: int) -> None:
    buf = mmap.mmap(-1, SEQ_BYTES)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY | flags)
            try:
                off = 0
                while n := os.preadv(fd, [view], off):
                    off += n
                    if n < len(view):
                        break
            finally:
                os.close(fd)
    finally:
        view.release()
        buf.close()


def _chunks(files: list[Path]) -> list[tuple[Path, int, int]]:
    out: list[tuple[Path, int, int]] = []
    for f in files:
        size = f.stat().st_size
        out.extend((f, off, min(ENGINE_READ_BYTES, size - off)) for off in range(0, size, ENGINE_READ_BYTES))
    return out


def _in_threads(chunks: list[tuple[Path, int, int]], work: Callable[[int, tuple[Path, int, int]], None]) -> None:
    """Run ``work(thread index, chunk)`` over the chunks in file order, ENGINE_READERS at a time."""
    lock = threading.Lock()
    it = iter(chunks)
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        try:
            while True:
                with lock:
                    c = next(it, None)
                if c is None:
                    return
                work(i, c)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(ENGINE_READERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _parallel_direct(files: list[Path]) -> None:
    bufs = [mmap.mmap(-1, ENGINE_READ_BYTES) for _ in range(ENGINE_READERS)]
    fds = {f: os.open(f, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for f in files}
    try:
        def work(i: int, c: tuple[Path, int, int]) -> None:
            os.preadv(fds[c[0]], [bufs[i]], c[1])  # releases the GIL while the device reads

        _in_threads(_chunks(files), work)
    finally:
        for fd in fds.values():
            os.close(fd)
        for b in bufs:
            b.close()


def _parallel_populate(files: list[Path]) -> None:
    lib = libc()
    maps: dict[Path, int] = {}
    fds = [os.open(f, os.O_RDONLY) for f in files]
    try:
        for f, fd in zip(files, fds, strict=True):
            maps[f] = lib.mmap(None, f.stat().st_size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)

        def work(i: int, c: tuple[Path, int, int]) -> None:
            if lib.madvise(maps[c[0]] + c[1], c[2], _MADV_POPULATE_READ) != 0:
                raise OSError("MADV_POPULATE_READ failed")

        _in_threads(_chunks(files), work)
    finally:
        for f, addr in maps.items():
            lib.munmap(addr, f.stat().st_size)
        for fd in fds:
            os.close(fd)


READS: dict[str, Callable[[list[Path]], None]] = {
    "buffered": lambda files: _sequential(files, 0),
    "direct": lambda files: _sequential(files, getattr(os, "O_DIRECT", 0)),
    "parallel-direct": _parallel_direct,
    "parallel-populate": _parallel_populate,
}


def cold_reads(model_dir: Path) -> dict[str, Any]:
    """Each read method once from a verified-cold cache; a method whose files could not be
    evicted, or that fails, is reported with its reason and left out of the minimum."""
    files = weight_files(model_dir)
    times: dict[str, float] = {}
    invalid: dict[str, str] = {}
    for method, read in READS.items():
        r = make_cold(model_dir)
        if r.resident_bytes:
            invalid[method] = f"not evicted: {r.resident_bytes} bytes resident"
            continue
        t0 = time.perf_counter()
        try:
            read(files)
        except OSError as e:
            invalid[method] = f"failed: {e}"
            continue
        times[method] = time.perf_counter() - t0
    if not times:
        raise RuntimeError(f"no cold read could be measured: {invalid}")
    return {"read_cold_s": min(times.values()), "read_method": min(times, key=times.__getitem__),
            "read_methods_s": times, "read_invalid": invalid}


def loaded(model_dir: Path, spec: Any) -> Any:
    """A model loaded the meta-mmap way (that strategy returns outputs only), to time forwards."""
    from cicada_async.bench.strategies import _state_dict, _tie_groups
    from cicada_async.engine.skeleton import skeleton_mode

    with skeleton_mode():
        model = spec.build()
    ties = _tie_groups(model)
    model.load_state_dict(_state_dict(model_dir, spec, model), strict=False, assign=True)
    for group in ties:
        p = next(q for m, n in group if (q := m._parameters[n]) is not None and not q.is_meta)
        for m, n in group:
            m._parameters[n] = p
    return model.eval()


def bound_worker(model_dir: Path, device: str = "cpu", seq: int = 128) -> dict[str, Any]:
    """The parts of the lower bound, measured in one (fresh) process."""
    import torch

    from cicada_async.bench.strategies import example_inputs, local_spec
    from cicada_async.engine.forward import output_dict
    from cicada_async.engine.modeldir import prepare_imports
    from cicada_async.engine.skeleton import skeleton_mode

    spec = local_spec(model_dir)
    prepare_imports(spec)
    skeleton = []
    for _ in range(3):
        t0 = time.perf_counter()
        with skeleton_mode():
            spec.build()
        skeleton.append(time.perf_counter() - t0)
    reads = cold_reads(model_dir)
    inputs = example_inputs(spec, seq=seq)
    model = loaded(model_dir, spec).to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    fwd = []
    with torch.inference_mode():
        for _ in range(6):
            t0 = time.perf_counter()
            out = output_dict(model(**inputs))
            {k: v.cpu() for k, v in out.items()}
            fwd.append(time.perf_counter() - t0)
    warm_forward = min(fwd[1:])  # a bound: the fastest seen; contention only adds time
    sk = min(skeleton)
    h2d = 0.0
    if device != "cpu":
        # Host-to-device time of all weight bytes from pinned memory, in 64 MiB pieces.
        total = sum(f.stat().st_size for f in weight_files(model_dir))
        src = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(total, dtype=torch.uint8, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for lo in range(0, total, src.numel()):
            n = min(src.numel(), total - lo)
            dst[lo : lo + n].copy_(src[:n], non_blocking=True)
        torch.cuda.synchronize()
        h2d = time.perf_counter() - t0
    return {
        "skeleton_s": sk, **reads, "warm_forward_s": warm_forward, "h2d_s": h2d,
        "lower_bound_s": max(reads["read_cold_s"], warm_forward, h2d) + sk,
        "warm_bound_s": warm_forward + sk,
        "warm_forwards_s": fwd, "skeletons_s": skeleton,
    }
