"""Refund controls, second audit: each finding reproduced over real TCP against ``iso-gateway serve``.

Every test asserts the behaviour of design sections 4-6 (revised). The gateway runs as its own
process (``tests/harness.py``: SQLite ledger in a temporary directory, the session's MQTT broker, a
free port); the test reads its events with aiomqtt on the gateway's own topic prefix. Records "in the
past" are seeded into the ledger file with the gateway's own ledger and engine before the process
starts, under the same PAN key, so that cards compare equal.

Two tests go beyond the audit's list: a completion overtaken by its reversal (finding 1 for the third
kind the design names) and a pre-auth completed twice once the void of its completion is reversed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import iso8583
import iso8583.specs
import pytest
from brokers import async_wait_until
from harness import CARD, MERCHANT, TERMINAL, GatewayProcess, IsoClient

from gateway.adapters.ledger import SqliteLedger
from gateway.adapters.mqtt import parse_mqtt_url
from gateway.core.engine import Context
from gateway.core.model import Kind, Reference, Request, SettlementTotals
from gateway.core.policy import Policy
from gateway.events import new_event_id, render_event
from gateway.ports import LedgerResult
from gateway.protocol.profile import load_profile

BIN = Path(sys.executable).parent
TERMINAL_B = "TERM0002"
TERMINAL_C = "TERM0003"
#: the PAN key GatewayProcess gives the gateway: seeded records must hash cards with it
PAN_KEY = b"e2e-key"
#: how long a test waits for an event it expects
EVENT_TIMEOUT = 5.0


# --------------------------------------------------------------------------- the gateway process


@pytest.fixture
def gateway(tmp_path: Path, mqtt_broker_url: str) -> Iterator[Callable[..., GatewayProcess]]:
    """Makes this test's gateway process (started unless ``start=False``); kills it at the end."""
    made: list[GatewayProcess] = []

    def make(env: dict[str, str] | None = None, *, start: bool = True) -> GatewayProcess:
        proc = GatewayProcess(tmp_path, mqtt_broker_url, env=env)
        made.append(proc)
        if start:
            proc.start()
        return proc

    yield make
    for proc in made:
        proc.kill()


@contextlib.asynccontextmanager
async def terminal(proc: GatewayProcess) -> AsyncIterator[IsoClient]:
    pos = await IsoClient.connect(proc.port)
    try:
        yield pos
    finally:
        await pos.close()


def stamp(moment: datetime) -> str:
    """DE7 (MMDDhhmmss, UTC)."""
    return moment.strftime("%m%d%H%M%S")


def original_data(mti: str, stan: str, transmission_time: str) -> str:
    """DE90: original MTI + STAN + DE7, then acquirer and forwarding ids (zeros)."""
    return mti + stan + transmission_time + "0" * 22


def fields_of(pos: IsoClient, processing_code: str, amount: int | None, **kw: Any) -> dict[int, str]:
    return {3: processing_code, **pos.base(amount, **kw)}


def run_cli(proc: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``iso-gateway ARGS`` with the gateway's environment (its ledger file)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=proc.env, capture_output=True, text=True, timeout=30
    )


def exceptions(proc: GatewayProcess, *flags: str) -> list[dict[str, Any]]:
    """``iso-gateway exceptions [FLAGS] --json``: a list of exceptions (or one list inside an object)."""
    listed = run_cli(proc, "exceptions", *flags, "--json")
    assert listed.returncode == 0, f"iso-gateway exceptions {' '.join(flags)} --json: {listed.stderr[-2000:]}"
    data = json.loads(listed.stdout)
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        assert len(lists) == 1, data
        data = lists[0]
    assert isinstance(data, list) and all(isinstance(item, dict) for item in data), data
    return data


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    topic: str
    document: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.document.get("type"))

    @property
    def data(self) -> dict[str, Any]:
        data = self.document.get("data")
        return data if isinstance(data, dict) else {}


class Events:
    """Every event published under one gateway's topic prefix since the subscription."""

    def __init__(self) -> None:
        self.received: list[Event] = []

    async def pump(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            self.received.append(Event(message.topic.value, json.loads(bytes(payload))))

    async def wait_for(self, what: str, predicate: Callable[[Event], bool], timeout: float = EVENT_TIMEOUT) -> Event:
        def found() -> Event | None:
            return next((event for event in self.received if predicate(event)), None)

        try:
            await async_wait_until(lambda: found() is not None, timeout, what)
        except TimeoutError:
            seen = [(e.type, e.data.get("reason")) for e in self.received]
            raise AssertionError(f"no {what} within {timeout:.0f}s; events seen: {seen}") from None
        event = found()
        assert event is not None
        return event

    def of_type(self, event_type: str) -> list[Event]:
        return [event for event in self.received if event.type == event_type]


@contextlib.asynccontextmanager
async def events_of(proc: GatewayProcess) -> AsyncIterator[Events]:
    """Subscribed (SUBACK received) to ``{prefix}/#`` of ``proc`` once entered."""
    address = parse_mqtt_url(proc.env["GATEWAY_MQTT_URL"])
    prefix = proc.env["GATEWAY_MQTT_TOPIC_PREFIX"]
    async with aiomqtt.Client(address.host, address.port, identifier=f"t20-{uuid.uuid4().hex[:12]}", timeout=5) as c:
        await c.subscribe(f"{prefix}/#", qos=1)
        events = Events()
        task = asyncio.create_task(events.pump(c))
        try:
            yield events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


def flatten(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON document with its dotted path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from flatten(item, f"{path}[{index}]")
    else:
        yield path, value


def has_amount(data: dict[str, Any], amount: int, key_part: str = "") -> bool:
    """Whether ``amount`` is in ``data`` under a key whose path mentions ``key_part``."""
    return any(value == amount and key_part in path.lower() for path, value in flatten(data))


# --------------------------------------------------------------------------- seeding the ledger


class Seeder:
    """Records made "in the past": the gateway's own ledger and engine on its file, at a chosen ``now``."""

    def __init__(self, proc: GatewayProcess) -> None:
        self.ledger = SqliteLedger(proc.db)
        self.prefix = proc.env["GATEWAY_MQTT_TOPIC_PREFIX"]
        self.profile = load_profile("iso87-binary")

    async def __aenter__(self) -> Seeder:
        await self.ledger.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ledger.close()

    def _render(self, event: Any) -> tuple[str, str, bytes]:
        event_id = new_event_id()
        topic, payload = render_event(
            event, event_id=event_id, instance_id="seed", time=datetime.now(UTC), topic_prefix=self.prefix
        )
        return event_id, topic, payload

    async def send(
        self, at: datetime, kind: Kind, mti: str, processing_code: str, stan: str, **kw: Any
    ) -> LedgerResult:
        request = Request(
            kind=kind,
            mti=mti,
            processing_code=processing_code,
            stan=stan,
            transmission_time=stamp(at),
            merchant_id=MERCHANT,
            terminal_id=TERMINAL,
            currency="840",
            **kw,
        )
        ctx = Context(at, Policy(), PAN_KEY, self.profile.response_code)
        return await self.ledger.process(request, ctx, self._render)

    async def sale(self, at: datetime, amount: int, stan: str) -> LedgerResult:
        result = await self.send(at, Kind.PURCHASE, "0200", "000000", stan, amount=amount, pan=CARD)
        assert result.response_code == "00" and result.rrn is not None
        return result

    async def refund(self, at: datetime, rrn: str, amount: int, stan: str) -> LedgerResult:
        result = await self.send(
            at, Kind.REFUND, "0200", "200000", stan, amount=amount, pan=CARD, reference=Reference(rrn=rrn)
        )
        assert result.response_code == "00", result
        return result

    async def settle(self, at: datetime, stan: str, totals: SettlementTotals) -> LedgerResult:
        result = await self.send(at, Kind.SETTLEMENT, "0500", "920000", stan, totals=totals)
        assert result.response_code == "00", result
        return result


# --------------------------------------------------------------------------- time zones


def fixed_zone(hours_east: int) -> str:
    """The IANA fixed-offset zone ``hours_east`` of UTC (POSIX sign: ``Etc/GMT-8`` is UTC+8)."""
    return "Etc/GMT" if hours_east == 0 else f"Etc/GMT{-hours_east:+d}"


def zone_with_midnight_at(utc_hour: int) -> str:
    """A fixed-offset zone whose local day starts at ``utc_hour``:00 UTC."""
    return fixed_zone(-utc_hour if utc_hour <= 12 else 24 - utc_hour)


# =========================================================================== 1. reversal overtook a correction


@pytest.mark.parametrize(
    ("processing_code", "kind", "after"),
    [
        ("200000", "refund", "refund"),  # the sale's whole balance is still there
        ("020000", "void", "void"),  # the sale still stands, unvoided
    ],
)
async def test_a_refund_or_void_whose_reversal_advice_arrived_first_is_declined_and_changes_nothing(
    gateway: Callable[..., GatewayProcess], processing_code: str, kind: str, after: str
) -> None:
    proc = gateway()
    async with terminal(proc) as pos, events_of(proc) as events:
        sale = await pos.sale(7_500)
        assert sale[39] == "00"
        stan, sent_at = pos.next_stan(), stamp(datetime.now(UTC))
        advice = fields_of(pos, processing_code, 7_500)
        advice[90] = original_data("0200", stan, sent_at)
        mti, answer = await pos.send("0420", advice)
        assert (mti, answer[39]) == ("0430", "00")

        late_request = {**fields_of(pos, processing_code, 7_500, stan=stan), 7: sent_at, 37: sale[37]}
        mti, late = await pos.send("0200", late_request)
        assert (mti, late[39]) == ("0210", "12"), f"the overtaken {kind} was answered {late[39]}"
        await events.wait_for(
            f"pos.{kind}.declined (reversed_before_arrival)",
            lambda e: e.type == f"pos.{kind}.declined" and e.data.get("reason") == "reversed_before_arrival",
        )
        follow_up = pos.refund if after == "refund" else pos.void
        assert (await follow_up(sale[37], 7_500))[39] == "00"


async def test_a_completion_whose_reversal_advice_arrived_first_is_declined_and_leaves_the_pre_auth_open(
    gateway: Callable[..., GatewayProcess],
) -> None:
    # not in the audit's list: the same hole for the third kind design section 5 names
    proc = gateway()
    async with terminal(proc) as pos, events_of(proc) as events:
        preauth = await pos.preauth(10_000)
        stan, sent_at = pos.next_stan(), stamp(datetime.now(UTC))
        advice = fields_of(pos, "000000", 10_000)
        advice[90] = original_data("0220", stan, sent_at)
        mti, answer = await pos.send("0420", advice)
        assert (mti, answer[39]) == ("0430", "00")

        completion = {**fields_of(pos, "000000", 10_000, stan=stan), 7: sent_at}
        completion[90] = original_data("0100", preauth[11], preauth[7])
        mti, late = await pos.send("0220", completion)
        assert (mti, late[39]) == ("0230", "12"), f"the overtaken completion was answered {late[39]}"
        await events.wait_for(
            "pos.completion.declined (reversed_before_arrival)",
            lambda e: e.type == "pos.completion.declined" and e.data.get("reason") == "reversed_before_arrival",
        )
        assert (await pos.complete(preauth, 10_000))[39] == "00"  # the pre-auth is still open


# =========================================================================== 2. retransmission with a new DE7


async def test_a_refund_repeated_with_a_new_transmission_time_gets_the_first_answer_and_is_charged_once(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos, events_of(proc) as events:
        sale = await pos.sale(10_000)
        refund = {**fields_of(pos, "200000", 4_000), 37: sale[37]}
        mti, first = await pos.send("0200", refund)
        assert (mti, first[39]) == ("0210", "00")

        repeat = {**refund, 7: stamp(datetime.now(UTC) + timedelta(minutes=1))}
        assert repeat[7] != refund[7]
        mti, again = await pos.send("0201", repeat)
        assert mti == "0210"
        assert (again[37], again.get(38), again[39]) == (first[37], first[38], "00"), (
            f"the repeat was processed again: RRN {again[37]} (first {first[37]}), code {again[39]}"
        )
        await events.wait_for("pos.duplicate.replayed", lambda e: e.type == "pos.duplicate.replayed")
        assert (await pos.refund(sale[37], 6_000))[39] == "00"  # 100.00 - 40.00 once
        assert (await pos.refund(sale[37], 1))[39] == "64"


async def test_a_repeat_with_the_same_key_but_another_amount_and_a_new_transmission_time_is_answered_94(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos:
        sale = await pos.sale(10_000)
        refund = {**fields_of(pos, "200000", 4_000), 37: sale[37]}
        assert (await pos.send("0200", refund))[1][39] == "00"

        conflicting = {**refund, 4: f"{5_000:012d}", 7: stamp(datetime.now(UTC) + timedelta(minutes=1))}
        mti, answer = await pos.send("0201", conflicting)
        assert (mti, answer[39]) == ("0210", "94"), f"same terminal + STAN + MTI class, other amount: {answer[39]}"
        assert (await pos.refund(sale[37], 6_000))[39] == "00"  # only the first refund was charged


# =========================================================================== 3. another terminal's reversal


async def test_a_reversal_request_from_another_terminal_is_refused_and_the_sale_stands(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos:
        sale = await pos.sale(3_000)  # terminal A
        assert sale[39] == "00"
        reversal = fields_of(pos, "000000", 3_000, terminal=TERMINAL_B)
        reversal[90] = original_data("0200", sale[11], sale[7])
        mti, answer = await pos.send("0400", reversal)
        assert (mti, answer[39]) == ("0410", "25"), f"terminal B reversed terminal A's sale: {answer[39]}"
        assert (await pos.void(sale[37], 3_000))[39] == "00"  # A's sale still stands


async def test_a_reversal_advice_from_another_terminal_is_accepted_but_changes_nothing(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos:
        sale = await pos.sale(3_000)  # terminal A
        advice = fields_of(pos, "000000", 3_000, terminal=TERMINAL_B)
        advice[90] = original_data("0200", sale[11], sale[7])
        mti, answer = await pos.send("0420", advice)
        assert (mti, answer[39]) == ("0430", "00")  # advices are never refused
        void = await pos.void(sale[37], 3_000)
        assert void[39] == "00", f"terminal B's advice reversed terminal A's sale: A's void answered {void[39]}"


# =========================================================================== 4. reversal without DE90


async def test_a_reversal_without_de90_for_another_amount_than_the_sale_is_refused(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos:
        sale = await pos.sale(5_000)
        mti, answer = await pos.send("0400", fields_of(pos, "000000", 9_900, stan=sale[11]))
        assert (mti, answer[39]) == ("0410", "25"), f"a STAN-only reversal of 99.00 matched a 50.00 sale: {answer[39]}"
        assert (await pos.void(sale[37], 5_000))[39] == "00"


async def test_a_reversal_without_de90_does_not_match_a_sale_older_than_the_duplicate_window(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway(start=False)
    stan = "900417"
    then = datetime.now(UTC) - timedelta(days=20)
    async with Seeder(proc) as seed:
        sale = await seed.sale(then, 5_000, stan)
        await seed.settle(then + timedelta(hours=1), "900418", SettlementTotals(0, 0, 1, 5_000))
    proc.start()
    async with terminal(proc) as pos:
        mti, answer = await pos.send("0400", fields_of(pos, "000000", 5_000, stan=stan))
        assert (mti, answer[39]) == ("0410", "25"), f"a STAN-only reversal matched a 20-day-old sale: {answer[39]}"
        assert sale.rrn is not None
        assert (await pos.refund(sale.rrn, 5_000))[39] == "00"  # the sale still stands in full


async def test_a_reversal_without_de90_with_the_sales_stan_and_amount_within_the_window_reverses_it(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos:
        sale = await pos.sale(5_000)
        mti, answer = await pos.send("0400", fields_of(pos, "000000", 5_000, stan=sale[11]))
        assert (mti, answer[39]) == ("0410", "00")
        assert (await pos.void(sale[37], 5_000))[39] == "12"  # already reversed


# =========================================================================== 5. reversal advice over standing refunds


async def test_a_reversal_advice_over_a_full_refund_is_accepted_and_raised_as_a_conflict_for_an_operator(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos, events_of(proc) as events:
        sale = await pos.sale(10_000)
        assert (await pos.refund(sale[37], 10_000))[39] == "00"
        advice = fields_of(pos, "000000", 10_000)
        advice[90] = original_data("0200", sale[11], sale[7])
        mti, answer = await pos.send("0420", advice)
        assert (mti, answer[39]) == ("0430", "00")  # advices are never refused

        conflict = await events.wait_for("pos.reversal.conflict", lambda e: e.type == "pos.reversal.conflict")
        assert conflict.topic.endswith(f"/{MERCHANT}/{TERMINAL}/reversal/conflict")
        assert has_amount(conflict.data, 10_000, "revers"), f"no reversed amount in {conflict.data}"
        assert has_amount(conflict.data, 10_000, "refund"), f"no refunded amount in {conflict.data}"
        assert sale[37] in {value for _, value in flatten(conflict.data)}, "the original's RRN is missing"
    assert proc.signal(signal.SIGTERM) == 0

    opened = [item for item in exceptions(proc) if sale[37] in json.dumps(item)]
    assert len(opened) == 1, opened
    exception_id = str(opened[0].get("id", opened[0].get("exception_id")))
    note = "refund returned by the merchant"
    resolved = run_cli(proc, "exceptions", "resolve", exception_id, "--by", "alice", "--note", note)
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    assert [item for item in exceptions(proc) if sale[37] in json.dumps(item)] == []
    closed = [item for item in exceptions(proc, "--all") if sale[37] in json.dumps(item)]
    assert len(closed) == 1, closed
    assert closed[0].get("resolved_by") == "alice"
    assert note in json.dumps(closed[0])
    assert closed[0].get("status") == "resolved" or closed[0].get("resolved") is True or closed[0].get("resolved_at")


async def test_a_reversal_advice_for_a_completed_pre_auth_is_raised_as_a_conflict(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos, events_of(proc) as events:
        preauth = await pos.preauth(10_000)
        assert (await pos.complete(preauth, 9_000))[39] == "00"
        advice = fields_of(pos, "000000", 10_000)
        advice[90] = original_data("0100", preauth[11], preauth[7])
        mti, answer = await pos.send("0420", advice)
        assert (mti, answer[39]) == ("0430", "00")

        conflict = await events.wait_for("pos.reversal.conflict", lambda e: e.type == "pos.reversal.conflict")
        assert has_amount(conflict.data, 10_000, "revers"), f"no reversed amount in {conflict.data}"
        assert preauth[37] in {value for _, value in flatten(conflict.data)}, "the pre-auth's RRN is missing"


# =========================================================================== 6. settlement cut-off


async def test_from_the_cutoff_instant_on_a_void_is_refused_and_the_next_settlement_counts_every_unreconciled_batch(
    gateway: Callable[..., GatewayProcess],
) -> None:
    now = datetime.now(UTC)
    hours_east = 12 - now.hour  # local time about noon: the cut-off is nowhere near local midnight
    zone = fixed_zone(hours_east)
    local = now + timedelta(hours=hours_east)
    cutoff_local = (local + timedelta(seconds=7)).replace(microsecond=0) + timedelta(seconds=1)
    cutoff = cutoff_local - timedelta(hours=hours_east)  # the same instant, in UTC
    proc = gateway({"GATEWAY_SETTLEMENT__CUTOFF": cutoff_local.strftime("%H:%M:%S"),
                    "GATEWAY_SETTLEMENT__TIMEZONE": zone})  # fmt: skip
    async with terminal(proc) as pos, events_of(proc) as events:
        assert (await pos.sale(1_000))[39] == "00"
        sale = await pos.sale(2_000)
        assert sale[39] == "00"
        assert (await pos.sale(500, terminal=TERMINAL_C))[39] == "00"
        assert datetime.now(UTC) < cutoff - timedelta(seconds=1), "set-up too slow: the sales ran into the cut-off"

        await async_wait_until(
            lambda: datetime.now(UTC) >= cutoff + timedelta(seconds=1.5), 20, "the cut-off instant to pass"
        )
        # terminal C forgot its sale: zero totals answer 95 (today they would answer a false 00 once the
        # 30 s timer has closed C's batch, since only the open batch is compared)
        assert (await pos.settle((0, 0), (0, 0), terminal=TERMINAL_C))[39] == "95"
        void = await pos.void(sale[37], 2_000)
        assert void[39] == "12", f"a void {datetime.now(UTC) - cutoff} after the cut-off was answered {void[39]}"
        await events.wait_for(
            f"pos.batch.closed (cutoff) for {TERMINAL}",
            lambda e: (
                e.type == "pos.batch.closed"
                and e.data.get("reason") == "cutoff"
                and f"/{TERMINAL}/batch/closed" in e.topic
            ),
        )
        assert (await pos.refund(sale[37], 2_000))[39] == "00"
        settled = await pos.settle((1, 2_000), (2, 3_000))
        assert settled[39] == "00", f"correct totals over the cut-off batch and the open one: {settled[39]}"


# =========================================================================== 7. daily limits in the settlement zone


async def test_the_daily_refund_count_counts_the_day_in_the_settlement_time_zone(
    gateway: Callable[..., GatewayProcess],
) -> None:
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if now.hour >= 2:
        # the local day began an hour or two ago, the UTC day earlier: a refund made half an hour before
        # the local midnight is yesterday's locally and must not count against today's limit
        local_midnight = today + timedelta(hours=now.hour - 1)
        earlier, expected = local_midnight - timedelta(minutes=30), "00"
    else:
        # the local day (UTC-3) began yesterday at 03:00 UTC: a refund made just before the UTC midnight
        # is today's locally and counts
        local_midnight = today - timedelta(hours=21)
        earlier, expected = today - timedelta(minutes=30), "65"
    zone = zone_with_midnight_at(local_midnight.hour)
    proc = gateway(
        {"GATEWAY_POLICY__VELOCITY__TERMINAL_DAILY_COUNT": "1", "GATEWAY_SETTLEMENT__TIMEZONE": zone}, start=False
    )
    async with Seeder(proc) as seed:
        sale = await seed.sale(earlier - timedelta(minutes=1), 10_000, "900101")
        assert sale.rrn is not None
        await seed.refund(earlier, sale.rrn, 1_000, "900102")
    proc.start()
    async with terminal(proc) as pos:
        refund = await pos.refund(sale.rrn, 1_000)
        assert refund[39] == expected, (
            f"zone {zone}: a refund at {earlier:%Y-%m-%d %H:%M} UTC (local day from {local_midnight:%Y-%m-%d %H:%M}"
            f" UTC), then one now ({now:%Y-%m-%d %H:%M} UTC) with a daily count of 1: answered {refund[39]}"
        )


# =========================================================================== 8. no DE7


def load_codes(output: str) -> tuple[int, dict[str, int]]:
    """Responses and response codes from the table ``iso8583sim load`` prints."""
    responses = re.search(r"Responses\s*\S\s*([\d,]+)", output)
    codes = re.search(r"Response codes\s*\S\s*([^│|\n]*)", output)
    assert responses and codes, output
    counted = {code: int(n.replace(",", "")) for code, n in re.findall(r"(\w\w): ([\d,]+)", codes.group(1))}
    return int(responses.group(1).replace(",", "")), counted


async def test_iso8583sim_load_requests_without_de7_are_all_answered_and_none_with_a_format_error(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    # an independent implementation's sample 0100s (no DE7): 2-byte binary length, ASCII, binary bitmap
    command = [str(BIN / "iso8583sim"), "load", "--host", "127.0.0.1", "--port", str(proc.port),
               "--count", "50", "--concurrency", "5", "--format", "ascii-binary", "--header", "2b",
               "--timeout", "10"]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, command, env={**proc.env, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    responses, codes = load_codes(result.stdout)
    assert responses == 50, result.stdout
    assert "30" not in codes, f"answered with a format error: {codes}"


def raw_request(mti: str, fields: dict[int, str]) -> bytes:
    """A frame assembled by hand: 2-byte length, ASCII MTI, binary primary bitmap, ASCII fields (DE2 LLVAR)."""
    bitmap = 0
    body = b""
    for number in sorted(fields):
        assert 2 <= number <= 64
        bitmap |= 1 << (64 - number)
        value = fields[number].encode("ascii")
        body += (b"%02d" % len(value) + value) if number == 2 else value
    message = mti.encode("ascii") + bitmap.to_bytes(8, "big") + body
    return struct.pack(">H", len(message)) + message


async def read_answer(pos: IsoClient) -> tuple[str, dict[str, Any]]:
    size = struct.unpack(">H", await asyncio.wait_for(pos.reader.readexactly(2), 10))[0]
    doc, _ = iso8583.decode(await asyncio.wait_for(pos.reader.readexactly(size), 10), iso8583.specs.default)
    return doc["t"], doc


async def test_a_purchase_and_a_refund_without_de7_are_approved_and_answered_without_de7(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos:
        sale = {2: CARD, 3: "000000", 4: "000000002500", 11: pos.next_stan(), 41: TERMINAL, 42: MERCHANT, 49: "840"}
        pos.writer.write(raw_request("0200", sale))
        mti, answer = await read_answer(pos)
        assert (mti, answer["39"]) == ("0210", "00"), f"a purchase without DE7: {answer['39']}"
        assert "7" not in answer

        refund = {**sale, 3: "200000", 4: "000000001000", 11: pos.next_stan(), 37: answer["37"]}
        pos.writer.write(raw_request("0200", refund))
        mti, refunded = await read_answer(pos)
        assert (mti, refunded["39"]) == ("0210", "00"), f"a refund without DE7: {refunded['39']}"
        assert "7" not in refunded


# =========================================================================== beyond the audit


async def test_a_pre_auth_whose_completion_came_back_by_reversing_its_void_cannot_be_completed_twice(
    gateway: Callable[..., GatewayProcess],
) -> None:
    proc = gateway()
    async with terminal(proc) as pos:
        preauth = await pos.preauth(10_000)
        completion = await pos.complete(preauth, 10_000)
        assert completion[39] == "00"
        void = await pos.void(completion[37], 10_000)
        assert void[39] == "00"  # the pre-auth may be completed again ...
        assert (await pos.reverse(void))[39] == "00"  # ... until the void is reversed: the completion stands again
        again = await pos.complete(preauth, 10_000)
        assert again[39] == "12", f"a second completion of one 100.00 pre-auth was answered {again[39]}"
