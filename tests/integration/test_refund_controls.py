"""Every rule of design section 5 over real TCP: one request that passes and one that fails."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from harness import OTHER_CARD, IsoClient, gateway_settings, on_connection, running_gateway

from gateway.app import GatewayApp


@pytest.fixture
async def gateway(tmp_path: Path, mqtt_broker_url: str) -> AsyncIterator[GatewayApp]:
    settings = gateway_settings(
        tmp_path,
        mqtt_broker_url,
        mqtt_topic_prefix=f"test/{tmp_path.name}",
        policy={"unreferenced_refund_terminals": ["TERMUNRF"], "velocity": {"card_daily_count": 3}},
        standin={"max_amount": 500_000},
    )
    async with running_gateway(settings) as app:
        yield app


@pytest.fixture
async def pos(gateway: GatewayApp) -> AsyncIterator[IsoClient]:
    client = await IsoClient.connect(gateway.port)
    yield client
    await client.close()


async def test_refunds_of_6000_then_5000_against_a_10000_sale_answer_00_then_64(pos: IsoClient) -> None:
    sale = await pos.sale(10_000)
    assert sale[39] == "00"
    assert (await pos.refund(sale[37], 6_000))[39] == "00"
    assert (await pos.refund(sale[37], 5_000))[39] == "64"
    assert (await pos.refund(sale[37], 4_000))[39] == "00"
    assert (await pos.refund(sale[37], 1))[39] == "64"


async def test_a_refund_to_another_card_is_refused_with_14(pos: IsoClient) -> None:
    sale = await pos.sale(2_000)
    assert (await pos.refund(sale[37], 1_000, pan=OTHER_CARD))[39] == "14"
    assert (await pos.refund(sale[37], 1_000))[39] == "00"


async def test_a_refund_of_an_unknown_rrn_answers_25(pos: IsoClient) -> None:
    assert (await pos.refund("999999999999", 100))[39] == "25"


async def test_a_refund_in_another_currency_answers_12(pos: IsoClient) -> None:
    sale = await pos.sale(2_000)
    assert (await pos.refund(sale[37], 100, currency="978"))[39] == "12"


async def test_a_zero_refund_answers_13(pos: IsoClient) -> None:
    sale = await pos.sale(2_000)
    assert (await pos.refund(sale[37], 0))[39] == "13"


async def test_unreferenced_refunds_need_the_terminal_to_be_allowed(pos: IsoClient) -> None:
    assert (await pos.refund(None, 700))[39] == "58"
    assert (await pos.refund(None, 700, terminal="TERMUNRF"))[39] == "00"


async def test_the_daily_refund_count_per_card_answers_65_past_the_limit(pos: IsoClient) -> None:
    sale = await pos.sale(10_000)
    for _ in range(3):
        assert (await pos.refund(sale[37], 100))[39] == "00"
    assert (await pos.refund(sale[37], 100))[39] == "65"


async def test_a_refund_of_a_voided_sale_answers_12(pos: IsoClient) -> None:
    sale = await pos.sale(3_000)
    assert (await pos.void(sale[37], 3_000))[39] == "00"
    assert (await pos.refund(sale[37], 100))[39] == "12"


async def test_a_void_is_approved_once_and_a_second_void_answers_12(pos: IsoClient) -> None:
    sale = await pos.sale(1_500)
    assert (await pos.void(sale[37], 1_500))[39] == "00"
    assert (await pos.void(sale[37], 1_500))[39] == "12"


async def test_a_void_for_another_amount_answers_64(pos: IsoClient) -> None:
    sale = await pos.sale(1_500)
    assert (await pos.void(sale[37], 1_000))[39] == "64"
    assert (await pos.void(sale[37], 1_500))[39] == "00"


async def test_a_void_with_another_card_answers_14(pos: IsoClient) -> None:
    sale = await pos.sale(1_500)
    assert (await pos.void(sale[37], 1_500, pan=OTHER_CARD))[39] == "14"


async def test_a_void_from_another_terminal_answers_12(pos: IsoClient) -> None:
    sale = await pos.sale(1_500)
    assert (await pos.void(sale[37], 1_500, terminal="TERM0002"))[39] == "12"


async def test_a_void_after_a_refund_answers_12(pos: IsoClient) -> None:
    sale = await pos.sale(1_500)
    assert (await pos.refund(sale[37], 500))[39] == "00"
    assert (await pos.void(sale[37], 1_500))[39] == "12"


async def test_a_void_of_an_unknown_rrn_answers_25(pos: IsoClient) -> None:
    assert (await pos.void("000000999999", 100))[39] == "25"


async def test_a_void_of_a_declined_sale_answers_12(pos: IsoClient) -> None:
    declined = await pos.sale(1_000, pan="4761739001010118")  # fails Luhn
    assert declined[39] == "14"
    assert (await pos.void(declined[37], 1_000, pan="4761739001010118"))[39] == "12"


async def test_a_void_of_a_settled_sale_answers_12_and_a_refund_still_works(pos: IsoClient) -> None:
    sale = await pos.sale(2_500)
    assert (await pos.settle((0, 0), (1, 2_500)))[39] == "00"
    assert (await pos.void(sale[37], 2_500))[39] == "12"
    assert (await pos.refund(sale[37], 2_500))[39] == "00"


async def test_a_reversed_void_reopens_its_sale_for_refunds(pos: IsoClient) -> None:
    sale = await pos.sale(1_000)
    void_fields = pos.base(1_000)
    void = (await pos.send("0200", {3: "020000", 37: sale[37], **void_fields}))[1]
    assert void[39] == "00"
    assert (await pos.refund(sale[37], 100))[39] == "12"
    assert (await pos.reverse(void, original_mti="0200"))[39] == "00"
    assert (await pos.refund(sale[37], 100))[39] == "00"


async def test_a_reversed_refund_gives_its_amount_back(pos: IsoClient) -> None:
    sale = await pos.sale(1_000)
    refund = await pos.refund(sale[37], 1_000)
    assert refund[39] == "00"
    assert (await pos.refund(sale[37], 1))[39] == "64"
    assert (await pos.reverse(refund))[39] == "00"
    assert (await pos.refund(sale[37], 1_000))[39] == "00"


async def test_a_repeated_reversal_advice_answers_00_and_changes_nothing(pos: IsoClient, gateway: GatewayApp) -> None:
    sale = await pos.sale(1_000)
    assert (await pos.reverse(sale, mti="0420"))[39] == "00"
    assert gateway.ledger is not None
    before = await gateway.ledger.all_txns()
    assert (await pos.reverse(sale, mti="0420"))[39] == "00"
    after = await gateway.ledger.all_txns()
    assert [(t.id, t.status, t.effective_amount) for t in before] == [
        (t.id, t.status, t.effective_amount) for t in after[: len(before)]
    ]
    assert (await pos.refund(sale[37], 100))[39] == "12"


async def test_a_reversal_request_for_an_unknown_original_answers_25_and_an_advice_00(pos: IsoClient) -> None:
    ghost = pos.base(1_000)
    ghost[3] = "000000"
    assert (await pos.reverse(ghost, mti="0400"))[39] == "25"
    ghost2 = pos.base(1_000)
    ghost2[3] = "000000"
    assert (await pos.reverse(ghost2, mti="0420"))[39] == "00"


async def test_a_sale_arriving_after_its_reversal_is_refused(pos: IsoClient) -> None:
    sale_fields = {3: "000000", **pos.base(1_000)}
    assert (await pos.reverse(sale_fields, mti="0420"))[39] == "00"
    assert (await pos.send("0200", sale_fields))[1][39] == "12"


async def test_a_partial_reversal_lowers_what_can_be_refunded(pos: IsoClient) -> None:
    sale = await pos.sale(1_000)
    assert (await pos.reverse(sale, mti="0420", partial=600))[39] == "00"
    assert (await pos.refund(sale[37], 700))[39] == "64"
    assert (await pos.refund(sale[37], 600))[39] == "00"


async def test_a_completion_within_tolerance_is_approved_once(pos: IsoClient) -> None:
    preauth = await pos.preauth(10_000)
    assert preauth[39] == "00"
    assert (await pos.complete(preauth, 11_500))[39] == "00"
    assert (await pos.complete(preauth, 10_000))[39] == "12"


async def test_a_completion_over_tolerance_answers_64(pos: IsoClient) -> None:
    preauth = await pos.preauth(10_000)
    assert (await pos.complete(preauth, 11_501))[39] == "64"


async def test_a_completion_with_another_card_answers_14_and_an_unknown_preauth_25(pos: IsoClient) -> None:
    preauth = await pos.preauth(10_000)
    assert (await pos.complete(preauth, 5_000, pan=OTHER_CARD))[39] == "14"
    ghost = pos.base(1_000)
    assert (await pos.complete(ghost, 1_000))[39] == "25"


async def test_a_retransmission_replays_the_first_answer(pos: IsoClient) -> None:
    fields = {3: "000000", **pos.base(4_200)}
    first = (await pos.send("0200", fields))[1]
    again = (await pos.send("0201", fields))[1]
    assert (again[37], again.get(38), again[39]) == (first[37], first.get(38), first[39])


async def test_a_retransmission_with_other_content_answers_94(pos: IsoClient) -> None:
    fields = {3: "000000", **pos.base(4_200)}
    assert (await pos.send("0200", fields))[1][39] == "00"
    fields[4] = f"{4_300:012d}"
    assert (await pos.send("0201", fields))[1][39] == "94"


async def test_stand_in_declines_over_limit_61_bad_luhn_14_and_expired_cards_54(pos: IsoClient) -> None:
    assert (await pos.sale(500_001))[39] == "61"
    assert (await pos.sale(100, pan="4761739001010118"))[39] == "14"
    fields = {3: "000000", 14: "2001", **pos.base(100)}
    assert (await pos.send("0200", fields))[1][39] == "54"
    fields = {3: "000000", 14: "4912", **pos.base(100)}
    assert (await pos.send("0200", fields))[1][39] == "00"


async def test_forty_concurrent_refunds_of_1000_against_a_10000_sale_approve_exactly_ten(
    tmp_path: Path, mqtt_broker_url: str
) -> None:
    settings = gateway_settings(tmp_path, mqtt_broker_url, mqtt_topic_prefix=f"test/{tmp_path.name}")
    async with running_gateway(settings) as app:
        first = await IsoClient.connect(app.port)
        sale = await first.sale(10_000)
        clients = [first, *[await IsoClient.connect(app.port) for _ in range(3)]]

        async def burst(client: IsoClient) -> list[str]:
            frames = [client.frame("0200", {3: "200000", 37: sale[37], **client.base(1_000)}) for _ in range(10)]
            client.writer.write(b"".join(frames))  # all ten in flight at once on this connection
            await client.writer.drain()
            return [(await client.read())[1][39] for _ in range(10)]

        codes = [code for batch in await asyncio.gather(*(burst(c) for c in clients)) for code in batch]
        for client in clients:
            await client.close()
        assert codes.count("00") == 10
        assert codes.count("64") == 30
        assert app.ledger is not None
        original = await app.ledger.find_txn("MERCHANT0000001", sale[37])
        assert original is not None and original.refunded_amount == 10_000


async def test_refunds_are_capped_across_two_gateway_instances_sharing_one_ledger(
    tmp_path: Path, mqtt_broker_url: str
) -> None:
    one = gateway_settings(tmp_path, mqtt_broker_url, instance_id="gw-a", mqtt_topic_prefix=f"t/{tmp_path.name}")
    two = gateway_settings(tmp_path, mqtt_broker_url, instance_id="gw-b", mqtt_topic_prefix=f"t/{tmp_path.name}")
    async with running_gateway(one) as app_a, running_gateway(two) as app_b:
        a = await IsoClient.connect(app_a.port)
        b = await IsoClient.connect(app_b.port)
        sale = await a.sale(5_000)

        async def burst(client: IsoClient) -> list[str]:
            frames = [client.frame("0200", {3: "200000", 37: sale[37], **client.base(1_000)}) for _ in range(5)]
            client.writer.write(b"".join(frames))
            await client.writer.drain()
            return [(await client.read())[1][39] for _ in range(5)]

        codes = [c for batch in await asyncio.gather(burst(a), burst(b)) for c in batch]
        await a.close()
        await b.close()
    assert codes.count("00") == 5
    assert codes.count("64") == 5


async def test_only_one_of_two_ledgers_on_one_sqlite_file_relays_the_outbox(tmp_path: Path) -> None:
    from gateway.adapters.ledger import SqliteLedger

    first = await SqliteLedger(tmp_path / "shared.db").open()
    second = await SqliteLedger(tmp_path / "shared.db").open()
    try:
        await on_connection(
            first,
            lambda conn: conn.execute(
                "INSERT INTO outbox(event_id, topic, payload, ordering_key, created_at) "
                "VALUES ('e1', 't', x'7b7d', 'k', 0)"
            ),
        )
        assert [row.event_id for row in await first.pending(10)] == ["e1"]
        assert await second.pending(10) == []  # the first holds the lease
        await first.close()  # releases it
        assert [row.event_id for row in await second.pending(10)] == ["e1"]
    finally:
        await first.close()
        await second.close()


async def test_the_relay_lease_is_renewed_only_once_half_of_it_passed(tmp_path: Path) -> None:
    from gateway.adapters.ledger.sqlite import RELAY_LEASE_S, SqliteLedger

    def changes(conn: sqlite3.Connection) -> int:
        return conn.total_changes

    def expiry(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'relay_lease'").fetchone()[0].split()[1])

    async with SqliteLedger(tmp_path / "ledger.db") as ledger:
        await ledger.pending(10)  # takes the lease
        taken = await on_connection(ledger, changes)
        first = await on_connection(ledger, expiry)
        for _ in range(3):  # polls while the lease is fresh write nothing
            assert await ledger.pending(10) == []
        assert await on_connection(ledger, changes) == taken
        # less than half of the lease left: the next poll renews it
        soon = first - int(RELAY_LEASE_S * 1_000_000) // 2 - 1_000_000
        shorten = "UPDATE meta SET value = substr(value, 1, instr(value, ' ')) || ? WHERE key = 'relay_lease'"
        await on_connection(ledger, lambda conn: conn.execute(shorten, (str(soon),)))
        renewed_from = await on_connection(ledger, changes)
        await ledger.pending(10)
        assert await on_connection(ledger, changes) == renewed_from + 1
        assert await on_connection(ledger, expiry) > first
