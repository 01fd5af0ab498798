"""tools/bench_peers.py --repeats: a row run several times keeps the median quantize time and every run's time,
and refuses runs that scored differently or failed (the scores of a row are deterministic)."""

from __future__ import annotations

import pytest

from scale_fixtures import ROOT, tool


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # bench_peers imports its shared bench_common
    return tool("bench_peers")


def run(seconds: float, **scores) -> dict:
    return {"row": "ours:int4", "quantize_s": seconds, "peak_rss_mib": 500.0 + seconds,
            **{"rel_l2": 0.25, "snr_db": 12.0, **scores}}


def test_median_time_and_every_run(peers):
    merged = peers.merged_runs([run(9.0), run(5.0), run(6.0)])
    assert merged["quantize_s"] == 6.0 and merged["quantize_s_runs"] == [9.0, 5.0, 6.0]
    assert merged["peak_rss_mib"] == 509.0 and merged["rel_l2"] == 0.25 and "error" not in merged


def test_one_run_is_the_row(peers):
    assert peers.merged_runs([run(7.0)]) == run(7.0)


def test_runs_that_score_differently_are_an_error(peers):
    merged = peers.merged_runs([run(5.0), run(6.0, rel_l2=0.26)])
    assert "rel_l2" in merged["error"] and "quantize_s_runs" not in merged


def test_a_failed_run_is_an_error(peers):
    failed = {"row": "ours:int4", "error": "process exited 1: MemoryError"}
    assert "MemoryError" in peers.merged_runs([run(5.0), failed])["error"]
