"""Issue 21, findings 5 and 6: the PAN key and the ledger files, and identities at the edges.

- No ``GATEWAY_PAN_HMAC_KEY``: a random key made on first start, kept in a 0600 file beside the
  ledger, the same one after a restart; ledger files created 0600. The published development key is
  refused (exit 2, one ``gateway.start_failed`` line) unless ``GATEWAY_DEV_MODE=1``.
- mTLS: a client certificate is bound to the terminal id of its subject CN.
- The embedded broker does not start on a non-loopback address without credentials.
- Stand-in approval has a ceiling by default (999,999,999,999 is declined 61, ``over_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from brokers import free_port
from harness import GatewayProcess, IsoClient
from hostile import fresh_sale, json_lines, make_pki, start_failure

DEV_KEY = "dev-only-pan-hmac-key-change-me"  # the development key the code and docs publish
LEDGER_FILES = ("ledger.db", "ledger.db-wal", "ledger.db-shm")


@contextlib.contextmanager
def usual_umask() -> Iterator[None]:
    """The gateway started under umask 022 (what most hosts have), so that 0600 is the gateway's doing."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


def start_failed_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "gateway.start_failed" in line]


# =========================================================================== 5. the PAN key and the ledger files


async def test_without_a_configured_pan_key_the_gateway_keeps_a_random_one_in_a_0600_file_beside_the_ledger(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    proc = gateway(start=False, unset=("GATEWAY_PAN_HMAC_KEY",), folder=folder)
    assert "GATEWAY_PAN_HMAC_KEY" not in proc.env
    with usual_umask():
        proc.start()
    pos = await IsoClient.connect(proc.port)
    sale = await pos.sale(5_000)
    assert sale[39] == "00"
    await pos.close()
    ledger_modes = {name: mode(folder / name) for name in LEDGER_FILES if (folder / name).exists()}  # running
    created = {path.name: mode(path) for path in folder.iterdir() if path != proc.log_path}
    keys = {name: m for name, m in created.items() if name not in LEDGER_FILES and m == "0o600"}
    seen = {
        "ledger files (while running)": ledger_modes,
        "a 0600 key file beside the ledger": len(keys) == 1,
    }
    expected = {
        "ledger files (while running)": dict.fromkeys(ledger_modes, "0o600"),
        "a 0600 key file beside the ledger": True,
    }
    assert seen == expected, f"files in the ledger's folder: {created}"
    (key_name,) = keys
    key = (folder / key_name).read_bytes()
    assert len(key.strip()) >= 32, f"the key file {key_name} holds {len(key.strip())} bytes"
    assert DEV_KEY.encode() not in key
    assert proc.signal(signal.SIGTERM) == 0

    with usual_umask():
        proc.start()  # the same key: a refund of the sale made before the restart finds the same card
    pos = await IsoClient.connect(proc.port)
    try:
        refund = await pos.refund(sale[37], 2_000)
    finally:
        await pos.close()
    assert refund[39] == "00", f"the refund after a restart was answered {refund[39]}: another key?"
    assert (folder / key_name).read_bytes() == key
    assert proc.signal(signal.SIGTERM) == 0


async def test_the_published_development_key_is_refused_unless_dev_mode_is_set(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    refused = gateway({"GATEWAY_PAN_HMAC_KEY": DEV_KEY}, start=False, folder=tmp_path / "refused")
    code, output = start_failure(refused)
    assert code == 2, f"with the development key the gateway {'started' if code is None else f'exited {code}'}"
    assert len(start_failed_lines(output)) == 1, output[-2000:]

    allowed = gateway({"GATEWAY_PAN_HMAC_KEY": DEV_KEY, "GATEWAY_DEV_MODE": "1"}, folder=tmp_path / "dev")
    assert (await fresh_sale(allowed.port)).code == "00"
    assert allowed.signal(signal.SIGTERM) == 0


# =========================================================================== 6. identities at the edges


async def test_a_client_certificate_speaks_only_for_the_terminal_it_names(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki", clients=("TERM0001",))
    proc = gateway({
        "GATEWAY_TLS__CERT": str(pki.server_cert),
        "GATEWAY_TLS__KEY": str(pki.server_key),
        "GATEWAY_TLS__CLIENT_CA": str(pki.ca),
    })  # fmt: skip
    own = await fresh_sale(proc.port, ssl_context=pki.client_context("TERM0001"), terminal="TERM0001")
    assert own.code == "00", own
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", proc.port, ssl=pki.client_context("TERM0001"), server_hostname="localhost"
    )
    pos = IsoClient(reader, writer, "iso87-binary")
    try:
        mine = await pos.sale(1_000, terminal="TERM0001")
        other = await pos.sale(1_000, terminal="TERM0002")
    finally:
        await pos.close()
    assert mine[39] == "00"
    assert other[39] == "58", f"a certificate for TERM0001 made a sale for TERM0002, answered {other[39]}"


async def test_the_embedded_broker_refuses_to_listen_on_all_interfaces_without_credentials(
    gateway: Callable[..., GatewayProcess],
) -> None:
    # the gateway is killed the moment it listens (today), so the anonymous broker is up for an instant
    proc = gateway(
        {"GATEWAY_MQTT_URL": "embedded", "GATEWAY_MQTT__EMBEDDED_LISTEN": f"0.0.0.0:{free_port()}"}, start=False
    )
    code, output = start_failure(proc)
    assert code == 2, f"an anonymous broker on 0.0.0.0: the gateway {'started' if code is None else f'exited {code}'}"
    failed = start_failed_lines(output)
    assert len(failed) == 1, output[-2000:]
    assert "GATEWAY_MQTT__EMBEDDED_LISTEN" in failed[0] or "embedded_listen" in failed[0], failed[0]


async def test_stand_in_declines_a_sale_of_999_999_999_999_by_default(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    pos = await IsoClient.connect(proc.port)
    try:
        answer = await pos.sale(999_999_999_999)
    finally:
        await pos.close()
    assert answer[39] == "61", f"a sale of 9,999,999,999.99 with default settings was answered {answer[39]}"
    reasons = [line.get("reason") for line in json_lines(proc)
               if line.get("event") == "message.processed" and line.get("rrn") == answer[37]]  # fmt: skip
    assert reasons == ["over_limit"], reasons


# =========================================================================== beyond the issue: settings


def test_a_list_setting_given_as_plain_text_is_refused_with_exit_2_and_no_traceback(
    gateway: Callable[..., GatewayProcess],
) -> None:
    # docs/operations.md: invalid settings exit 2 with a message; today a SettingsError escapes (exit 1)
    proc = gateway({"GATEWAY_ALLOWED_TERMINALS": "TERM0001"}, start=False)
    code, output = start_failure(proc)
    assert code == 2 and "Traceback" not in output, f"exit {code}: {output[-1500:]}"
    assert "GATEWAY_ALLOWED_TERMINALS" in output or "allowed_terminals" in output, output[-1500:]
