"""End to end: the shipped scenarios and load mode through ``iso-terminal`` against ``iso-gateway serve``.

The gateway runs as its own process, as an operator starts it: SQLite ledger in a temporary
directory, the test session's MQTT broker (Mosquitto when installed), a free port.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "terminal_emulator" / "scenarios").glob("*.yaml"))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gateway.cli") is None,
    reason="the gateway's command line (gateway/cli.py) is not built yet",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)  # polling a port that is not open yet; bounded by the deadline above
    raise AssertionError(f"the gateway did not listen within {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def gateway_port(tmp_path_factory: pytest.TempPathFactory, mqtt_broker_url: str) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("gateway")
    port = _free_port()
    env = {
        **os.environ,
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_LEDGER_URL": f"sqlite:///{workdir / 'gateway.db'}",
        "GATEWAY_MQTT_URL": mqtt_broker_url,
        "GATEWAY_MQTT_TOPIC_PREFIX": f"e2e/{workdir.name}",
        "GATEWAY_INSTANCE_ID": "e2e-scenarios",
    }
    log = workdir / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(BIN / "iso-gateway"), "serve"], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, cwd=workdir)
    try:
        _wait_listening(port, process, log)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def iso_terminal(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "iso-terminal"), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_every_shipped_scenario_passes_against_the_gateway(gateway_port: int) -> None:
    assert len(SCENARIOS) >= 8
    result = iso_terminal("--port", str(gateway_port), "--timeout", "10", "scenario", *map(str, SCENARIOS))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert f"{len(SCENARIOS)}/{len(SCENARIOS)} scenarios passed" in result.stdout
    assert "4761739001010119" not in result.stdout


def test_load_reports_throughput_and_percentiles_against_the_gateway(gateway_port: int) -> None:
    result = iso_terminal("--port", str(gateway_port), "--json", "load", "--duration", "2", "-c", "2",
                          "--pipeline", "2", "--mix", "purchase=70,refund=10,void=10,reversal=10", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["received"] > 0
    assert summary["tps"] > 0
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["errors"] == 0
    assert summary["timeouts"] == 0
    assert summary["response_codes"].get("00", 0) == summary["received"]
