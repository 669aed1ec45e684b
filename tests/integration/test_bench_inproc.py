"""benchmarks/inproc.py: the in-process CPU figure runs end to end and every request it sends is approved."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# the first ``share`` of every 100 requests are refunds; after the 32 purchases of the warm-up the
# measured requests are numbers 32-159, of which 100-124 are refunds at 25%
@pytest.mark.parametrize(("share", "refunds"), [(25, 25), (100, 128)])
def test_inproc_reports_cpu_per_message_for_purchases_and_refunds(share: int, refunds: int) -> None:
    # every refund the line counts was answered 00 (the harness stops on any other code), so each one
    # found an original of its own: the warm-up approves one purchase per refund to come
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inproc", "--messages", "128", "--refunds", str(share), "--group", "32",
         "--warmup", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"128 messages \({refunds} of them refunds\): event-loop thread ([\d.]+) µs/msg, "
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
