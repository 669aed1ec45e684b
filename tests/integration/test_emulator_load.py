"""Load mode against the bare codec server and small hosts, over real TCP."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from terminal_emulator import IsoMessage, load_profile
from terminal_emulator.load import LoadConfig, run_load
from terminal_emulator.testing import StubHost, approve

PROFILE = load_profile("iso87-binary")
ISO_TERMINAL = str(Path(sys.executable).parent / "iso-terminal")
REPO = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"tps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "response_codes", "errors", "timeouts", "sent",
                "received", "duration_s"}


@pytest.fixture
async def bare_port() -> AsyncIterator[int]:
    """The bare codec server (benchmarks/bare_server.py) as its own process on a free port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bare_server", "--port", "0", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
        assert line.startswith("bare codec server on 127.0.0.1:"), line
        yield int(line.split()[4].rsplit(":", 1)[1])
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def test_a_counted_run_gets_every_answer_back_from_the_bare_server(bare_port: int) -> None:
    config = LoadConfig(port=bare_port, connections=3, pipeline=8, duration=None, count=3000,
                        mix={"purchase": 70, "refund": 10, "void": 10, "reversal": 10}, seed=7)
    stats = await run_load(config, PROFILE)
    summary = stats.summary(config)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["sent"] == summary["received"] == 3000
    assert summary["response_codes"] == {"00": 3000}
    assert summary["timeouts"] == summary["errors"] == 0
    assert set(summary["sent_by_kind"]) == {"purchase", "refund", "void", "reversal"}
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["tps"] > 0


async def test_response_codes_are_counted_one_by_one() -> None:
    ref: list[StubHost] = []

    def handler(message: IsoMessage) -> IsoMessage | None:
        code = "00" if int(message.fields[11]) % 4 else "05"
        return approve(message, rrn="000000000001", code=code)

    async with StubHost(PROFILE, handler) as host:
        ref.append(host)
        config = LoadConfig(port=host.port, connections=2, pipeline=2, duration=None, count=400)
        stats = await run_load(config, PROFILE)
    declined = sum(1 for m in host.messages if int(m.fields[11]) % 4 == 0)
    assert len(host.received) == 400
    assert 90 <= declined <= 110  # each connection counts its STANs from 1
    assert stats.response_codes == {"00": 400 - declined, "05": declined}


async def test_unanswered_requests_are_counted_as_timeouts() -> None:
    async with StubHost(PROFILE, lambda m: None) as host:
        config = LoadConfig(port=host.port, connections=2, pipeline=3, duration=None, count=6,
                            response_timeout=0.3)
        stats = await run_load(config, PROFILE)
    assert (stats.sent, stats.received, stats.timeouts) == (6, 0, 6)


async def test_a_target_rate_paces_the_requests() -> None:
    async with StubHost(PROFILE) as host:
        config = LoadConfig(port=host.port, connections=2, pipeline=4, duration=1.0, rate=200)
        stats = await run_load(config, PROFILE)
    assert 100 <= stats.received <= 210  # about 200 in 1 s, never a burst beyond the rate


async def test_voids_and_refunds_refer_to_purchases_the_host_approved() -> None:
    async with StubHost(PROFILE) as host:
        config = LoadConfig(port=host.port, connections=1, pipeline=1, duration=None, count=60,
                            mix={"purchase": 1, "void": 1, "refund": 1}, seed=1)
        await run_load(config, PROFILE)
    purchase_rrns: set[str] = set()
    for index, message in enumerate(host.messages, 1):  # the stub answers the n-th request with RRN n
        if message.fields[3] == "000000":
            purchase_rrns.add(f"{index:012d}")
        else:
            assert message.fields[37] in purchase_rrns
    assert any(m.fields[3] == "020000" for m in host.messages)
    assert any(m.fields[3] == "200000" for m in host.messages)


async def test_the_load_command_prints_a_json_summary(bare_port: int) -> None:
    process = await asyncio.create_subprocess_exec(
        ISO_TERMINAL, "--port", str(bare_port), "--json", "load", "--count", "500", "-c", "2", "--pipeline", "4",
        "--quiet", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    summary = json.loads(out)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["received"] == 500
