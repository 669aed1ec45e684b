"""``make demo`` (``python -m gateway.demo``) keeps what it ran in a named folder and says where, with
a few of the gateway's log lines (issue 22: it counted its log lines but neither showed nor kept them)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def demo(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.demo", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_demo_keeps_its_log_events_and_ledger_in_its_folder_and_shows_a_few_log_lines(tmp_path: Path) -> None:
    out = demo(tmp_path)
    folder = tmp_path / "demo-output"  # the default, in the folder make runs it from
    log = (folder / "gateway.log").read_text().splitlines()
    lines = [json.loads(line) for line in log]
    assert {"gateway.started", "message.processed", "gateway.stopped"} <= {line["event"] for line in lines}
    assert f"gateway log: demo-output/gateway.log ({len(log)} JSON lines)" in out
    refusals = [line for line in log if '"event":"message.processed"' in line and '"reason":null' not in line]
    assert len(refusals) >= 3
    for line in refusals[:3]:
        assert f"  {line}" in out.splitlines()  # shown whole, as written
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert {"pos.refund.approved", "pos.refund.declined", "pos.batch.settled"} <= {e["event"]["type"] for e in events}
    published = sum(line["count"] for line in lines if line["event"] == "outbox.published")
    assert len({e["event"]["id"] for e in events}) == published  # every event the relay published came
    assert f"correction events received ({len(events)})" in out
    assert (folder / "ledger.db").is_file()
    assert "4761739001010119" not in (folder / "gateway.log").read_text()


def test_a_second_run_replaces_the_first_runs_files_and_leaves_others_alone(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    first = demo(tmp_path, "--dir", str(folder))
    second = demo(tmp_path, "--dir", str(folder))
    assert first.count("000000000001") == second.count("000000000001") >= 1  # a fresh ledger: RRNs from 1
    assert (folder / "notes.txt").read_text() == "mine\n"
    log = (folder / "gateway.log").read_text()
    assert log.count('"event":"gateway.started"') == 1
