"""Issue 24 over TCP: ``iso-gateway serve`` between a terminal and the acquirer host simulator.

The terminal is the tests' IsoClient (pyiso8583's own specs, not the gateway's codec); the host is
``iso-host`` in this process (``HostSimulator``: it records what it received and answers by rules);
the gateway is its own process, with a SQLite ledger and the session's MQTT broker.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import async_wait_until
from harness import GatewayProcess, IsoClient

from terminal_emulator.host import HostSimulator, Rule, Then, When

BIN = Path(sys.executable).parent


@pytest.fixture
def gateway(tmp_path: Path, mqtt_broker_url: str) -> Iterator[Callable[..., GatewayProcess]]:
    made: list[GatewayProcess] = []

    def make(host_port: int, **env: str) -> GatewayProcess:
        settings = {
            "GATEWAY_UPSTREAM__URL": f"tcp://127.0.0.1:{host_port}",
            "GATEWAY_UPSTREAM__TIMEOUT_S": "1",
            "GATEWAY_UPSTREAM__SAF_RETRY_S": "0.3",
            "GATEWAY_UPSTREAM__BACKOFF_INITIAL_S": "0.1",
            "GATEWAY_UPSTREAM__BACKOFF_MAX_S": "0.5",
            **env,
        }
        proc = GatewayProcess(tmp_path, mqtt_broker_url, env=settings)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


async def started(proc: GatewayProcess) -> GatewayProcess:
    """Start the gateway off the event loop: the host simulator in this loop must answer its sign-on."""
    await asyncio.to_thread(proc.start)
    return proc


def saf_status(proc: GatewayProcess, *args: str) -> list[dict[str, object]]:
    done = subprocess.run(
        [str(BIN / "iso-gateway"), "saf", "status", "--json", *args], env=proc.env, capture_output=True, check=True
    )
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    await async_wait_until(check, timeout, what, interval=0.05)


async def test_the_host_approves_and_declines_and_its_codes_are_the_terminals_answer(
    gateway: Callable[..., GatewayProcess],
) -> None:
    rules = [Rule(When(amount_over=100_000), Then(code="51")), Rule(When(), Then(approval_code="HOST42"))]
    async with HostSimulator(rules=rules) as host:
        proc = await started(gateway(host.port))
        pos = await IsoClient.connect(proc.port)
        try:
            approved = await pos.sale(1_000)
            declined = await pos.sale(200_000)
        finally:
            await pos.close()
        sales = [r for r in host.received if r.mti == "0200"]
    assert (approved[39], approved[38]) == ("00", "HOST42")
    assert declined[39] == "51" and 38 not in declined
    # the host got the gateway's RRN (the terminal's answer has the same) and the card
    assert [r.rrn for r in sales] == [approved[37], declined[37]]
    assert {r.pan for r in sales} == {"476173******0119"}
    assert all(r.message is not None and r.message.fields.get(2) for r in sales)  # type: ignore[union-attr]


async def test_refunds_are_checked_locally_first_and_forty_at_once_approve_exactly_ten(
    gateway: Callable[..., GatewayProcess],
) -> None:
    async with HostSimulator(rules=[Rule(When(processing_code="20"), Then(delay_ms=50))]) as host:
        proc = await started(gateway(host.port))
        pos = await IsoClient.connect(proc.port)
        try:
            sale = await pos.sale(10_000)
            too_much = await pos.refund(sale[37], 10_001)
            clients = [await IsoClient.connect(proc.port) for _ in range(40)]
            results = await asyncio.gather(*(client.refund(sale[37], 1_000) for client in clients))
            for client in clients:
                await client.close()
        finally:
            await pos.close()
        refunds_at_host = [r for r in host.received if r.processing_code and r.processing_code.startswith("20")]
    assert too_much[39] == "64"
    assert sorted(r[39] for r in results) == ["00"] * 10 + ["64"] * 30
    assert len(refunds_at_host) == 10  # refused ones never reached the host
    assert all(r.amount == 1_000 for r in refunds_at_host)


async def test_a_dropped_answer_gives_91_and_the_host_gets_0420_then_0421_until_it_answers(
    gateway: Callable[..., GatewayProcess],
) -> None:
    rules = [
        Rule(When(mti="0200", amount=(4_321,)), Then(drop=True)),
        Rule(When(mti=("0420", "0421")), Then(drop=True, times=2)),
    ]
    async with HostSimulator(rules=rules) as host:
        proc = await started(gateway(host.port))
        pos = await IsoClient.connect(proc.port)
        try:
            answer = await pos.sale(4_321)
        finally:
            await pos.close()
        await _until(lambda: sum(r.mti in ("0420", "0421") for r in host.received) >= 3, "three reversals")
        await _until(lambda: saf_status(proc) == [], "the queue to empty")
        reversals = [r for r in host.received if r.mti in ("0420", "0421")]
        entries = saf_status(proc, "--all")
    sale = next(r for r in host.received if r.mti == "0200")
    assert answer[39] == "91"
    assert [r.mti for r in reversals] == ["0420", "0421", "0421"]
    assert {r.stan for r in reversals} == {sale.stan}  # the same STAN every time
    assert all(r.original and r.original.startswith("0200" + str(sale.stan)) for r in reversals)
    assert all(r.original_found for r in reversals)
    assert [(e["action"], e["state"], e["attempts"]) for e in entries] == [("reverse", "acknowledged", 3)]


async def test_the_host_down_gives_91_at_once_or_stand_in_approvals_sent_later_as_advices(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    host = HostSimulator()
    await host.start()
    port = host.port
    await host.stop()  # nobody listens there now
    decline = await started(gateway(port))
    pos = await IsoClient.connect(decline.port)
    try:
        began = asyncio.get_running_loop().time()
        refused = await pos.sale(1_000)
        took = asyncio.get_running_loop().time() - began
    finally:
        await pos.close()
    decline.signal(signal.SIGTERM)
    assert refused[39] == "91" and took < 0.5

    standin = GatewayProcess(tmp_path / "standin", decline.env["GATEWAY_MQTT_URL"], env={
        **{k: v for k, v in decline.env.items() if k.startswith("GATEWAY_UPSTREAM__")},
        "GATEWAY_UPSTREAM__WHEN_DOWN": "standin",
    })  # fmt: skip
    (tmp_path / "standin").mkdir()
    await started(standin)
    try:
        pos = await IsoClient.connect(standin.port)
        try:
            approved = await pos.sale(2_000)
        finally:
            await pos.close()
        assert approved[39] == "00" and approved[38]
        assert [(e["action"], e["state"]) for e in saf_status(standin)] == [("advise", "queued")]
        back = HostSimulator(port=port)
        async with back:
            await _until(lambda: any(r.mti in ("0220", "0221") for r in back.received), "the advice", timeout=15)
            advice = next(r for r in back.received if r.mti in ("0220", "0221"))
            await _until(lambda: saf_status(standin) == [], "the queue to empty")
    finally:
        standin.kill()
    assert (advice.rrn, advice.amount) == (approved[37], 2_000)
    assert advice.message is not None and advice.message.fields.get(38) == approved[38]
    assert advice.pan == "476173******0119"  # the same process: the card is still in memory


async def test_queued_reversals_survive_kill_9_and_arrive_in_order_once_the_host_is_back(
    gateway: Callable[..., GatewayProcess],
) -> None:
    amounts = [1_101, 1_102, 1_103]
    rules = [Rule(When(mti=("0200", "0420", "0421")), Then(drop=True))]  # a host that answers nothing
    async with HostSimulator(rules=rules) as host:
        proc = await started(gateway(host.port))
        pos = await IsoClient.connect(proc.port)
        try:
            answers = [await pos.sale(amount) for amount in amounts]
        finally:
            await pos.close()
        assert [a[39] for a in answers] == ["91"] * 3
        await _until(lambda: any(r.mti in ("0420", "0421") for r in host.received), "a reversal attempt")
        proc.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        proc.process.wait(10)  # type: ignore[union-attr]
        queued = saf_status(proc)
        host.rules = []  # the host answers everything from now on
        before = len(host.received)
        await started(proc)  # the killed process's queue lease lapses first (10 s)
        await _until(lambda: saf_status(proc) == [], "the queue to empty", timeout=30)
        await asyncio.sleep(1.0)  # nothing is sent again once acknowledged
        after = [r for r in host.received[before:] if r.mti in ("0420", "0421")]
        sales = {r.stan: r.amount for r in host.received if r.mti == "0200"}
    assert [e["state"] for e in queued] == ["queued"] * 3
    assert [sales[r.stan] for r in after] == amounts  # in the order they were queued, each once
    assert all(r.response_code == "00" for r in after)


async def test_the_gateway_forwards_a_sale_to_an_independent_host_implementation(
    gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """``iso8583sim serve`` (another ISO 8583 implementation) as the acquirer host: sign-on and a sale."""
    port = _free_port()
    host = subprocess.Popen(  # noqa: ASYNC220 - starting it does not wait for it
        [str(BIN / "iso8583sim"), "serve", "--port", str(port), "--format", "ascii-binary", "--header", "2b"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={"NO_COLOR": "1", "COLUMNS": "200", "PATH": str(BIN)},
    )  # fmt: skip
    try:
        await _until(lambda: _listening(port), "iso8583sim to listen")
        proc = await started(gateway(port))
        pos = await IsoClient.connect(proc.port)
        try:
            approved = await pos.sale(1_234)
        finally:
            await pos.close()
        log = proc.log_path.read_text()
    finally:
        host.terminate()
        host.wait(10)
    assert approved[39] == "00" and approved.get(38)
    assert '"event":"upstream.signed_on"' in log


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
