"""``GATEWAY_MQTT_URL=auto`` (the default): a broker already answering MQTT on the embedded broker's
address is used, else the embedded broker starts there; the log says which, and the README's
``mosquitto_sub -t 'pos/corrections/#' -v`` sees the events in both cases (issue 22)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokers import MosquittoBroker, free_port, missing_service, mosquitto_binary, wait_until
from harness import GatewayProcess, IsoClient


@pytest.fixture
def mosquitto_sub() -> str:
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        missing_service("mosquitto_sub is not installed")
        raise AssertionError("unreachable")
    return binary


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A gateway process with the defaults a newcomer has: auto, and the README's topic prefix."""
    proc = GatewayProcess(tmp_path, "auto")
    del proc.env["GATEWAY_MQTT_TOPIC_PREFIX"]
    yield proc
    proc.kill()


def broker_line(proc: GatewayProcess) -> dict[str, str]:
    """The ``mqtt.broker`` line (logged with ``gateway.started``, just after terminals are accepted)."""

    def found() -> list[dict[str, str]]:
        lines = [json.loads(line) for line in proc.logs().splitlines()]
        return [line for line in lines if line["event"] == "mqtt.broker"]

    wait_until(lambda: bool(found()), 10, "the mqtt.broker log line")
    (line,) = found()
    return line


async def refund_seen_by_mosquitto_sub(proc: GatewayProcess, binary: str, port: int) -> str:
    """Sale and refund through the gateway while the README's ``mosquitto_sub`` line listens on ``port``."""
    sub = await asyncio.create_subprocess_exec(
        binary, "-p", str(port), "-t", "pos/corrections/#", "-v", "-C", "1", "-W", "20",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        pos = await IsoClient.connect(proc.port)
        sale = await pos.sale(10_000)
        seen = asyncio.ensure_future(sub.communicate())
        # mosquitto_sub has no "subscribed" signal: refund until the first event reaches it
        for _ in range(40):
            assert (await pos.refund(sale[37], 100))[39] == "00"
            done, _ = await asyncio.wait({seen}, timeout=0.25)
            if done:
                break
        else:
            raise AssertionError("mosquitto_sub saw no event")
        await pos.close()
        out, _ = await seen
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
    return out.decode()


async def test_auto_publishes_to_the_broker_already_answering_on_the_local_port(
    gateway: GatewayProcess, mosquitto: MosquittoBroker, mosquitto_sub: str
) -> None:
    gateway.env["GATEWAY_MQTT__EMBEDDED_LISTEN"] = f"127.0.0.1:{mosquitto.port}"  # Mosquitto holds it
    gateway.start()
    line = broker_line(gateway)
    assert (line["mode"], line["url"]) == ("local", f"mqtt://127.0.0.1:{mosquitto.port}")
    assert f"a broker answers MQTT on 127.0.0.1:{mosquitto.port}" in line["detail"]
    out = await refund_seen_by_mosquitto_sub(gateway, mosquitto_sub, mosquitto.port)
    assert out.startswith("pos/corrections/MERCHANT0000001/TERM0001/refund/approved {")
    assert gateway.signal(signal.SIGTERM) == 0


async def test_auto_starts_the_embedded_broker_where_nothing_listens(
    gateway: GatewayProcess, mosquitto_sub: str
) -> None:
    port = free_port()
    gateway.env["GATEWAY_MQTT__EMBEDDED_LISTEN"] = f"127.0.0.1:{port}"
    gateway.start()
    line = broker_line(gateway)
    assert (line["mode"], line["url"]) == ("embedded", f"mqtt://127.0.0.1:{port}")
    assert "no broker answers" in line["detail"]
    out = await refund_seen_by_mosquitto_sub(gateway, mosquitto_sub, port)
    assert out.startswith("pos/corrections/MERCHANT0000001/TERM0001/refund/approved {")
    assert gateway.signal(signal.SIGTERM) == 0


def test_auto_refuses_to_start_when_the_broker_on_the_port_refuses_the_gateway(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    binary = mosquitto_binary()
    if binary is None:
        missing_service("mosquitto is not installed")
        return
    workdir = tmp_path / "locked"
    workdir.mkdir()
    with MosquittoBroker(workdir, binary=binary, extra_config="allow_anonymous false\n") as locked:
        result = gateway.run_to_exit({"GATEWAY_MQTT__EMBEDDED_LISTEN": f"127.0.0.1:{locked.port}"})
    assert result.returncode == 2
    (line,) = [json.loads(text) for text in result.stdout.splitlines()]
    assert (line["event"], line["setting"]) == ("gateway.start_failed", "GATEWAY_MQTT_URL")
    assert "refused the gateway (connection refused: not authorized)" in line["detail"]
    assert "GATEWAY_MQTT__EMBEDDED_LISTEN" in line["detail"]  # and says what to do
