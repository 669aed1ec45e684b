"""``iso-gateway batches`` prints every value whole at any terminal width, and one line per batch into
a pipe (issue 22: the table cut its columns, ``cur`` became ``cu`` and totals ended in ``…``)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from harness import GatewayProcess, IsoClient

ISO_GATEWAY = str(Path(sys.executable).parent / "iso-gateway")
BIG = 9_999_999_999  # 99,999,999.99: a total as wide as a real merchant's


@pytest.fixture(scope="module")
def ledger_env(tmp_path_factory: pytest.TempPathFactory, mqtt_broker_url: str) -> dict[str, str]:
    """A ledger with a batch closed on a mismatch and an open one with a big sale."""
    import asyncio

    # a big sale, above the default stand-in ceiling: raised for this ledger
    ceiling = {"GATEWAY_STANDIN__MAX_AMOUNT": str(10 * BIG)}
    proc = GatewayProcess(tmp_path_factory.mktemp("batches"), mqtt_broker_url, env=ceiling)

    async def traffic() -> None:
        pos = await IsoClient.connect(proc.port)
        assert (await pos.sale(BIG))[39] == "00"
        assert (await pos.settle((0, 0), (1, 1)))[39] == "95"  # wrong totals: closed (mismatch)
        assert (await pos.sale(BIG))[39] == "00"
        await pos.close()

    try:
        proc.start()
        asyncio.run(traffic())
        assert proc.signal(signal.SIGTERM) == 0
    finally:
        proc.kill()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k not in ("COLUMNS", "LINES")}
    return {**env, "GATEWAY_LEDGER_URL": f"sqlite:///{proc.db}"}


def in_terminal(env: dict[str, str], columns: int) -> str:
    """``iso-gateway batches`` on a pseudo-terminal ``columns`` wide, as a person runs it."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([ISO_GATEWAY, "batches"], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text)


def assert_every_value_whole(text: str) -> None:
    for value in ("MERCHANT0000001", "TERM0001", "000001", "000002", "closed (mismatch)", "open",
                  f"1 / {BIG}", "0 / 0", "840"):  # fmt: skip
        assert value in text, value
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text)) == 3  # two opened, one closed
    assert "…" not in text


@pytest.mark.parametrize("columns", [60, 80, 140])
def test_batches_fit_the_terminal_and_print_every_value_whole(ledger_env: dict[str, str], columns: int) -> None:
    text = in_terminal(ledger_env, columns)
    assert_every_value_whole(text)
    for line in text.splitlines():
        assert len(line) <= columns, line


def test_batches_into_a_pipe_are_one_line_per_batch(ledger_env: dict[str, str]) -> None:
    result = subprocess.run([ISO_GATEWAY, "batches"], env=ledger_env, capture_output=True, text=True, check=True)
    assert_every_value_whole(result.stdout)
    rows = [line for line in result.stdout.splitlines() if line.startswith("MERCHANT0000001")]
    assert len(rows) == 2
    assert all(re.search(r"\b840$", row) for row in rows)
