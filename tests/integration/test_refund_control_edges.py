"""Refund controls II (issue 20) in one process over TCP: reorderings, repeats, other terminals, the cut-off.

The same findings are shown against the `iso-gateway serve` process in tests/e2e; these tests use a clock
the test moves, so that windows, days and cut-offs are checked at their edges.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from brokers import collect_messages
from harness import FakeClock, IsoClient, gateway_settings, running_gateway

from gateway.app import GatewayApp

MONDAY = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(MONDAY)


@pytest.fixture
async def gateway(
    tmp_path: Path, mqtt_broker_url: str, topic_prefix: str, clock: FakeClock
) -> AsyncIterator[GatewayApp]:
    settings = gateway_settings(tmp_path, mqtt_broker_url, mqtt_topic_prefix=topic_prefix)
    async with running_gateway(settings, clock=clock) as app:
        yield app


@pytest.fixture
async def pos(gateway: GatewayApp) -> AsyncIterator[IsoClient]:
    client = await IsoClient.connect(gateway.port)
    yield client
    await client.close()


def de90(mti: str, stan: str, de7: str) -> str:
    return mti + stan + de7 + "0" * 22


async def advice_for(pos: IsoClient, mti: str, fields: dict[int, str], amount: int, *, terminal: str = "TERM0001"
                     ) -> dict[int, str]:
    """A 0420 naming (by DE90) the request ``fields`` describe, sent by ``terminal``."""
    reversal = {3: fields[3], 90: de90(mti, fields[11], fields[7]), **pos.base(amount, terminal=terminal)}
    return (await pos.send("0420", reversal))[1]


# ------------------------------------------------------------------ tombstones of every kind


@pytest.mark.parametrize(("processing_code", "event_kind"), [("200000", "refund"), ("020000", "void")])
async def test_a_refund_or_void_overtaken_by_its_reversal_advice_is_refused_with_12_when_it_arrives(
    pos: IsoClient, mqtt_broker_url: str, topic_prefix: str, processing_code: str, event_kind: str
) -> None:
    sale = await pos.sale(3_000)
    late = {3: processing_code, 37: sale[37], **pos.base(3_000)}
    assert (await advice_for(pos, "0200", late, 3_000))[39] == "00"
    ready = asyncio.Event()
    declined = asyncio.create_task(
        collect_messages(mqtt_broker_url, f"{topic_prefix}/+/+/{event_kind}/declined", 1, timeout=10, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
    assert (await pos.send("0200", late))[1][39] == "12"
    [(_, payload)] = await declined
    assert json.loads(payload)["data"]["reason"] == "reversed_before_arrival"
    assert (await pos.void(sale[37], 3_000))[39] == "00"  # the sale was never touched


async def test_a_completion_overtaken_by_its_reversal_advice_is_refused_and_the_preauth_stays_open(
    pos: IsoClient,
) -> None:
    preauth = await pos.preauth(5_000)
    late = {3: "000000", 90: de90("0100", preauth[11], preauth[7]), **pos.base(5_000)}
    assert (await advice_for(pos, "0220", late, 5_000))[39] == "00"
    assert (await pos.send("0220", late))[1][39] == "12"
    assert (await pos.complete(preauth, 5_000))[39] == "00"


# ------------------------------------------------------------------ retransmissions


async def test_a_repeated_refund_with_a_new_de7_replays_the_first_answer_and_refunds_once(
    pos: IsoClient, clock: FakeClock
) -> None:
    sale = await pos.sale(10_000)
    refund = {3: "200000", 37: sale[37], **pos.base(6_000)}
    first = (await pos.send("0200", refund))[1]
    assert first[39] == "00"
    clock.advance(seconds=40)
    repeat = {**refund, 7: "1123104040"}  # terminals restamp DE7 on every repeat
    again = (await pos.send("0201", repeat))[1]
    assert (again[37], again[38], again[39]) == (first[37], first[38], "00")
    assert (await pos.refund(sale[37], 4_001))[39] == "64"
    assert (await pos.refund(sale[37], 4_000))[39] == "00"


async def test_the_same_key_with_other_content_and_a_new_de7_answers_94(pos: IsoClient) -> None:
    sale = await pos.sale(10_000)
    refund = {3: "200000", 37: sale[37], **pos.base(1_000)}
    assert (await pos.send("0200", refund))[1][39] == "00"
    assert (await pos.send("0201", {**refund, 4: "000000002000", 7: "1123101111"}))[1][39] == "94"
    assert (await pos.send("0201", {**refund, 37: "000000000000", 7: "1123101112"}))[1][39] == "94"


async def test_a_repeat_after_the_duplicate_window_is_a_new_request(pos: IsoClient, clock: FakeClock) -> None:
    sale = {3: "000000", **pos.base(100)}
    first = (await pos.send("0200", sale))[1]
    clock.advance(hours=49)
    again = (await pos.send("0201", sale))[1]
    assert again[39] == "00" and again[37] != first[37]


# ------------------------------------------------------------------ reversals from the right terminal only


async def test_another_terminal_cannot_reverse_a_sale_by_de90(pos: IsoClient) -> None:
    sale = await pos.sale(2_500)
    fields = {3: "000000", 90: de90("0200", sale[11], sale[7]), **pos.base(2_500, terminal="TERM0002")}
    assert (await pos.send("0400", fields))[1][39] == "25"
    assert (await advice_for(pos, "0200", {**sale, 3: "000000"}, 2_500, terminal="TERM0002"))[39] == "00"
    assert (await pos.void(sale[37], 2_500))[39] == "00"


async def test_a_reversal_without_de90_needs_the_originals_amount_and_a_recent_original(
    pos: IsoClient, clock: FakeClock
) -> None:
    sale = await pos.sale(5_000)
    wrong_amount = {3: "000000", **pos.base(9_900, stan=sale[11])}
    assert (await pos.send("0400", wrong_amount))[1][39] == "25"
    old = await pos.sale(5_000)
    clock.advance(hours=49)
    assert (await pos.send("0400", {3: "000000", **pos.base(5_000, stan=old[11])}))[1][39] == "25"
    assert (await pos.refund(old[37], 5_000))[39] == "00"  # the old sale still stood
    assert (await pos.void(sale[37], 5_000))[39] == "00"  # the wrong amount reversed nothing
    recent = await pos.sale(5_000)
    right = {3: "000000", **pos.base(5_000, stan=recent[11])}
    assert (await pos.send("0400", right))[1][39] == "00"
    assert (await pos.void(recent[37], 5_000))[39] == "12"  # reversed
    assert (await pos.refund(recent[37], 1))[39] == "12"


async def test_a_de90_whose_de7_does_not_match_falls_back_to_mti_and_stan_of_the_same_terminal(
    pos: IsoClient,
) -> None:
    sale = await pos.sale(1_000)
    fields = {3: "000000", 90: de90("0200", sale[11], "0101000000"), **pos.base(1_000)}
    assert (await pos.send("0400", fields))[1][39] == "00"
    assert (await pos.void(sale[37], 1_000))[39] == "12"


# ------------------------------------------------------------------ conflicts


async def test_a_reversal_advice_over_a_full_refund_raises_a_conflict_and_an_exception_case(
    gateway: GatewayApp, pos: IsoClient, mqtt_broker_url: str, topic_prefix: str
) -> None:
    sale = await pos.sale(10_000)
    refund = await pos.refund(sale[37], 10_000)
    assert refund[39] == "00"
    ready = asyncio.Event()
    conflict = asyncio.create_task(
        collect_messages(mqtt_broker_url, f"{topic_prefix}/+/+/reversal/conflict", 1, timeout=10, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
    assert (await advice_for(pos, "0200", {**sale, 3: "000000"}, 10_000))[39] == "00"
    [(_, payload)] = await conflict
    data = json.loads(payload)["data"]
    assert (data["reason"], data["response_code"], data["original"]["rrn"]) == (
        "credited_beyond_original", "00", sale[37]
    )
    details: dict[str, Any] = data["details"]
    assert (details["reversed_amount"], details["refunded_amount"], details["credited_beyond"]) == (
        10_000, 10_000, 10_000
    )
    assert [line["rrn"] for line in details["refunds"]] == [refund[37]]
    assert gateway.ledger is not None
    [case] = await gateway.ledger.list_exceptions()
    assert (case.kind, case.original_rrn, case.resolved) == ("reversal_conflict", sale[37], False)
    resolved = await gateway.ledger.resolve_exception(case.id, by="alice", note="refund clawed back", at=MONDAY)
    assert resolved is not None and resolved.resolved_by == "alice"
    assert await gateway.ledger.list_exceptions() == []
    assert await gateway.ledger.resolve_exception(case.id, by="bob", note="again", at=MONDAY) is None


async def test_a_partial_reversal_advice_that_leaves_the_refunds_covered_is_no_conflict(
    gateway: GatewayApp, pos: IsoClient
) -> None:
    sale = await pos.sale(10_000)
    assert (await pos.refund(sale[37], 2_000))[39] == "00"
    fields = {3: "000000", 90: de90("0200", sale[11], sale[7]), 95: f"{5_000:012d}" + "0" * 30,
              **pos.base(10_000)}  # fmt: skip
    assert (await pos.send("0420", fields))[1][39] == "00"
    assert gateway.ledger is not None
    assert await gateway.ledger.list_exceptions() == []
    assert (await pos.refund(sale[37], 3_001))[39] == "64"
    assert (await pos.refund(sale[37], 3_000))[39] == "00"


async def test_a_reversal_advice_of_a_completed_preauth_raises_a_conflict(gateway: GatewayApp, pos: IsoClient) -> None:
    preauth = await pos.preauth(4_000)
    assert (await pos.complete(preauth, 4_200))[39] == "00"
    assert (await advice_for(pos, "0100", {**preauth, 3: "000000"}, 4_000))[39] == "00"
    assert gateway.ledger is not None
    [case] = await gateway.ledger.list_exceptions()
    assert case.details["completed_amount"] == 4_200


# ------------------------------------------------------------------ the cut-off and the settlement day


@pytest.fixture
async def shanghai(
    tmp_path: Path, mqtt_broker_url: str, topic_prefix: str, clock: FakeClock
) -> AsyncIterator[GatewayApp]:
    clock.current = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)  # 23:00 in Shanghai
    settings = gateway_settings(
        tmp_path, mqtt_broker_url, mqtt_topic_prefix=topic_prefix,
        settlement={"cutoff": "23:30", "timezone": "Asia/Shanghai"},
        policy={"velocity": {"terminal_daily_count": 1}},
    )  # fmt: skip
    async with running_gateway(settings, clock=clock) as app:
        yield app


async def test_a_void_one_second_after_the_cutoff_is_refused_though_no_sweep_ran(
    shanghai: GatewayApp, clock: FakeClock, mqtt_broker_url: str, topic_prefix: str
) -> None:
    pos = await IsoClient.connect(shanghai.port)
    first = await pos.sale(1_000)
    second = await pos.sale(2_000)
    ready = asyncio.Event()
    closed = asyncio.create_task(
        collect_messages(mqtt_broker_url, f"{topic_prefix}/+/+/batch/closed", 1, timeout=10, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
    clock.current = datetime(2026, 11, 23, 15, 30, 1, tzinfo=UTC)  # 23:30:01 in Shanghai
    assert (await pos.void(second[37], 2_000))[39] == "12"
    [(_, payload)] = await closed
    event = json.loads(payload)
    assert (event["type"], event["data"]["reason"], event["data"]["request"]) == ("pos.batch.closed", "cutoff", None)
    assert event["data"]["details"]["ledger_totals"]["debit_amount"] == 3_000
    assert (await pos.refund(second[37], 2_000))[39] == "00"
    # the terminal never heard of the cut-off: its totals cover the closed batch and the new one
    assert (await pos.settle((1, 2_000), (2, 3_000)))[39] == "00"
    assert shanghai.ledger is not None
    batches = await shanghai.ledger.list_batches()
    assert [(b.state.value, b.result) for b in batches] == [("closed", "settled"), ("closed", "settled")]
    assert (await pos.settle((0, 0), (0, 0)))[39] == "00"  # nothing left to reconcile
    await pos.close()
    assert first[39] == "00"


async def test_a_0500_after_the_cutoff_with_wrong_totals_answers_95(shanghai: GatewayApp, clock: FakeClock) -> None:
    pos = await IsoClient.connect(shanghai.port)
    await pos.sale(1_000)
    clock.advance(hours=1)
    assert await shanghai.close_forgotten_batches() == 1
    assert (await pos.settle((0, 0), (1, 999)))[39] == "95"
    assert (await pos.settle((0, 0), (0, 0)))[39] == "00"
    await pos.close()


async def test_the_daily_refund_limit_counts_the_day_of_the_settlement_time_zone(
    shanghai: GatewayApp, clock: FakeClock
) -> None:
    pos = await IsoClient.connect(shanghai.port)
    sale = await pos.sale(10_000)
    assert (await pos.refund(sale[37], 100))[39] == "00"  # 23:00 on the 23rd in Shanghai
    clock.advance(minutes=10)
    assert (await pos.refund(sale[37], 100))[39] == "65"  # the same Shanghai day
    clock.advance(hours=1)  # 00:10 on the 24th in Shanghai, still the 23rd in UTC
    assert (await pos.refund(sale[37], 100))[39] == "00"
    await pos.close()


# ------------------------------------------------------------------ DE7 optional


async def test_requests_without_de7_are_answered_and_refer_to_each_other(pos: IsoClient) -> None:
    sale_fields = {3: "000000", **pos.base(1_500)}
    del sale_fields[7]
    mti, sale = await pos.send("0200", sale_fields)
    assert (mti, sale[39]) == ("0210", "00") and 7 not in sale
    refund = {3: "200000", 37: sale[37], **pos.base(500)}
    del refund[7]
    assert (await pos.send("0200", refund))[1][39] == "00"
    reversal = {3: "000000", 90: de90("0200", sale_fields[11], "0000000000"), **pos.base(1_500)}
    del reversal[7]
    assert (await pos.send("0400", reversal))[1][39] == "12"  # found (by MTI + STAN), a refund stands
    preauth_fields = {3: "000000", **pos.base(800)}
    del preauth_fields[7]
    assert (await pos.send("0100", preauth_fields))[1][39] == "00"


async def test_a_duplicate_window_shorter_than_an_old_sale_still_lets_refunds_use_the_rrn(
    pos: IsoClient, clock: FakeClock
) -> None:
    sale = await pos.sale(4_000)
    clock.advance(days=10)
    assert (await pos.refund(sale[37], 4_000))[39] == "00"
    clock.advance(days=25)
    assert (await pos.refund(sale[37], 1))[39] == "64"
    _ = timedelta


async def test_reversing_a_completions_void_completes_the_preauth_again_so_it_cannot_be_captured_twice(
    gateway: GatewayApp, pos: IsoClient
) -> None:
    preauth = await pos.preauth(10_000)
    completion = await pos.complete(preauth, 10_000)
    void = await pos.void(completion[37], 10_000)
    assert void[39] == "00"
    assert (await pos.reverse({**void, 3: "020000"}, original_mti="0200"))[39] == "00"
    assert (await pos.complete(preauth, 10_000))[39] == "12"  # already completed, by the re-opened one


async def test_a_void_reversal_advice_after_the_preauth_was_completed_again_raises_a_conflict(
    gateway: GatewayApp, pos: IsoClient
) -> None:
    preauth = await pos.preauth(10_000)
    completion = await pos.complete(preauth, 10_000)
    void = await pos.void(completion[37], 10_000)
    assert (await pos.complete(preauth, 9_000))[39] == "00"
    assert (await pos.reverse({**void, 3: "020000"}, original_mti="0200"))[39] == "12"  # a 0400 is refused
    assert (await pos.reverse({**void, 3: "020000"}, mti="0420", original_mti="0200"))[39] == "00"
    assert gateway.ledger is not None
    [case] = await gateway.ledger.list_exceptions()
    assert case.details["completed_amount"] == 9_000
