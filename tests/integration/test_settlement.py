"""Settlement and reconciliation over TCP (issue 6): batch close, next-day refunds, mismatches, cut-off."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

from brokers import collect_messages
from harness import FakeClock, IsoClient, gateway_settings, running_gateway

from gateway.core.policy import Policy


async def test_a_batch_settles_with_00_then_voids_answer_12_refunds_00_and_wrong_totals_95(
    tmp_path: Path, mqtt_broker_url: str, topic_prefix: str
) -> None:
    settings = gateway_settings(tmp_path, mqtt_broker_url, mqtt_topic_prefix=topic_prefix)
    ready = asyncio.Event()
    events = asyncio.create_task(
        collect_messages(mqtt_broker_url, f"{topic_prefix}/+/+/batch/#", 2, timeout=20, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
    async with running_gateway(settings) as app:
        pos = await IsoClient.connect(app.port)
        sale_a = await pos.sale(5_000)
        sale_b = await pos.sale(2_000)
        assert (await pos.void(sale_b[37], 2_000))[39] == "00"
        assert (await pos.refund(sale_a[37], 1_500))[39] == "00"
        sale_c = await pos.sale(700)
        assert sale_c[39] == "00"
        # debits: sale A and sale C (B was voided); credits: the partial refund
        assert (await pos.settle((1, 1_500), (2, 5_700)))[39] == "00"

        assert (await pos.void(sale_c[37], 700))[39] == "12"
        assert (await pos.refund(sale_c[37], 700))[39] == "00"
        sale_d = await pos.sale(900)
        assert sale_d[39] == "00"
        assert (await pos.settle((1, 700), (1, 999)))[39] == "95"
        await pos.close()
        received = await events
        assert app.ledger is not None
        batches = await app.ledger.list_batches()
    settled = [json.loads(payload) for topic, payload in received if topic.endswith("/batch/settled")]
    mismatch = [json.loads(payload) for topic, payload in received if topic.endswith("/batch/mismatch")]
    assert len(settled) == 1 and len(mismatch) == 1
    details = mismatch[0]["data"]["details"]
    assert details["terminal_totals"] == {"credit_count": 1, "credit_amount": 700, "debit_count": 1,
                                          "debit_amount": 999}
    assert details["ledger_totals"] == {"credit_count": 1, "credit_amount": 700, "debit_count": 1,
                                        "debit_amount": 900}
    assert {line["rrn"] for line in details["transactions"]} >= {sale_d[37]}
    assert [(b.state.value, b.result) for b in batches] == [("closed", "settled"), ("closed", "mismatch")]
    assert (batches[0].debit_count, batches[0].debit_amount, batches[0].credit_amount) == (2, 5_700, 1_500)


async def test_the_daily_cutoff_closes_forgotten_batches_so_yesterdays_sale_cannot_be_voided(
    tmp_path: Path, mqtt_broker_url: str, topic_prefix: str
) -> None:
    clock = FakeClock(datetime(2026, 11, 22, 21, 0, tzinfo=UTC))  # 22:00 in Paris
    settings = gateway_settings(
        tmp_path, mqtt_broker_url, mqtt_topic_prefix=topic_prefix,
        settlement={"cutoff": "23:30", "timezone": "Europe/Paris"},
    )
    async with running_gateway(settings, clock=clock) as app:
        pos = await IsoClient.connect(app.port)
        sale = await pos.sale(1_200)
        assert await app.close_forgotten_batches() == 0  # the cut-off has not come yet today
        clock.advance(hours=2)  # 00:00 in Paris: yesterday's 23:30 cut-off has passed
        assert await app.close_forgotten_batches() == 1
        assert (await pos.void(sale[37], 1_200))[39] == "12"
        assert (await pos.refund(sale[37], 1_200))[39] == "00"
        await pos.close()


def test_the_last_and_next_cutoff_are_computed_in_the_configured_time_zone() -> None:
    policy = Policy(timezone=ZoneInfo("Europe/Paris"), cutoff=time(23, 30))
    now = datetime(2026, 11, 22, 22, 40, tzinfo=UTC)  # 23:40 in Paris
    assert policy.last_cutoff(now) == datetime(2026, 11, 22, 22, 30, tzinfo=UTC)
    assert policy.next_cutoff(now) == datetime(2026, 11, 23, 22, 30, tzinfo=UTC)
    earlier = datetime(2026, 11, 22, 22, 0, tzinfo=UTC)  # 23:00 in Paris
    assert policy.last_cutoff(earlier) == datetime(2026, 11, 21, 22, 30, tzinfo=UTC)
    assert policy.next_cutoff(earlier) == datetime(2026, 11, 22, 22, 30, tzinfo=UTC)
    assert Policy().last_cutoff(now) is None and Policy().next_cutoff(now) is None


def test_the_settlement_day_starts_at_local_midnight() -> None:
    shanghai = Policy(timezone=ZoneInfo("Asia/Shanghai"))
    # 07:30 UTC on the 22nd is 15:30 in Shanghai: its day began at 16:00 UTC on the 21st, not 00:00 UTC
    assert shanghai.day_start(datetime(2026, 11, 22, 7, 30, tzinfo=UTC)) == datetime(2026, 11, 21, 16, 0, tzinfo=UTC)
    assert Policy().day_start(datetime(2026, 11, 22, 7, 30, tzinfo=UTC)) == datetime(2026, 11, 22, tzinfo=UTC)
