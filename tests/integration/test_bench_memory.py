"""benchmarks/memory.py on a small scale: more idle connections than the gateway's default per address
are held, and every slice drives new transactions (not retransmissions of the first slice's)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_memory_holds_300_idle_connections_and_each_slice_records_new_transactions(tmp_path: Path) -> None:
    workdir, output = tmp_path / "work", tmp_path / "memory.json"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--connections", "300", "--cycles", "1", "--messages", "1500",
         "--slices", "3", "--workdir", str(workdir), "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    figures = json.loads(output.read_text())
    assert figures, out.stdout
    with contextlib.closing(sqlite3.connect(workdir / "ledger-1.db")) as db:
        records = db.execute("SELECT COUNT(*) FROM txns").fetchone()[0]
        replays = db.execute("SELECT COUNT(*) FROM outbox WHERE payload LIKE '%pos.duplicate.replayed%'").fetchone()[0]
        terminals = db.execute("SELECT COUNT(DISTINCT terminal_id) FROM txns").fetchone()[0]
    assert (records, replays) == (1500, 0)
    assert terminals == 3 * 4  # each slice's four load connections are terminals of their own
