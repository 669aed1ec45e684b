"""benchmarks/relay.py: the relay benchmark drains its outbox into a private Mosquitto and reports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from brokers import missing_service, mosquitto_binary

REPO = Path(__file__).resolve().parents[2]


def test_the_relay_benchmark_reports_events_per_second_and_loop_cpu_per_event() -> None:
    if mosquitto_binary() is None:
        missing_service("mosquitto is not installed")
        return
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.relay", "--events", "300", "--batch-size", "50", "--rounds", "2",
         "--timeout", "30"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rounds = re.findall(r"^round \d head .+?([\d,]+) events/s +([\d.]+) loop µs/event  errors 0$", out.stdout, re.M)
    assert len(rounds) == 2, out.stdout
    assert all(int(rate.replace(",", "")) > 0 and float(cpu) > 0 for rate, cpu in rounds)
    assert re.search(r"^median head .+ events/s", out.stdout, re.M), out.stdout
