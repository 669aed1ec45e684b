"""benchmarks/inproc.py: the in-process CPU figure runs end to end and every request it sends is approved."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# The first ``share`` of every 100 requests are refunds. After a warm-up of 32 purchases (one per
# refund to come) the measured requests are numbers 32-159, of which 100-124 are refunds at 25%. With
# --warmup 70 the warm-up is 102 purchases, rounded up to whole groups (128): were the measurement to
# start at 102, the requests 102-127 would be sent twice, once as purchases in the warm-up and then
# as refunds with the same STAN (answered 94); it starts at 128, and 200-224 are the refunds.
@pytest.mark.parametrize(("share", "warmup", "refunds"), [(25, 0, 25), (100, 0, 128), (25, 70, 25)])
def test_inproc_reports_cpu_per_message_for_purchases_and_refunds(share: int, warmup: int, refunds: int) -> None:
    # every refund the line counts was answered 00 (the harness stops on any other code), so each one
    # found an original of its own: the warm-up approves one purchase per refund to come
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.inproc", "--messages", "128", "--refunds", str(share), "--group", "32",
         "--warmup", str(warmup)],
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
