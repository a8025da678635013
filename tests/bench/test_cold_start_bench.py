"""The cold-start benchmark's own checks: eviction seen through mincore, a median below the bound
fails the run, failed and invalid runs are counted. The driver is fed by a stub measurement
function (the benchmark's logic is what is tested, not the engine), and once by real workers."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from cicada_async.bench.cold_start import cold_start_bench, run_bench, spawn
from cicada_async.bench.cold_start_report import problem_runs, summary_table
from cicada_async.bench.pagecache import make_cold, make_warm, resident_pages, weight_files


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_mincore_sees_a_read_file_and_its_eviction(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(4 << 20))
    with open(f, "rb") as fh:
        fh.read()
    resident, total = resident_pages(f)
    assert total == (4 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert resident == total
    _evict(f)
    # The benchmark depends on eviction working here: a filesystem that ignores DONTNEED (tmpfs)
    # would make every cold run invalid, so this fails rather than skips.
    assert resident_pages(f) == (0, total)
    # The helpers the workers call before the clock say the same.
    assert make_warm(tmp_path).fraction == 1.0
    r = make_cold(tmp_path)
    assert r.resident_bytes == 0 and r.total_bytes == 4 << 20 and r.trusted


def _run(total_s: float, **extra: Any) -> dict[str, Any]:
    return {"total_s": total_s, "teardown_s": 0.01, "parts": {"forward_s": total_s / 2},
            "peak_rss_bytes": 500_000_000, "baseline_rss_bytes": 350_000_000,
            "residency": {"resident_bytes": 0}, "invalid": None, **extra}


class StubMeasure:
    """Answers the driver's worker calls with given figures (ms), per strategy and variant;
    ``fail`` and ``invalid`` name (variant, strategy, rep) calls that fail or are not cold."""

    def __init__(self, times: dict[tuple[str, str], float], bound_ms: float = 100.0,
                 fail: set[tuple[str, str, int]] = frozenset(), invalid: set[tuple[str, str, int]] = frozenset()) -> None:
        self.times, self.bound_ms, self.fail, self.invalid = times, bound_ms, fail, invalid
        self.calls: list[list[str]] = []
        self.reps: dict[tuple[str, str], int] = {}

    def __call__(self, argv: list[str]) -> dict[str, Any]:
        self.calls.append(argv)
        if argv[0] == "--bound":
            b = self.bound_ms / 1e3
            return {"lower_bound_s": b, "warm_bound_s": b / 2, "read_cold_s": b * 0.9, "read_method": "direct",
                    "read_methods_s": {"direct": b * 0.9}, "warm_forward_s": b / 3, "skeleton_s": 0.01, "h2d_s": 0.0}
        _, strategy, _, variant = argv
        rep = self.reps[(variant, strategy)] = self.reps.get((variant, strategy), -1) + 1
        if (variant, strategy, rep) in self.fail:
            return {"error": "exit 1: RuntimeError: deliberately failing strategy"}
        invalid = "not evicted: 4096 of 8192 bytes resident after 3 drops" if (variant, strategy, rep) in self.invalid else None
        return _run(self.times[(variant, strategy)] / 1e3, invalid=invalid)


def _args(models: dict[str, Path], tmp_path: Path, strategies: str, repeat: int = 3, warm: bool = True) -> argparse.Namespace:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    for name, d in models.items():
        if not (root / name).exists():
            shutil.copytree(d, root / name)
    return argparse.Namespace(models=",".join(models), strategies=strategies, repeat=repeat, warm=warm,
                              dir=root, json=tmp_path / "out" / "cold-start.json", device="cpu")


def test_a_median_below_the_bound_fails_the_run(model_dirs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    measure = StubMeasure({("cold", "cicada"): 80, ("cold", "eager"): 400,
                           ("warm", "cicada"): 60, ("warm", "eager"): 300})
    args = _args({"tiny-gpt2": model_dirs["tiny-gpt2"]}, tmp_path, "cicada,eager")
    assert cold_start_bench(args, measure) == 1
    err = capsys.readouterr().err
    assert "BOUND BEATEN: tiny-gpt2 cold: cicada median 80 ms beats the cold bound 100 ms" in err
    assert "must not be quoted" in err
    doc = json.loads(args.json.read_text())  # written all the same, to look at
    assert doc["bound_violations"] == ["tiny-gpt2 cold: cicada median 80 ms beats the cold bound 100 ms"]
    assert doc["commit"] and doc["machine"]["nproc"] >= 1 and doc["machine"]["kernel"]
    assert doc["command"].startswith(("cicada", "python", "/")) and doc["clock"]["stops"]
    # The bound was measured every rep, interleaved: its position in the order rotates.
    cold_calls = [c for c in measure.calls if c[0] == "--bound" or c[3] == "cold"]
    positions = [i % 3 for i, c in enumerate(cold_calls) if c[0] == "--bound"]
    assert len(positions) == 3 and len(set(positions)) == 3
    assert doc["models"]["tiny-gpt2"]["bound"]["n_valid"] == 3


def test_medians_at_or_above_the_bound_pass(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    measure = StubMeasure({("cold", "cicada"): 120, ("cold", "eager"): 400,
                           ("warm", "cicada"): 55, ("warm", "eager"): 300})
    args = _args({"tiny-gpt2": model_dirs["tiny-gpt2"]}, tmp_path, "cicada,eager")
    assert cold_start_bench(args, measure) == 0
    t = json.loads(args.json.read_text())["targets"]["tiny-gpt2"]
    assert t["cold: cicada / bound"] == 1.2 and t["cold: cicada <= 1.25x bound"] is True
    assert t["warm: cicada / bound"] == 1.1 and t["cold: eager / cicada"] == 3.33


def test_failed_and_invalid_runs_are_counted_not_used(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    measure = StubMeasure({("cold", "meta-mmap"): 200, ("cold", "eager"): 400},
                          fail={("cold", "eager", 0)}, invalid={("cold", "meta-mmap", 1)})
    results = run_bench({"tiny-gpt2": model_dirs["tiny-gpt2"]}, ["meta-mmap", "eager"], 3, False,
                        measure=measure, log=lambda _: None)
    eager = results["models"]["tiny-gpt2"]["cold"]["eager"]
    mm = results["models"]["tiny-gpt2"]["cold"]["meta-mmap"]
    assert (eager["n"], eager["n_valid"], eager["n_failed"], eager["n_invalid"]) == (3, 2, 1, 0)
    assert (mm["n"], mm["n_valid"], mm["n_failed"], mm["n_invalid"]) == (3, 2, 0, 1)
    assert len(eager["runs"]) == 3 and "deliberately failing" in eager["runs"][0]["error"]
    assert mm["runs_s"] == [0.2, 0.2]  # the invalid run is kept in "runs", not in the median
    lines = problem_runs(results)
    assert any("eager: 1 failed, 0 invalid of 3" in line for line in lines)
    assert any("meta-mmap: 0 failed, 1 invalid of 3: not evicted" in line for line in lines)
    table = summary_table(results)
    assert "400 [2/3 valid]" in table and "200 [2/3 valid]" in table


def test_real_workers_failing_strategy_is_counted(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Real fresh processes on a tiny model: the worker's JSON fits the statistics, eviction is
    checked before the clock, and a strategy that raises is counted, not lost."""
    # A private copy: no other test of this session has its files mapped, so eviction must work
    # and the run must be valid.
    model = tmp_path / "tiny-gpt2"
    shutil.copytree(model_dirs["tiny-gpt2"], model)
    env = os.environ.get("PYTHONPATH")
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = root if not env else f"{root}:{env}"
    try:
        results = run_bench({"tiny-gpt2": model}, ["meta-mmap", "no-such-strategy"], 1, False,
                            measure=spawn, log=lambda _: None)
    finally:
        if env is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = env
    e = results["models"]["tiny-gpt2"]
    bad = e["cold"]["no-such-strategy"]
    assert (bad["n"], bad["n_failed"]) == (1, 1) and "KeyError" in bad["runs"][0]["error"]
    mm = e["cold"]["meta-mmap"]
    assert mm["n_valid"] == 1, mm["runs"]
    run = mm["runs"][0]
    assert run["residency"]["total_bytes"] >= weight_files(model)[0].stat().st_size
    # A 2 MB model, imports outside the clock: well under a second on this machine, 5 s of slack.
    assert 0 < run["total_s"] < 5 and run["teardown_s"] >= 0 and "outputs_at" not in run["parts"]
    b = e["bound"]
    assert b["n_valid"] == 1 and set(b["read_methods_s"]) >= {"buffered", "direct"}
    assert b["cold"]["median_s"] >= b["warm"]["median_s"] > 0


def test_cicada_is_measured_with_the_servers_threads() -> None:
    # The benchmarks must run what `cicada serve` runs by default, not Engine() with torch on
    # every core (which the server never does), and leave the process's setting as it was.
    import torch

    from cicada_async.bench.strategies import as_served
    from cicada_async.engine.procfs import threads_while_fetching

    before = torch.get_num_threads()
    with as_served({"storage": {}}) as settings:
        assert torch.get_num_threads() == threads_while_fetching()
        assert settings == {"every_core_when_idle": True, "storage": {}}
    assert torch.get_num_threads() == before
