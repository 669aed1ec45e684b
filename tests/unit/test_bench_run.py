"""benchmarks/run.py's per-thread CPU reading: a thread that spins shows up with the time it spent."""

from __future__ import annotations

import os
import threading
import time

from benchmarks.run import thread_cpu_seconds


def test_per_thread_cpu_finds_the_thread_that_worked() -> None:
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
