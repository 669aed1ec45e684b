"""The upstream link over real TCP against a scripted acquirer (tests/fake_acquirer.py): refused sign-ons,
lost and late answers, hang-ups, broken frames, echo tests, no host at all, and many requests at once."""

from __future__ import annotations

import asyncio
import io
import random
import socket
import struct
import time

import pytest
from brokers import async_wait_until
from fake_acquirer import FakeAcquirer, HostConnection, answer_to, encode
from upstream_helpers import CARD, TERMINAL, Lines, link_to, purchase, sample

from gateway.adapters.upstream import DuplicateInFlight, UpstreamDown, UpstreamTimeout
from gateway.logs import configure_logging, get_logger, reset_logging
from gateway.metrics import Metrics
from gateway.protocol.message import Message

pytestmark = pytest.mark.timeout(30)


async def test_a_refused_sign_on_closes_and_backs_off_and_the_next_one_brings_the_link_up() -> None:
    refusals = 2

    async def refuse_twice(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        nonlocal refusals
        if mti == "0800" and fields[70] == "001" and refusals:
            refusals -= 1
            conn.answer(mti, fields, "91")
        else:
            conn.answer(mti, fields)

    lines, metrics = Lines(), Metrics()
    async with FakeAcquirer(refuse_twice) as host, link_to(host.url, logger=lines, recorder=metrics) as link:
        with pytest.raises(UpstreamDown):
            await link.send(purchase(100))  # not signed on yet: nothing is written
        assert await link.wait_up(5)
        answer = (await link.send(purchase(100))).answer
    assert answer.fields[39] == "00"
    assert len(host.connections) == 3  # each refusal closed its connection
    assert [conn.received[0][1][70] for conn in host.connections] == ["001"] * 3
    assert len(host.of("0200")) == 1  # the send before the sign-on was accepted wrote nothing
    downs = lines.of("upstream.down")
    assert [(d["reason"], d["detail"], d["failures"]) for d in downs] == [
        ("signon_refused", "response code 91", 1), ("signon_refused", "response code 91", 2)]  # fmt: skip
    assert 0.025 <= downs[0]["retry_in_s"] <= 0.05 and 0.05 <= downs[1]["retry_in_s"] <= 0.1  # doubled, jittered
    assert lines.events().count("upstream.connected") == 3 and lines.events().count("upstream.signed_on") == 1
    assert sample(metrics, "gateway_upstream_disconnects_total", reason="signon_refused") == 2


async def test_a_sign_on_without_answer_times_out_and_is_tried_again() -> None:
    silent_once = True

    async def ignore_first_sign_on(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        nonlocal silent_once
        if mti == "0800" and silent_once:
            silent_once = False
            return
        conn.answer(mti, fields)

    lines = Lines()
    async with FakeAcquirer(ignore_first_sign_on) as host, link_to(
        host.url, logger=lines, network_timeout_s=0.2
    ) as link:
        assert await link.wait_up(5)
    assert lines.of("upstream.down")[0]["reason"] == "signon_timeout"
    assert len(host.connections) == 2


async def test_a_lost_answer_times_out_then_the_late_answer_is_logged_counted_and_dropped() -> None:
    async def hold_sales(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti != "0200":
            conn.answer(mti, fields)

    lines, metrics = Lines(), Metrics()
    async with FakeAcquirer(hold_sales) as host, link_to(host.url, logger=lines, recorder=metrics) as link:
        await link.wait_up(5)
        with pytest.raises(UpstreamTimeout) as caught:
            await link.send(purchase(2500), timeout=0.2)
        [(conn, _, held)] = host.of("0200")
        conn.answer("0200", held, echo_card=True)  # some hosts echo the PAN: it must not reach a log line
        late = await lines.wait_for("upstream.late_answer")
        assert link.up and link.status()[0]["in_flight"] == 0
    assert caught.value.sent.fields[11] == held[11] and caught.value.reason == "timeout"
    assert late == [{"mti": "0210", "terminal": TERMINAL, "conn": 0, "stan": held[11], "size": late[0]["size"],
                     "response_code": "00"}]  # fmt: skip
    assert sample(metrics, "gateway_upstream_late_answers_total") == 1
    assert CARD not in repr(lines.lines)


async def test_a_host_closing_mid_flight_fails_every_request_on_it_at_once_and_the_link_reconnects() -> None:
    async def hang_up_on_the_third_sale(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti == "0200" and len(host.of("0200")) == 3:
            conn.close()
        elif mti != "0200":
            conn.answer(mti, fields)

    lines = Lines()
    async with FakeAcquirer(hang_up_on_the_third_sale) as host, link_to(host.url, logger=lines) as link:
        await link.wait_up(5)
        started = time.monotonic()
        outcomes = await asyncio.gather(*(link.send(purchase(n), timeout=10) for n in (1, 2, 3)),
                                        return_exceptions=True)  # fmt: skip
        elapsed = time.monotonic() - started
        assert await link.wait_up(5)
    assert elapsed < 1.0  # at once, not after the 10 s timeout
    assert [type(o) for o in outcomes] == [UpstreamTimeout] * 3
    assert {o.reason for o in outcomes if isinstance(o, UpstreamTimeout)} == {"connection_lost"}
    assert len(host.connections) == 2 and host.connections[1].received[0][1][70] == "001"
    assert lines.of("upstream.down")[0]["reason"] == "closed_by_host"


async def test_with_no_host_listening_sends_fail_at_once_and_the_link_is_not_up() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        lines, metrics = Lines(), Metrics()
        async with link_to(f"tcp://127.0.0.1:{port}", logger=lines, recorder=metrics) as link:
            await lines.wait_for("upstream.down", count=2)
            started = time.monotonic()
            with pytest.raises(UpstreamDown):
                await link.send(purchase(100))
            assert time.monotonic() - started < 0.05
            assert not link.up and not await link.wait_up(0.1)
            [status] = link.status()
    assert status["state"] in ("backoff", "connecting")
    assert status["last_error"] == "connect_failed: Connection refused"
    first = lines.of("upstream.down")[0]
    assert first == {"conn": 0, "reason": "connect_failed", "detail": "Connection refused", "failures": 1,
                     "retry_in_s": first["retry_in_s"]}  # fmt: skip
    assert sample(metrics, "gateway_upstream_requests_total", outcome="down") == 1
    assert sample(metrics, "gateway_upstream_connections_up") == 0


async def test_requests_are_spread_round_robin_over_two_connections() -> None:
    metrics = Metrics()
    async with FakeAcquirer() as host, link_to(host.url, connections=2, recorder=metrics) as link:
        await async_wait_until(lambda: sample(metrics, "gateway_upstream_connections_up") == 2, 5, "the link")
        for amount in range(10):
            await link.send(purchase(amount))
    per_connection = [[int(f[4]) for mti, f in conn.received if mti == "0200"] for conn in host.connections]
    assert sorted(len(amounts) for amounts in per_connection) == [5, 5]
    assert sorted(per_connection[0] + per_connection[1]) == list(range(10))
    assert all(abs(a - b) == 1 for a, b in zip(sorted(per_connection[0]), sorted(per_connection[1]), strict=True))


async def test_an_idle_connection_is_echo_tested_and_stays_up() -> None:
    lines = Lines()
    async with FakeAcquirer() as host, link_to(host.url, logger=lines, echo_interval_s=0.15) as link:
        await link.wait_up(5)
        await host.wait_for(lambda: len(host.of("0800", "301")) >= 3)
        assert link.up
    assert len(host.connections) == 1 and not lines.of("upstream.down")


async def test_traffic_answered_in_time_needs_no_echo() -> None:
    async with FakeAcquirer() as host, link_to(host.url, echo_interval_s=0.3) as link:
        await link.wait_up(5)
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            await link.send(purchase(1))
            await asyncio.sleep(0.05)
    assert host.of("0800", "301") == []


async def test_a_host_that_stops_answering_echoes_gets_the_connection_closed_and_reopened() -> None:
    deaf = True

    async def deaf_to_echoes_on_the_first_connection(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if not (deaf and conn.number == 1 and fields.get(70) == "301"):
            conn.answer(mti, fields)

    lines, metrics = Lines(), Metrics()
    async with FakeAcquirer(deaf_to_echoes_on_the_first_connection) as host, link_to(
        host.url, logger=lines, recorder=metrics, echo_interval_s=0.2, network_timeout_s=0.3
    ) as link:
        await link.wait_up(5)
        [down] = await lines.wait_for("upstream.down")
        await async_wait_until(lambda: link.up, 5, "the link")
        await host.wait_for(lambda: len(host.of("0800", "301")) >= 2)  # the new connection is echo-tested, answered
        assert link.up
    assert (down["reason"], down["conn"]) == ("echo_timeout", 0)
    assert len(host.connections) == 2 and host.connections[1].received[0][1][70] == "001"
    assert sample(metrics, "gateway_upstream_disconnects_total", reason="echo_timeout") == 1


async def test_200_concurrent_requests_over_two_connections_answered_out_of_order_reach_their_callers() -> None:
    shuffle = random.Random(24)

    async def answer_in_any_order(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti == "0800":
            conn.answer(mti, fields)
            return

        async def later() -> None:
            await asyncio.sleep(shuffle.uniform(0, 0.05))
            conn.send(*answer_to(mti, {**fields, 38: fields[4][-6:]}))

        host.later(later())

    metrics = Metrics()
    async with FakeAcquirer(answer_in_any_order) as host, link_to(host.url, connections=2, recorder=metrics) as link:
        await async_wait_until(lambda: sample(metrics, "gateway_upstream_connections_up") == 2, 5, "the link")
        requests = [purchase(amount, terminal=f"TERM{amount % 3:04d}") for amount in range(1, 201)]
        exchanges = await asyncio.gather(*(link.send(request) for request in requests))
    for request, exchange in zip(requests, exchanges, strict=True):
        assert exchange.sent.fields[37] == request.fields[37]
        assert exchange.answer.fields[37] == request.fields[37]
        assert exchange.answer.fields[4] == request.fields[4] and exchange.answer.fields[38] == request.fields[4][-6:]
        assert exchange.answer.fields[11] == exchange.sent.fields[11]
    assert len({exchange.sent.fields[11] for exchange in exchanges}) == 200
    orders = [[f[11] for mti, f in conn.received if mti == "0200"] for conn in host.connections]
    assert sorted(map(len, orders)) == [100, 100]
    assert sample(metrics, "gateway_upstream_requests_total", outcome="answered") == 200


async def test_an_undecodable_answer_is_dropped_and_the_connection_carries_on() -> None:
    async def garble_the_first_sale(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti == "0200" and len(host.of("0200")) == 1:
            body = b"0210" + bytes(8) + CARD.encode()  # a bitmap of no fields, then card digits: extra data
            conn.send_raw(struct.pack(">H", len(body)) + body)
            return
        conn.answer(mti, fields)

    lines, metrics = Lines(), Metrics()
    async with FakeAcquirer(garble_the_first_sale) as host, link_to(host.url, logger=lines, recorder=metrics) as link:
        await link.wait_up(5)
        with pytest.raises(UpstreamTimeout):
            await link.send(purchase(1), timeout=0.3)
        assert (await link.send(purchase(2))).answer.fields[39] == "00"
    [undecodable] = lines.of("upstream.undecodable")
    assert undecodable["conn"] == 0 and undecodable["size"] == 28 and "extra data" in undecodable["reason"]
    assert len(host.connections) == 1 and not lines.of("upstream.down")
    assert sample(metrics, "gateway_upstream_undecodable_total") == 1
    assert CARD not in repr(lines.lines)


async def test_a_broken_frame_closes_the_connection_fails_its_requests_and_reconnects() -> None:
    async def break_framing(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti == "0200" and len(host.of("0200")) == 1:
            conn.send_raw(b"\xff\xff")  # announces 65,535 bytes: more than the profile's 8,192
            return
        conn.answer(mti, fields)

    lines = Lines()
    async with FakeAcquirer(break_framing) as host, link_to(host.url, logger=lines) as link:
        await link.wait_up(5)
        with pytest.raises(UpstreamTimeout) as caught:
            await link.send(purchase(1), timeout=5)
        assert caught.value.reason == "connection_lost"
        assert await link.wait_up(5)
        assert (await link.send(purchase(2))).answer.fields[39] == "00"
    down = lines.of("upstream.down")[0]
    assert down["reason"] == "framing_error" and "more than the 8192 allowed" in down["detail"]
    assert len(host.connections) == 2


async def test_the_hosts_own_echo_test_is_answered() -> None:
    async with FakeAcquirer() as host, link_to(host.url) as link:
        await link.wait_up(5)
        conn = host.connections[0]
        conn.send("0800", {7: "1207101010", 11: "424242", 70: "301"})
        await host.wait_for(lambda: any(mti == "0810" for mti, _ in conn.received))
    [(_, answer)] = [r for r in conn.received if r[0] == "0810"]
    assert answer == {7: "1207101010", 11: "424242", 39: "00", 70: "301"}


async def test_stop_fails_requests_in_flight_as_timeouts_and_later_sends_as_down() -> None:
    async def never_answer_sales(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti != "0200":
            conn.answer(mti, fields)

    lines = Lines()
    async with FakeAcquirer(never_answer_sales) as host, link_to(host.url, logger=lines) as link:
        await link.wait_up(5)
        pending = asyncio.create_task(link.send(purchase(1), timeout=10))
        await host.wait_for(lambda: bool(host.of("0200")))
        await link.stop()
        with pytest.raises(UpstreamTimeout) as caught:
            await pending
        with pytest.raises(UpstreamDown):
            await link.send(purchase(2))
        assert [s["state"] for s in link.status()] == ["closed"] and not link.up
    assert caught.value.reason == "stopped"
    assert lines.of("upstream.stopped")[0]["in_flight_failed"] == 1


async def test_the_same_stan_and_terminal_in_flight_twice_is_refused_before_anything_is_written() -> None:
    async def never_answer_sales(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti != "0200":
            conn.answer(mti, fields)

    async with FakeAcquirer(never_answer_sales) as host, link_to(host.url) as link:
        await link.wait_up(5)
        stamped = link.stamp(purchase(1))
        first = asyncio.create_task(link.send(stamped, stamp=False, timeout=0.5))
        await host.wait_for(lambda: bool(host.of("0200")))
        with pytest.raises(DuplicateInFlight):
            await link.send(Message("0200", dict(stamped.fields)), stamp=False)
        other_terminal = Message("0200", {**stamped.fields, 41: "TERM0002"})
        second = asyncio.create_task(link.send(other_terminal, stamp=False, timeout=0.5))
        await asyncio.gather(first, second, return_exceptions=True)
    assert len(host.of("0200")) == 2


async def test_stamped_stans_skip_those_still_in_flight() -> None:
    async with FakeAcquirer() as host, link_to(host.url) as link:
        await link.wait_up(5)
        stans = [link.stamp(purchase(1)).fields[11] for _ in range(3)]
    assert len(set(stans)) == 3 and all(len(stan) == 6 and stan.isdigit() for stan in stans)


async def test_log_lines_through_the_real_pipeline_never_hold_the_card_number() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    try:

        async def echo_card_late(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
            if mti != "0200":
                conn.answer(mti, fields)
                return
            body = b"0210" + bytes(8) + CARD.encode()
            conn.send_raw(struct.pack(">H", len(body)) + body)

            async def late() -> None:
                await asyncio.sleep(0.3)
                conn.answer(mti, fields, echo_card=True)

            host.later(late())

        lines = Lines()
        async with FakeAcquirer(echo_card_late) as host, link_to(host.url, logger=_Both(lines)) as link:
            await link.wait_up(5)
            with pytest.raises(UpstreamTimeout):
                await link.send(purchase(1), timeout=0.1)
            await lines.wait_for("upstream.late_answer")
            host.connections[0].close()
            await lines.wait_for("upstream.down")
    finally:
        reset_logging()
    text = out.getvalue()
    for event in ("upstream.connected", "upstream.signed_on", "upstream.undecodable", "upstream.late_answer",
                  "upstream.down", "upstream.stopped"):  # fmt: skip
        assert f'"event":"{event}"' in text
    assert CARD not in text and CARD[:6] + CARD[-4:] not in text.replace("*", "")


class _Both:
    """Lines for the test to wait on, and the real logger, so the test sees what the pipeline writes."""

    def __init__(self, lines: Lines) -> None:
        self.lines, self.real = lines, get_logger("gateway.upstream")

    def __getattr__(self, level: str) -> object:
        def log(event: str, **fields: object) -> None:
            getattr(self.lines, level)(event, **fields)
            getattr(self.real, level)(event, **fields)

        return log



async def test_a_host_that_accepts_but_never_completes_the_tls_handshake_fails_at_the_connect_deadline() -> None:
    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # takes the ClientHello, answers nothing, until the link gives up
        writer.close()

    server = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lines = Lines()
    try:
        async with link_to(f"tls://127.0.0.1:{port}", logger=lines, connect_timeout_s=0.3) as link:
            started = time.monotonic()
            [down] = await lines.wait_for("upstream.down")
            assert 0.25 <= time.monotonic() - started < 2 and not link.up
    finally:
        server.close()
    assert (down["reason"], down["detail"]) == ("connect_failed", "no connection within 0.3s")


async def test_an_answer_in_the_same_bytes_just_before_a_broken_frame_still_reaches_its_caller() -> None:
    async def answer_then_break(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
        if mti == "0200" and fields[4] == "000000000002":
            [(_, _, first)] = [r for r in host.of("0200") if r[2][4] == "000000000001"]
            conn.send_raw(encode(*answer_to("0200", first)) + b"\xff\xff")
        elif mti != "0200":
            conn.answer(mti, fields)

    async with FakeAcquirer(answer_then_break) as host, link_to(host.url) as link:
        await link.wait_up(5)
        first = asyncio.create_task(link.send(purchase(1), timeout=5))
        await host.wait_for(lambda: bool(host.of("0200")))
        second = asyncio.create_task(link.send(purchase(2), timeout=5))
        answered, lost = await asyncio.gather(first, second, return_exceptions=True)
    assert not isinstance(answered, BaseException) and answered.answer.fields[39] == "00"
    assert isinstance(lost, UpstreamTimeout) and lost.reason == "connection_lost"
