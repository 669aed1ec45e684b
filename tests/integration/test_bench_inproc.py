"""benchmarks/inproc.py: the in-process CPU figure runs end to end and every request it sends is approved."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_inproc_reports_cpu_per_message_for_purchases_and_refunds() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inproc", "--messages", "128", "--refunds", "25", "--group", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"128 messages \(25% refunds\): event-loop thread ([\d.]+) µs/msg, "
        r"process ([\d.]+) µs/msg, wall ([\d.]+) µs/msg",
        line,
    )
    assert found is not None, line
    loop_us, process_us, _ = (float(value) for value in found.groups())
    assert 0 < loop_us <= process_us


def test_inproc_refuses_a_group_larger_than_the_run() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inproc", "--messages", "10", "--group", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 2
    assert "--messages at least --group" in out.stderr
