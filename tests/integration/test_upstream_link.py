"""The upstream link over real TCP against ``iso-host``, the acquirer simulator (in-process): sign-on,
approvals and declines, delays, drops and hang-ups by rules, the host going away and coming back."""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from brokers import async_wait_until, missing_service
from upstream_helpers import TERMINAL, Lines, link_to, purchase, reversal, sample

from gateway.adapters.upstream import UpstreamDown, UpstreamLink, UpstreamTimeout
from gateway.config import UpstreamSettings
from gateway.metrics import Metrics
from gateway.protocol.message import Message
from gateway.protocol.profile import load_profile
from gateway.startup import StartupError
from terminal_emulator.host import HostSimulator, Rule, Then, When

pytestmark = pytest.mark.timeout(30)
ISO_HOST = str(Path(sys.executable).parent / "iso-host")


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    if shutil.which("openssl") is None:
        missing_service("the openssl command is not installed")
    cert, key = tmp_path / "host.crt", tmp_path / "host.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


async def test_the_link_signs_on_then_a_purchase_is_approved_with_the_links_own_stan_and_de7() -> None:
    async with HostSimulator() as host, link_to(f"tcp://127.0.0.1:{host.port}") as link:
        assert await link.wait_up(5)
        exchange = await link.send(purchase(1234, stan="999999"))
    assert exchange.answer.mti == "0210" and exchange.answer.fields[39] == "00" and len(exchange.answer.fields[38]) == 6
    assert exchange.sent.fields[11] != "999999" and len(exchange.sent.fields[7]) == 10
    assert exchange.answer.fields[11] == exchange.sent.fields[11]
    assert exchange.answer.fields[37] == exchange.sent.fields[37]  # the caller's RRN, echoed
    sign_on, sale = host.received
    assert (sign_on.mti, sign_on.message.fields[70], sign_on.response_code) == ("0800", "001", "00")
    assert (sale.mti, sale.stan, sale.terminal_id) == ("0200", exchange.sent.fields[11], TERMINAL)


async def test_the_hosts_declines_come_back_as_answers() -> None:
    rules = [Rule(When(amount_over=100_000), Then(code="51")), Rule(When(pan_prefix=("5555",)), Then(code="05"))]
    async with HostSimulator(rules=rules) as host, link_to(f"tcp://127.0.0.1:{host.port}") as link:
        await link.wait_up(5)
        over = await link.send(purchase(100_001))
        card = await link.send(purchase(500, pan="5555555555554444"))
        fine = await link.send(purchase(500))
    assert [e.answer.fields[39] for e in (over, card, fine)] == ["51", "05", "00"]
    assert 38 not in over.answer.fields


async def test_an_answer_later_than_the_timeout_raises_and_is_then_counted_as_late_and_dropped() -> None:
    lines, metrics = Lines(), Metrics()
    rules = [Rule(When(amount=(777,)), Then(delay_ms=400))]
    async with HostSimulator(rules=rules) as host, link_to(
        f"tcp://127.0.0.1:{host.port}", logger=lines, recorder=metrics
    ) as link:
        await link.wait_up(5)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as caught:
            await link.send(purchase(777), timeout=0.1)
        assert 0.1 <= time.monotonic() - started < 0.4
        assert caught.value.reason == "timeout" and caught.value.sent.fields[4] == "000000000777"
        await lines.wait_for("upstream.late_answer")
        assert (await link.send(purchase(5))).answer.fields[39] == "00"  # the link goes on
    [late] = lines.of("upstream.late_answer")
    assert late["stan"] == caught.value.sent.fields[11] and late["terminal"] == TERMINAL
    assert (late["mti"], late["response_code"]) == ("0210", "00")
    assert sample(metrics, "gateway_upstream_late_answers_total") == 1
    assert sample(metrics, "gateway_upstream_requests_total", outcome="timeout") == 1
    assert sample(metrics, "gateway_upstream_requests_total", outcome="answered") == 1


async def test_a_dropped_answer_raises_timeout_with_the_request_as_stamped_for_its_reversal() -> None:
    async with HostSimulator(rules=[Rule(When(mti=("0200",)), Then(drop=True, times=1))]) as host, link_to(
        f"tcp://127.0.0.1:{host.port}"
    ) as link:
        await link.wait_up(5)
        with pytest.raises(UpstreamTimeout) as caught:
            await link.send(purchase(1000), timeout=0.2)
        sent = caught.value.sent
        answer = (await link.send(reversal(sent, "0420"))).answer
    assert (answer.mti, answer.fields[39]) == ("0430", "00")
    assert host.received[-1].original_found is True  # the host matched it to the sale it never answered


async def test_a_0421_sent_unstamped_keeps_the_stan_it_was_queued_with() -> None:
    async with HostSimulator(rules=[Rule(When(mti=("0420",)), Then(drop=True))]) as host, link_to(
        f"tcp://127.0.0.1:{host.port}"
    ) as link:
        await link.wait_up(5)
        queued = link.stamp(reversal(link.stamp(purchase(1000)), "0420"))
        with pytest.raises(UpstreamTimeout):
            await link.send(queued, stamp=False, timeout=0.2)
        repeat = Message("0421", dict(queued.fields))  # the store-and-forward repeat, as queued
        exchange = await link.send(repeat, stamp=False)
    assert exchange.sent.fields[11] == queued.fields[11] and exchange.sent.fields[7] == queued.fields[7]
    assert (exchange.answer.mti, exchange.answer.fields[11]) == ("0430", queued.fields[11])
    assert [r.stan for r in host.received if r.mti in ("0420", "0421")] == [queued.fields[11]] * 2


async def test_a_host_that_hangs_up_fails_the_request_at_once_and_the_link_reconnects() -> None:
    lines = Lines()
    rules = [Rule(When(amount=(666,)), Then(close=True))]
    async with HostSimulator(rules=rules) as host, link_to(f"tcp://127.0.0.1:{host.port}", logger=lines) as link:
        await link.wait_up(5)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as caught:
            await link.send(purchase(666), timeout=5)
        assert time.monotonic() - started < 1  # not after the 5 s timeout
        assert caught.value.reason == "connection_lost"
        assert await link.wait_up(5)
        assert (await link.send(purchase(1))).answer.fields[39] == "00"
    [down] = lines.of("upstream.down")
    assert down["reason"] == "closed_by_host" and down["conn"] == 0
    assert [r.mti for r in host.received].count("0800") == 2  # signed on again


async def test_the_host_going_away_makes_sends_fail_at_once_until_it_is_back() -> None:
    metrics = Metrics()
    async with HostSimulator() as host, link_to(f"tcp://127.0.0.1:{host.port}", recorder=metrics) as link:
        await link.wait_up(5)
        assert sample(metrics, "gateway_upstream_connections_up") == 1
        await host.stop()
        await async_wait_until(lambda: not link.up, 5, "the link")
        with pytest.raises(UpstreamDown):
            await link.send(purchase(100))
        assert link.status()[0]["state"] in ("connecting", "backoff")
        assert sample(metrics, "gateway_upstream_connections_up") == 0
        await host.start()
        assert await link.wait_up(5)
        assert (await link.send(purchase(100))).answer.fields[39] == "00"
    assert sample(metrics, "gateway_upstream_requests_total", outcome="down") == 1


async def test_status_shows_each_connection_its_state_and_what_is_in_flight() -> None:
    rules = [Rule(When(amount=(321,)), Then(delay_ms=500))]
    async with HostSimulator(rules=rules) as host, link_to(f"tcp://127.0.0.1:{host.port}", connections=2) as link:
        await async_wait_until(lambda: all(s["state"] == "up" for s in link.status()), 5, "the link")
        slow = asyncio.create_task(link.send(purchase(321)))
        await async_wait_until(lambda: sum(s["in_flight"] for s in link.status()) == 1, 5, "the link")
        status = link.status()
        await slow
    assert [s["index"] for s in status] == [0, 1]
    assert all(s["state"] == "up" and s["last_error"] is None and s["since"].endswith("Z") for s in status)


async def test_tls_to_the_host_verified_by_the_configured_ca(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    async with HostSimulator(ssl=server) as host, link_to(f"tls://127.0.0.1:{host.port}", tls_ca=cert) as link:
        assert await link.wait_up(5)
        assert (await link.send(purchase(42))).answer.fields[39] == "00"


async def test_tls_to_a_host_whose_certificate_is_not_trusted_never_comes_up(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    lines = Lines()
    async with HostSimulator(ssl=server) as host, link_to(f"tls://127.0.0.1:{host.port}", logger=lines) as link:
        await lines.wait_for("upstream.down")
        assert not link.up
    assert lines.of("upstream.down")[0]["reason"] == "connect_failed"
    assert "CERTIFICATE_VERIFY_FAILED" in lines.of("upstream.down")[0]["detail"]


def test_the_link_runs_on_uvloop_the_gateways_loop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> str:
        async with HostSimulator() as host, link_to(f"tcp://127.0.0.1:{host.port}") as link:
            await link.wait_up(5)
            return (await link.send(purchase(10))).answer.fields[39]

    assert uvloop.run(main()) == "00"


async def test_against_iso_host_serve_as_a_process() -> None:
    process = await asyncio.create_subprocess_exec(
        ISO_HOST, "serve", "--listen", "127.0.0.1:0", "--quiet", stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            line = (await process.stderr.readline()).decode()
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert found is not None, line
        async with link_to(f"tcp://127.0.0.1:{found.group(1)}") as link:
            assert await link.wait_up(5)
            assert (await link.send(purchase(10))).answer.fields[39] == "00"
    finally:
        process.terminate()
        await process.stderr.read()
        await asyncio.wait_for(process.wait(), 20)


def test_from_settings_loads_the_profile_by_name_and_names_the_variable_at_fault(tmp_path: Path) -> None:
    link = UpstreamLink.from_settings(UpstreamSettings(url="tcp://127.0.0.1:9", profile="iso87-ascii"))
    assert link.profile.name == "iso87-ascii" and not link.up
    with pytest.raises(StartupError) as caught:
        UpstreamLink.from_settings(UpstreamSettings(url="tcp://127.0.0.1:9", profile="no-such"))
    assert caught.value.setting == "GATEWAY_UPSTREAM__PROFILE" and "no such profile" in caught.value.detail
    with pytest.raises(StartupError) as caught:
        UpstreamLink.from_settings(UpstreamSettings(url="tcp://127.0.0.1:9", profile="cup-pos"))
    assert "TPDU" in caught.value.detail
    with pytest.raises(StartupError) as caught:
        UpstreamLink.from_settings(UpstreamSettings())
    assert caught.value.setting == "GATEWAY_UPSTREAM__URL"
    with pytest.raises(StartupError) as caught:
        UpstreamLink.from_settings(UpstreamSettings(url="tls://127.0.0.1:9", tls_ca=tmp_path / "none.pem"))
    assert caught.value.setting == "GATEWAY_UPSTREAM__TLS_CA" and "no such file" in caught.value.detail
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(StartupError) as caught:
        UpstreamLink.from_settings(UpstreamSettings(url="tls://127.0.0.1:9", tls_cert=tmp_path / "bad.pem"))
    assert caught.value.setting == "GATEWAY_UPSTREAM__TLS_CERT"


def test_a_link_needs_an_url() -> None:
    with pytest.raises(ValueError, match="no upstream url"):
        UpstreamLink(UpstreamSettings(), load_profile("iso87-binary"))

