"""benchmarks.ab: the summary of alternated runs (ratios, sign test) and the export of a revision."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks.ab import compare, export, sign_test_p
from benchmarks.run import ROOT


def test_sign_test_matches_the_binomial_tails() -> None:
    assert sign_test_p(8, 8) == pytest.approx(2 / 256)
    assert sign_test_p(0, 8) == pytest.approx(2 / 256)
    assert sign_test_p(7, 8) == pytest.approx(2 * 9 / 256)
    assert sign_test_p(4, 8) == 1.0  # an even split is no evidence either way
    assert sign_test_p(3, 3) == pytest.approx(0.25)
    assert sign_test_p(0, 0) == 1.0


def test_compare_reads_ratios_as_head_over_base_and_counts_the_better_side() -> None:
    faster = compare([(100.0, 110.0), (200.0, 210.0), (100.0, 95.0)])
    assert faster.ratios == pytest.approx((1.10, 1.05, 0.95))
    assert faster.median == pytest.approx(1.05)
    assert (faster.low, faster.high) == pytest.approx((0.95, 1.10))
    assert faster.better == 2
    assert faster.p_value == pytest.approx(1.0)

    cheaper = compare([(100.0, 90.0), (100.0, 80.0), (100.0, 100.0)], lower_is_better=True)
    assert cheaper.better == 2
    assert cheaper.p_value == pytest.approx(0.5)  # the tie counts for neither side


def test_compare_refuses_a_pair_without_a_positive_base() -> None:
    with pytest.raises(ValueError, match="positive base"):
        compare([(0.0, 1.0)])
    with pytest.raises(ValueError, match="positive base"):
        compare([])


def test_export_writes_the_tree_of_a_revision(tmp_path: Path) -> None:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert export("HEAD", tmp_path / "tree") == head.stdout.strip()
    assert (tmp_path / "tree" / "gateway" / "service.py").is_file()
    assert (tmp_path / "tree" / "benchmarks" / "inproc.py").is_file()
    with pytest.raises(SystemExit, match="not a revision"):
        export("no-such-revision-anywhere", tmp_path / "other")


def test_make_bench_reports_each_rounds_ratio_and_the_machines_drift() -> None:
    from benchmarks.run import DRIFT_WARNING, drift, round_ratios

    rounds = [
        {"bare": {"tps": 10_000.0}, "gateway": {"tps": 3_000.0}},
        {"bare": {"tps": 12_000.0}, "gateway": {"tps": 3_000.0}},
        {"bare": {"tps": 15_000.0}, "gateway": {"tps": 4_500.0}},
    ]
    assert round_ratios(rounds) == pytest.approx([0.30, 0.25, 0.30])
    assert drift(rounds) == pytest.approx(0.5)  # 15,000 / 10,000 - 1: the machine, not the code
    assert drift(rounds) > DRIFT_WARNING
    steady = [{"bare": {"tps": 10_000.0}, "gateway": {"tps": 3_000.0}}] * 3
    assert drift(steady) == 0.0
    assert drift([]) == 0.0


def test_the_gateways_own_latencies_are_read_from_its_log(tmp_path: Path) -> None:
    from benchmarks.run import logged_latencies

    log = tmp_path / "gateway.log"
    log.write_bytes(
        b'{"event":"message.processed","latency_ms":2.5,"level":"info"}\n'
        b'{"event":"outbox.published","count":3}\n'
        b'not json "message.processed" {\n'
        b'{"event":"message.processed","latency_ms":7,"level":"info"}\n'
        b'{"event":"message.processed","latency_ms":null}\n'
        b'{"event":"message.processed","latency_ms":1.0}\n'
    )
    assert logged_latencies(log) == [2.5, 7.0, 1.0]
    assert logged_latencies(tmp_path / "missing.log") == []
