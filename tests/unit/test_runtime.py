"""The interpreter settings the gateway runs with (gateway.app.tune_runtime)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from gateway.adapters.ledger import SWITCH_INTERVAL_S
from gateway.app import tune_runtime


@pytest.fixture
def restored() -> Iterator[None]:
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_the_commit_thread_gets_the_gil_within_a_short_switch_interval(restored: None) -> None:
    sys.setswitchinterval(0.005)
    tune_runtime()
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
    assert SWITCH_INTERVAL_S <= 0.0005  # well below Python's 5 ms, or fsyncs start after the answers


def test_long_lived_objects_leave_the_collectors_sight(restored: None) -> None:
    tune_runtime()
    assert gc.get_threshold()[0] == 10_000
    assert gc.get_freeze_count() > 0
