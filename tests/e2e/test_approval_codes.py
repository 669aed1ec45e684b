"""Approval codes (DE38) are keyed by the installation's secret (issue 22): two gateways that hand
out the same RRN answer different codes, so a code cannot be predicted from an RRN or looked up in
another installation's receipts; one installation keeps giving the same code for the same RRN."""

from __future__ import annotations

import signal
from pathlib import Path

from harness import GatewayProcess, IsoClient


async def first_sale(tmp_path: Path, key: str, mqtt_url: str) -> tuple[str, str]:
    proc = GatewayProcess(tmp_path, mqtt_url)
    proc.env["GATEWAY_PAN_HMAC_KEY"] = key
    try:
        proc.start()
        pos = await IsoClient.connect(proc.port)
        sale = await pos.sale(100)
        await pos.close()
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.kill()
    return sale[37], sale[38]


async def test_two_installations_give_the_same_rrn_different_approval_codes(
    tmp_path: Path, mqtt_broker_url: str
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    rrn_a, code_a = await first_sale(tmp_path / "a", "key-of-installation-a", mqtt_broker_url)
    rrn_b, code_b = await first_sale(tmp_path / "b", "key-of-installation-b", mqtt_broker_url)
    rrn_c, code_c = await first_sale(tmp_path / "c", "key-of-installation-a", mqtt_broker_url)
    assert rrn_a == rrn_b == rrn_c == "000000000001"
    assert code_a != code_b
    assert code_a == code_c  # the same key and RRN: the same code (receipts and replays stay valid)
