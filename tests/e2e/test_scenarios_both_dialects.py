"""End to end: the shipped scenarios are dialect-neutral; ``iso-terminal scenario`` plays every one of them
against ``iso-gateway serve`` in the iso87 profile and in the UnionPay ``cup-pos`` profile, and load mode
speaks cup-pos to it. The gateway runs as its own process (tests/harness.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import GatewayProcess

from gateway.protocol.dialect import IMPLEMENTED_DIALECTS

BIN = Path(sys.executable).parent
SCENARIOS = sorted((Path(__file__).resolve().parents[2] / "terminal_emulator" / "scenarios").glob("*.yaml"))
PROFILES = [
    "iso87-binary",
    pytest.param("cup-pos", marks=pytest.mark.skipif("cup" not in IMPLEMENTED_DIALECTS,
                                                     reason="the gateway's cup dialect is not registered yet")),
]
CARDS = ("4761739001010119", "6217001234567890122")


@pytest.fixture(params=PROFILES)
def gateway(request: pytest.FixtureRequest, tmp_path: Path, mqtt_broker_url: str) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path, mqtt_broker_url, profile=request.param)
    try:
        process.start()
        yield process
    finally:
        if process.process is not None and process.process.poll() is None:
            process.signal(signal.SIGTERM)
        process.kill()


def iso_terminal(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "iso-terminal"), "--port", str(gateway.port), "--profile",
                           gateway.env["GATEWAY_PROFILE"], "--timeout", "10", *args],
                          capture_output=True, text=True, timeout=180, check=False)


def test_every_shipped_scenario_passes_in_the_gateways_profile(gateway: GatewayProcess) -> None:
    assert len(SCENARIOS) >= 9
    result = iso_terminal(gateway, "scenario", *map(str, SCENARIOS))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert f"{len(SCENARIOS)}/{len(SCENARIOS)} scenarios passed" in result.stdout
    assert not any(card in result.stdout for card in CARDS)
    if gateway.env["GATEWAY_PROFILE"] == "cup-pos":
        assert "-> 0220 refund" in result.stdout and "-> 0400 reversal" in result.stdout
        assert "settlement not balanced" in result.stdout and "-> 0320 upload_end" in result.stdout


def test_load_mode_speaks_the_gateways_profile(gateway: GatewayProcess) -> None:
    result = iso_terminal(gateway, "--json", "load", "--duration", "2", "-c", "2", "--pipeline", "4",
                          "--mix", "purchase=70,refund=10,void=10,reversal=10", "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["received"] > 0
    assert summary["errors"] == summary["timeouts"] == 0
    assert summary["response_codes"] == {"00": summary["received"]}
    assert set(summary["sent_by_kind"]) == {"purchase", "refund", "void", "reversal"}


@pytest.mark.skipif("cup" not in IMPLEMENTED_DIALECTS, reason="the gateway's cup dialect is not registered yet")
def test_the_gateway_accepts_the_emulators_batch_upload(tmp_path: Path, mqtt_broker_url: str) -> None:
    process = GatewayProcess(tmp_path, mqtt_broker_url, profile="cup-pos")
    try:
        process.start()
        journal = ["--journal", str(tmp_path / "pos.json")]
        assert iso_terminal(process, *journal, "sale", "--amount", "10.00").returncode == 0
        settle = iso_terminal(process, *journal, "--json", "settle", "--debits-amount", "1.00")
    finally:
        process.signal(signal.SIGTERM)
    answers = [json.loads(line) for line in settle.stdout.splitlines()]
    assert [a["request"]["mti"] for a in answers] == ["0500", "0320", "0320"]
    assert answers[0]["fields"]["48"][30] == "2"
    assert [a["fields"]["39"] for a in answers[1:]] == ["00", "00"]
