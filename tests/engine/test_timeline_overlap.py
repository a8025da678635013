"""The overlap figure (``utilization``) of cold starts whose overlap is known exactly
(review-3 T-3).

The service test asserted ``0 <= utilization <= 1``, which cannot fail: the summary clips to
that range. Here the spans are laid down by hand, so the expected value comes from the
definition in docs/timeline.md worked out on paper, not from the code: (fetch_s + compute_s -
(total_s - skeleton_s - plan_s)) / min(fetch_s, compute_s), clipped to [0, 1]. No clock runs.
"""

from __future__ import annotations

import pytest

from cicada_async.engine.timeline import Span, Timeline


def summary(*spans: Span) -> dict[str, object]:
    return Timeline(t0=0.0, spans=list(spans)).summary()


def test_fetch_then_compute_is_no_overlap() -> None:
    s = summary(Span("fetch", "r0", 0.0, 1.0, 1000), Span("compute", "h.0", 1.0, 2.0))
    assert s["utilization"] == pytest.approx(0.0)


def test_compute_inside_the_fetch_is_full_overlap() -> None:
    s = summary(Span("fetch", "r0", 0.0, 2.0, 1000), Span("compute", "h.0", 0.5, 1.5))
    assert s["utilization"] == pytest.approx(1.0)


def test_half_the_compute_under_the_fetch() -> None:
    # fetch 0-1 s, compute 0.5-1.5 s: 0.5 s of the shorter (1 s each) hidden, total 1.5 s.
    s = summary(Span("fetch", "r0", 0.0, 0.6, 600), Span("fetch", "r1", 0.4, 1.0, 400),
                Span("compute", "h.0", 0.5, 1.0), Span("compute", "h.0.attn", 0.6, 0.8),  # nested: once
                Span("compute", "h.1", 1.0, 1.5))
    assert s["utilization"] == pytest.approx(0.5)
    assert s["stages"]["fetch_s"] == pytest.approx(1.0)  # first read's start to last read's end
    assert s["stages"]["compute_s"] == pytest.approx(1.0)
    assert s["gbps"] == pytest.approx(1000 / 1.0 / 1e9)


def test_skeleton_and_plan_time_is_not_counted_against_the_overlap() -> None:
    # The skeleton (0-0.3 s) and the plan (0.3-0.4 s) run while the first reads are on the
    # wire; the last layer's reads arrive late (0.8-1.2 s), its forward waits for them and
    # computes 1.2-1.6 s. total 1.6 - 0.4 = 1.2; fetch 1.2, compute 0.8:
    # (1.2 + 0.8 - 1.2) / 0.8 = 1.0 exactly (no clipping involved).
    s = summary(Span("stage", "skeleton", 0.0, 0.3), Span("stage", "plan", 0.3, 0.4),
                Span("fetch", "r0", 0.0, 0.8, 100), Span("fetch", "last", 0.8, 1.2, 100),
                Span("compute", "h.0", 0.4, 0.8), Span("wait", "h.1", 0.8, 1.2),
                Span("compute", "h.1", 1.2, 1.6))
    assert s["utilization"] == pytest.approx(1.0)
    assert s["stall_s"] == pytest.approx(0.4)
    assert s["time_to_first_compute_s"] == pytest.approx(0.4)
    # Other stages (spec, headers) are not subtracted: the same spans read
    # (1.2 + 0.8 - 1.6) / 0.8 = 0.5.
    s = summary(Span("stage", "spec", 0.0, 0.3), Span("stage", "headers", 0.3, 0.4),
                Span("fetch", "r0", 0.0, 0.8, 100), Span("fetch", "last", 0.8, 1.2, 100),
                Span("compute", "h.0", 0.4, 0.8), Span("compute", "h.1", 1.2, 1.6))
    assert s["utilization"] == pytest.approx(0.5)
