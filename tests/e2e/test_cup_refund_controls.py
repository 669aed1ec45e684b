"""The refund controls for UnionPay terminals: ``GATEWAY_PROFILE=cup-pos iso-gateway serve`` driven over TCP.

The gateway runs as its own process (tests/harness.py) and the terminal speaks the UnionPay POS format
through tests/cup_frames.py, a builder written from the field layout (neither the gateway's codec nor
pyiso8583). Records "in the past" are written into the ledger file with the gateway's own ledger
before the process starts, under the same PAN key, so that cards compare equal.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from brokers import async_wait_until
from cup_frames import CARD, MERCHANT, OTHER_CARD, TERMINAL, CupTerminal
from harness import GatewayProcess
from test_refund_controls_ii import events_of

from gateway.adapters.ledger import SqliteLedger
from gateway.core.engine import Context
from gateway.core.events import CorrectionEvent
from gateway.core.model import Kind, Request, SettlementTotals
from gateway.core.policy import Policy
from gateway.events import new_event_id, render_event
from gateway.protocol.profile import load_profile

#: the PAN key GatewayProcess gives the gateway: seeded records must hash cards with it
PAN_KEY = b"e2e-key"
#: the committed event schemas (docs/events/)
DOCS_EVENTS = Path(__file__).resolve().parents[2] / "docs" / "events"


@pytest.fixture
def proc(tmp_path: Path, mqtt_broker_url: str) -> Iterator[GatewayProcess]:
    """This test's gateway in the cup-pos profile, not started yet (the test may seed or configure it)."""
    gateway = GatewayProcess(tmp_path, mqtt_broker_url, profile="cup-pos")
    yield gateway
    gateway.kill()


@contextlib.asynccontextmanager
async def connected(proc: GatewayProcess, terminal: str = TERMINAL) -> AsyncIterator[CupTerminal]:
    pos = await CupTerminal.connect(proc.port, terminal)
    try:
        yield pos
    finally:
        await pos.close()


def _seed_event(event: CorrectionEvent) -> tuple[str, str, bytes]:
    """A seeded record's event, for the outbox (published once the gateway runs: nobody listens)."""
    event_id = new_event_id()
    topic, payload = render_event(event, event_id=event_id, instance_id="seed", time=datetime.now(UTC),
                                  topic_prefix="seed")  # fmt: skip
    return event_id, topic, payload


async def seed(proc: GatewayProcess, at: datetime, kind: Kind, **fields: Any) -> str | None:
    """A purchase or settlement recorded at ``at`` as the gateway would have; returns its RRN."""
    ledger = await SqliteLedger(proc.db).open()
    try:
        mti = "0200" if kind is Kind.PURCHASE else "0500"
        request = Request(kind=kind, mti=mti, processing_code="000000" if mti == "0200" else "",
                          stan=f"{at.second:06d}", transmission_time="", merchant_id=MERCHANT,
                          terminal_id=TERMINAL, currency="156", **fields)  # fmt: skip
        ctx = Context(at, Policy(), PAN_KEY, load_profile("cup-pos").response_code)
        result = await ledger.process(request, ctx, _seed_event)
        assert result.response_code == "00", result
        return result.rrn
    finally:
        await ledger.close()


def ledger_row(proc: GatewayProcess, sql: str, *args: str) -> tuple[Any, ...] | None:
    """The first row of ``sql`` in the gateway's ledger file, read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{proc.db}?mode=ro", uri=True)) as db:
        row: tuple[Any, ...] | None = db.execute(sql, args).fetchone()
    return row


def recorded(proc: GatewayProcess, trace: str) -> bool:
    """Whether the ledger holds a record of this terminal's request with this trace."""
    return ledger_row(proc, "SELECT 1 FROM txns WHERE terminal_id = ? AND stan = ?", TERMINAL, trace) is not None


async def test_a_second_refund_of_the_whole_sale_answers_64(proc: GatewayProcess) -> None:
    proc.start()
    async with connected(proc) as pos:
        sale = await pos.sale(10000)
        today = sale[13]

        first = await pos.refund(sale[37], 10000, today)
        second = await pos.refund(sale[37], 10000, today)

    assert sale[39] == "00" and first[39] == "00"
    assert second[39] == "64"


async def test_a_refund_to_another_card_answers_14(proc: GatewayProcess) -> None:
    proc.start()
    async with connected(proc) as pos:
        sale = await pos.sale(10000)
        refund = await pos.refund(sale[37], 5000, sale[13], pan=OTHER_CARD)

    assert refund[39] == "14"


async def test_a_void_in_the_open_batch_is_approved_and_after_settlement_answers_12(proc: GatewayProcess) -> None:
    proc.start()
    async with connected(proc) as pos:
        voided = await pos.sale(2500)
        void_in_batch = await pos.void(voided, 2500)
        settled = await pos.sale(10000)
        settlement = await pos.settle(debits=(1, 10000), credits=(0, 0))
        void_after = await pos.void(settled, 10000)
        refund_after = await pos.refund(settled[37], 10000, settled[13])

    assert void_in_batch[39] == "00"
    assert settlement[39] == "00" and settlement[48][30] == "1"  # balanced: the voided sale is not counted
    assert void_after[39] == "12"
    assert refund_after[39] == "00"  # after settlement a sale is refunded, not voided


async def test_a_refund_the_day_after_a_settled_sale_is_approved(proc: GatewayProcess) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    rrn = await seed(proc, yesterday, Kind.PURCHASE, amount=8800, pan=CARD)
    await seed(proc, yesterday + timedelta(hours=1), Kind.SETTLEMENT, totals=SettlementTotals(0, 0, 1, 8800))
    assert rrn is not None
    proc.start()
    async with connected(proc) as pos:
        refund = await pos.refund(rrn, 8800, yesterday.strftime("%m%d"))

    assert refund[39] == "00" and refund[37] != rrn


async def test_a_refund_past_the_refund_window_answers_22(proc: GatewayProcess) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=31)
    rrn = await seed(proc, long_ago, Kind.PURCHASE, amount=8800, pan=CARD)
    assert rrn is not None
    proc.start()
    async with connected(proc) as pos:
        refund = await pos.refund(rrn, 100, long_ago.strftime("%m%d"))

    assert refund[39] == "22"


async def test_a_sale_whose_answer_was_lost_is_reversed_by_a_0400_repeating_its_trace_and_60(
    proc: GatewayProcess,
) -> None:
    proc.start()
    async with connected(proc) as lost:
        sale = lost.sale_request(4200)
        await lost.write("0200", sale)  # the answer never reaches the cashier: the terminal gives up
        await async_wait_until(lambda: recorded(proc, sale[11]), 10, "the sale in the ledger")
    async with connected(proc) as pos:
        reversal = await pos.reverse(sale)
        repeated = await pos.reverse(sale)
        settlement = await pos.settle(debits=(0, 0), credits=(0, 0))

    assert reversal[39] == "00" and repeated[39] == "00"
    assert reversal[60] == sale[60][:8]
    assert settlement[48][30] == "1"  # balanced with no sale: the lost one was reversed


async def test_a_repeated_sale_gets_the_first_answer_and_counts_once(proc: GatewayProcess) -> None:
    proc.start()
    async with connected(proc) as pos:
        request = pos.sale_request(3300)
        first = await pos.send("0200", request)
        repeat = await pos.send("0200", request)
        settlement = await pos.settle(debits=(1, 3300), credits=(0, 0))

    assert first[39] == "00"
    assert (repeat[37], repeat[38], repeat[39]) == (first[37], first[38], first[39])
    assert settlement[48][30] == "1"


async def test_a_terminal_not_on_the_allow_list_answers_97(proc: GatewayProcess) -> None:
    proc.env["GATEWAY_ALLOWED_TERMINALS"] = f'["{TERMINAL}"]'
    proc.start()
    async with connected(proc, "POS00009") as stranger, connected(proc) as allowed:
        refused = await stranger.sale(1000)
        approved = await allowed.sale(1000)

    assert refused[39] == "97"
    assert approved[39] == "00"


async def test_a_preauth_is_completed_once_by_its_approval_code_and_a_sale_void_cannot_void_a_completion(
    proc: GatewayProcess,
) -> None:
    proc.start()
    async with connected(proc) as pos:
        preauth = await pos.preauth(50000)
        completion = await pos.complete(preauth, 52000)  # within the 15 % tolerance
        second = await pos.complete(preauth, 1000)
        sale_void_of_completion = await pos.void(completion, 52000)
        other = await pos.preauth(7000)
        preauth_void = await pos.void_preauth(other, 7000)
        completion_after_void = await pos.complete(other, 7000)

    assert preauth[39] == "00" and len(preauth[38]) == 6
    assert completion[39] == "00" and second[39] == "12"
    assert sale_void_of_completion[39] == "12"  # 60.1 = 23 voids sales only
    reason = ledger_row(proc, "SELECT reason FROM txns WHERE stan = ?", sale_void_of_completion[11])
    assert reason == ("not_voidable",)
    assert preauth_void[39] == "00" and completion_after_void[39] == "12"


# --------------------------------------------------------------------------- settlement


async def test_a_settlement_whose_totals_disagree_answers_result_2_raises_the_mismatch_and_closes_the_batch(
    proc: GatewayProcess,
) -> None:
    proc.start()
    async with events_of(proc) as events, connected(proc) as pos:
        sale = await pos.sale(10000)
        await pos.refund(sale[37], 3000, sale[13])
        settlement = await pos.settle(debits=(1, 10000), credits=(1, 3001))  # the terminal counted 30.01
        mismatch = await events.wait_for("pos.batch.mismatch", lambda event: event.type == "pos.batch.mismatch")
        void_after = await pos.void(sale, 10000)
        next_settlement = await pos.settle(debits=(0, 0), credits=(0, 0))

    assert settlement[39] == "00" and settlement[48][30] == "2"  # not balanced: in DE48, not DE39
    assert mismatch.data["response_code"] == "00" and mismatch.data["reason"] == "settlement_mismatch"
    details = mismatch.data["details"]
    assert details["terminal_totals"]["credit_amount"] == 3001 and details["ledger_totals"]["credit_amount"] == 3000
    schema = json.loads((DOCS_EVENTS / "pos.batch.mismatch.schema.json").read_text())
    jsonschema.validate(mismatch.document, schema, cls=jsonschema.Draft202012Validator)
    assert CARD not in json.dumps(mismatch.document)
    assert void_after[39] == "12"  # the batch closed all the same
    assert next_settlement[48][30] == "1"


# --------------------------------------------------------------------------- sign-on


async def test_a_sign_on_is_told_its_batch_and_the_host_time_and_after_a_settlement_the_next_batch(
    proc: GatewayProcess,
) -> None:
    proc.env["GATEWAY_SETTLEMENT__TIMEZONE"] = "Asia/Shanghai"
    proc.start()
    async with connected(proc) as pos:
        before = datetime.now(ZoneInfo("Asia/Shanghai"))
        first = await pos.sign_on()
        after = datetime.now(ZoneInfo("Asia/Shanghai"))
        sale = await pos.sale(1000)
        again = await pos.sign_on()
        await pos.settle(debits=(1, 1000), credits=(0, 0))
        next_day = await pos.sign_on()

    assert first[39] == "00" and first[60] == "00000001003"
    host_time = datetime.strptime(f"{before.year}{first[13]}{first[12]}", "%Y%m%d%H%M%S")
    assert before.replace(tzinfo=None, microsecond=0) <= host_time <= after.replace(tzinfo=None)
    assert sale[60] == "22000001"
    assert again[60][2:8] == "000001"  # the batch is still open
    assert next_day[60][2:8] == "000002"
    assert ledger_row(proc, "SELECT terminal_batch FROM txns WHERE stan = ?", sale[11]) == ("000001",)


async def test_an_echo_test_is_answered_00_and_an_unknown_network_code_40(proc: GatewayProcess) -> None:
    proc.start()
    async with connected(proc) as pos:
        echo = await pos.send("0820", {11: "000777", 41: TERMINAL, 42: MERCHANT, 60: "00" + pos.batch + "301"})
        other = await pos.send("0820", {11: "000778", 41: TERMINAL, 42: MERCHANT, 60: "00" + pos.batch + "360"})

    assert (echo[39], echo[11], echo[60]) == ("00", "000777", "00" + pos.batch + "301")
    assert other[39] == "40"
    assert not recorded(proc, "000777")  # an echo is answered, never recorded


async def test_a_batch_upload_after_a_mismatch_lists_what_the_ledger_and_the_terminal_disagree_on(
    proc: GatewayProcess,
) -> None:
    proc.start()
    async with events_of(proc) as events, connected(proc) as pos:
        kept = await pos.sale(10000)
        forgotten = await pos.sale(2000)  # approved, but the terminal's journal lost it
        refund = await pos.refund(kept[37], 3000, kept[13])
        never_sent = pos.sale_request(500)  # in the terminal's journal, never reached the gateway
        settlement = await pos.settle(debits=(2, 10500), credits=(1, 3500))
        uploaded = await pos.upload([(kept[11], OTHER_CARD, 10000), (never_sent[11], CARD, 500),
                                     (refund[11], CARD, 3500)])  # fmt: skip
        end = await pos.upload_end(3)
        listing = await events.wait_for(
            "the batch upload's differences", lambda event: "differences" in event.data.get("details", {})
        )

    assert settlement[48][30] == "2" and uploaded[39] == "00" and end[39] == "00"
    found = {line["stan"]: line for line in listing.data["details"]["differences"]}
    assert {stan: line["difference"] for stan, line in found.items()} == {
        kept[11]: "card",
        forgotten[11]: "not_on_terminal",
        never_sent[11]: "not_in_ledger",
        refund[11]: "amount",
    }
    assert (found[refund[11]]["ledger_amount"], found[refund[11]]["terminal_amount"]) == (3000, 3500)
    assert found[forgotten[11]]["rrn"] == forgotten[37]
    assert listing.type == "pos.batch.mismatch" and listing.data["details"]["batch"] == pos.batch
    dumped = json.dumps(listing.document) + repr(ledger_row(proc, "SELECT group_concat(pan_masked) FROM batch_uploads"))
    dumped += proc.logs()
    assert CARD not in dumped and OTHER_CARD not in dumped
