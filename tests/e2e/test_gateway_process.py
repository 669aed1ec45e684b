"""The gateway as an operator runs it: a process, signals, kill -9 and restart."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import CARD, GatewayProcess, IsoClient


@pytest.fixture
def gateway_process(tmp_path: Path, mqtt_broker_url: str) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path, mqtt_broker_url)
    yield proc
    proc.kill()


async def test_a_sale_approved_just_before_kill_9_is_found_after_restart(gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    pos = await IsoClient.connect(gateway_process.port)
    fields = {3: "000000", **pos.base(10_000)}
    sale = (await pos.send("0200", fields))[1]
    assert sale[39] == "00"
    gateway_process.signal(signal.SIGKILL)
    await pos.close()

    gateway_process.start()
    pos = await IsoClient.connect(gateway_process.port)
    again = (await pos.send("0201", fields))[1]
    assert (again[37], again[38], again[39]) == (sale[37], sale[38], "00")
    assert (await pos.refund(sale[37], 4_000))[39] == "00"
    await pos.close()
    assert gateway_process.signal(signal.SIGTERM) == 0


async def test_sigterm_finishes_cleanly_with_exit_code_0(gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    pos = await IsoClient.connect(gateway_process.port)
    assert (await pos.sale(100))[39] == "00"
    await pos.close()
    assert gateway_process.signal(signal.SIGTERM) == 0
    logs = gateway_process.logs()
    assert "gateway.started" in logs and "gateway.stopped" in logs


async def test_no_full_pan_reaches_the_logs_or_the_ledger_files(gateway_process: GatewayProcess) -> None:
    gateway_process.start()
    pos = await IsoClient.connect(gateway_process.port)
    sale = await pos.sale(2_000)
    await pos.refund(sale[37], 500)
    await pos.refund(sale[37], 5_000)
    await pos.void(sale[37], 2_000)
    fields = {3: "000000", 35: f"{CARD}=28122011758928889", **pos.base(300, pan=None)}
    assert (await pos.send("0200", fields))[1][39] == "00"
    await pos.close()
    assert gateway_process.signal(signal.SIGTERM) == 0
    assert CARD not in gateway_process.logs()
    assert "476173******0119" in gateway_process.logs()
    for path in gateway_process.db.parent.glob("ledger.db*"):
        data = path.read_bytes()
        assert CARD.encode() not in data, path.name
        assert b"28122011758928889" not in data


async def test_the_ascii_profile_answers_0810_0110_and_0210(tmp_path: Path, mqtt_broker_url: str) -> None:
    proc = GatewayProcess(tmp_path, mqtt_broker_url, profile="iso87-ascii")
    try:
        proc.start()
        pos = await IsoClient.connect(proc.port, profile="iso87-ascii")
        mti, echo = await pos.send("0800", {7: "1122103015", 11: "000001", 70: "301"})
        assert (mti, echo[39], echo[70]) == ("0810", "00", "301")
        preauth = await pos.preauth(1_234)
        assert preauth[39] == "00" and re.fullmatch(r"\d{12}", preauth[37]) and len(preauth[38]) == 6
        sale = await pos.sale(1_234)
        assert sale[39] == "00" and sale[37] != preauth[37]
        await pos.close()
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.kill()



async def test_rrns_continue_across_restarts_and_a_failed_start(gateway_process: GatewayProcess) -> None:
    """No block of RRNs is lost per start (issue 22): a clean stop, or a start that fails, gives the
    unused rest of the block back to the ledger."""
    rrns = []
    for _ in range(2):
        gateway_process.start()
        pos = await IsoClient.connect(gateway_process.port)
        rrns.append((await pos.sale(100))[37])
        await pos.close()
        assert gateway_process.signal(signal.SIGTERM) == 0
        with socket.socket() as taken:  # a start that fails once the ledger is open: its metrics port is taken
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            failed = gateway_process.run_to_exit({"GATEWAY_METRICS_LISTEN": f"127.0.0.1:{taken.getsockname()[1]}"})
        assert failed.returncode == 2, failed.stdout
    assert [int(rrn) for rrn in rrns] == [1, 2]
