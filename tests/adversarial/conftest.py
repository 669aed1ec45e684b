"""Fixtures of the adversarial tests: ``iso-gateway serve`` processes on loopback, killed at the end."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import GatewayProcess


@pytest.fixture
def gateway(tmp_path: Path, mqtt_broker_url: str) -> Iterator[Callable[..., GatewayProcess]]:
    """Makes this test's gateway process (started unless ``start=False``) on the session's broker, its
    ledger and log in ``folder`` (default: the test's tmp_path); ``unset`` names variables
    GatewayProcess sets that this gateway must not have. Kills every one at the end."""
    made: list[GatewayProcess] = []

    def make(
        env: dict[str, str] | None = None,
        *,
        start: bool = True,
        unset: tuple[str, ...] = (),
        folder: Path | None = None,
    ) -> GatewayProcess:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        proc = GatewayProcess(folder or tmp_path, mqtt_broker_url, env=env)
        for name in unset:
            proc.env.pop(name, None)
        made.append(proc)
        if start:
            proc.start()
        return proc

    yield make
    for proc in made:
        proc.kill()


@pytest.fixture
def full_run() -> bool:
    """``ADVERSARIAL_FULL=1``: the long variants (a 30 s flood, 3,000 hostile connections)."""
    return os.environ.get("ADVERSARIAL_FULL") == "1"
