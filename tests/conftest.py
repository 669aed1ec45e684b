"""Shared fixtures. Broker fixtures: a real MQTT broker per design section 8 (see tests/brokers.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import MosquittoBroker, ThreadedEmbeddedBroker, missing_service, mosquitto_binary


@pytest.fixture(scope="session")
def mqtt_broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a broker shared by the session: a private Mosquitto on a free port, else the embedded one.

    Tests share it, so each must use its own topics (see ``topic_prefix``).
    """
    binary = mosquitto_binary()
    if binary is not None:
        with MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), binary=binary) as broker:
            yield broker.url
        return
    try:
        embedded = ThreadedEmbeddedBroker()
        embedded.start()
    except Exception as exc:
        missing_service(f"no MQTT broker: mosquitto is not installed and the embedded one failed: {exc}")
        raise
    try:
        yield embedded.url
    finally:
        embedded.close()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private, running Mosquitto this test may stop, kill and restart (same port, persistence on)."""
    binary = mosquitto_binary()
    if binary is None:
        missing_service("mosquitto is not installed")
        raise AssertionError("unreachable")
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = MosquittoBroker(workdir, binary=binary)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"test/{uuid.uuid4().hex[:12]}"
