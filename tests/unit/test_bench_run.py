"""benchmarks/run.py's per-thread CPU reading: a thread that spins shows up with the time it spent."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def bench_run() -> ModuleType:
    """benchmarks/run.py (a script directory, not an installed package)."""
    spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_per_thread_cpu_finds_the_thread_that_worked() -> None:
    thread_cpu_seconds = bench_run().thread_cpu_seconds
    ids: list[str] = []

    def spin() -> None:
        ids.append(str(threading.get_native_id()))
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        after.update(thread_cpu_seconds(os.getpid()))  # read while the thread still exists

    after: dict[str, float] = {}
    before = thread_cpu_seconds(os.getpid())
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
    assert str(threading.get_native_id()) in before  # this (main) thread
    spent = after[ids[0]] - before.get(ids[0], 0.0)
    assert 0.2 <= spent <= 1.0
