"""The PostgreSQL ledger against a real server: same answers as SQLite, and safe across instances.

Every test works in its own schema (``postgres_schema``); "two instances" are two PostgresLedger
objects with two connection pools on that schema, as two gateway processes would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import time, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from ledger_scripts import (
    CARD_A,
    CARD_B,
    MID,
    POLICY,
    START,
    T1,
    Ledger,
    Script,
    Till,
    de90,
    render,
    scripted_business_day,
    scripted_refund_controls_ii,
    stored,
)
from postgres import connect_to_schema, postgres_schema, postgres_url, schema_settings

from gateway.adapters.ledger import PostgresLedger, SqliteLedger
from gateway.adapters.ledger.schema import VERSION
from gateway.core.cards import luhn_valid
from gateway.core.model import Kind, Reference, SettlementTotals, TxnStatus
from gateway.core.policy import Policy

__all__ = ["postgres_schema", "postgres_url"]  # fixtures used by the tests below

pytestmark = pytest.mark.postgres


def _ledger(url: str, schema: str, **kwargs: Any) -> PostgresLedger:
    return PostgresLedger(url, server_settings=schema_settings(schema), **kwargs)


async def test_issue_20_sequences_get_the_same_answers_balances_and_cases_as_the_sqlite_ledger(
    tmp_path: Path, postgres_url: str, postgres_schema: str
) -> None:
    till = partial(Till, replace(POLICY, cutoff=time(23, 30)))

    async def run(ledger: Ledger) -> tuple[Script, list[tuple[object, ...]], list[tuple[object, ...]], list[str]]:
        script = Script(ledger, till())
        await scripted_refund_controls_ii(script)
        cases: list[tuple[object, ...]] = [
            (c.kind, c.original_rrn == script.rrn("sale2"), c.details["reversed_amount"], c.details["refunded_amount"],
             c.details["credited_beyond"], [line["amount"] for line in c.details["refunds"]])  # type: ignore[attr-defined]
            for c in await ledger.list_exceptions()
        ]  # fmt: skip
        topics = [row.topic for row in await ledger.pending(1000)]
        return script, stored(await ledger.all_txns()), cases, topics

    async with SqliteLedger(tmp_path / "ledger.db", synchronous="OFF") as sqlite:
        lite, lite_txns, lite_cases, lite_topics = await run(sqlite)
    async with _ledger(postgres_url, postgres_schema) as pg:
        post, pg_txns, pg_cases, pg_topics = await run(pg)

    assert post.trace == lite.trace
    assert (pg_txns, pg_cases, pg_topics) == (lite_txns, lite_cases, lite_topics)
    answers = {label: (code, reason) for label, code, reason, _, _ in post.trace}
    assert answers["late_refund_arrives"] == ("12", "reversed_before_arrival")
    assert answers["refund1_new_de7"] == ("00", "approved") and post.results["refund1_new_de7"].replayed
    assert answers["refund1_other_amount"] == ("94", "duplicate_conflict")
    assert answers["reverse_other_terminal"] == ("25", "reversal_unmatched")
    assert answers["reverse_by_stan_wrong_amount"] == ("25", "reversal_unmatched")
    assert answers["advice_over_refund"] == ("00", "approved")
    assert answers["void_after_cutoff"] == ("12", "batch_settled")
    assert answers["settle_across_the_cutoff"][0] == "00"
    assert answers["settle_again"][0] == "00"
    assert pg_cases == [("reversal_conflict", True, 5_000, 5_000, 5_000, [5_000])]
    assert sum(topic.endswith("/batch/closed") for topic in pg_topics) == 1
    assert sum(topic.endswith("/reversal/conflict") for topic in pg_topics) == 1


async def _run_script(ledger: Ledger) -> tuple[Script, list[tuple[object, ...]], list[tuple[object, ...]], list[str]]:
    script = Script(ledger)
    await scripted_business_day(script)
    batches: list[tuple[object, ...]] = [
        (b.terminal_id, b.batch_no, b.state, b.debit_count, b.debit_amount, b.credit_count, b.credit_amount, b.result)
        for b in await ledger.list_batches()
    ]
    topics = [row.topic for row in await ledger.pending(1000)]
    return script, stored(await ledger.all_txns()), batches, topics


async def test_a_scripted_business_day_gets_the_same_answers_and_balances_as_the_sqlite_ledger(
    tmp_path: Path, postgres_url: str, postgres_schema: str
) -> None:
    async with SqliteLedger(tmp_path / "ledger.db", synchronous="OFF") as sqlite:
        lite, lite_txns, lite_batches, lite_topics = await _run_script(sqlite)
    async with _ledger(postgres_url, postgres_schema) as pg:
        post, pg_txns, pg_batches, pg_topics = await _run_script(pg)

    assert post.trace == lite.trace
    assert pg_txns == lite_txns
    assert pg_batches == lite_batches
    assert pg_topics == lite_topics
    # and the script did exercise what it says (a few anchors, not the whole trace)
    expected = {
        "refund1": "00",
        "refund_too_much": "64",
        "refund_other_card": "14",
        "void2": "00",
        "void2_again": "12",
        "void_settled": "12",
        "complete1": "00",
        "complete_again": "12",
        "ghost_arrives": "12",
        "reverse_unknown": "25",
        "refund_rest_repeat": "00",
        "refund_rest_conflict": "94",
        "settle_t1": "00",
        "settle_t2": "95",
        "refund_out_of_window": "12",
    }
    answers = {label: code for label, code, _, _, _ in post.trace}
    assert {label: answers[label] for label in expected} == expected
    assert post.results["refund_rest_repeat"].replayed
    assert post.results["refund_rest_repeat"].rrn == post.results["refund_rest"].rrn


async def test_forty_concurrent_refunds_of_1000_through_two_instances_approve_exactly_ten_of_a_10000_sale(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema, max_size=10) as first,
        _ledger(postgres_url, postgres_schema, max_size=10) as second,
    ):
        sale = await first.process(till.sale(10_000), till.ctx(), render)
        assert sale.response_code == "00"
        assert sale.rrn is not None
        refunds = [till.refund(sale.rrn, 1_000) for _ in range(40)]
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(request, ctx, render) for n, request in enumerate(refunds))
        )
        original = await second.find_txn(MID, sale.rrn)
        txns = await first.all_txns()

    codes = sorted(result.response_code for result in results)
    assert codes == ["00"] * 10 + ["64"] * 30
    assert {r.reason for r in results if r.response_code == "64"} == {"exceeds_refundable"}
    assert original is not None
    assert original.refunded_amount == 10_000
    assert original.refundable == 0
    approved = [t for t in txns if t.kind is Kind.REFUND and t.status is TxnStatus.APPROVED]
    assert sum(t.amount for t in approved) == 10_000
    assert len(approved) == 10


async def test_the_same_retransmission_arriving_at_two_instances_at_once_is_recorded_once(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        sale = await first.process(till.sale(10_000), till.ctx(), render)
        assert sale.rrn is not None
        refund = till.refund(sale.rrn, 2_500)
        repeat = replace(refund, mti="0201")
        ctx = till.ctx()
        copies = [refund, repeat] * 5
        results = await asyncio.gather(
            *((first if n % 2 else second).process(copy, ctx, render) for n, copy in enumerate(copies))
        )
        txns = await second.all_txns()
        original = await first.find_txn(MID, sale.rrn)
        topics = [row.topic for row in await first.pending(100)]

    assert [t.kind for t in txns] == [Kind.PURCHASE, Kind.REFUND]
    assert {(r.response_code, r.rrn, r.approval_code) for r in results} == {("00", txns[1].rrn, txns[1].approval_code)}
    assert sorted(r.replayed for r in results) == [False] + [True] * 9
    assert original is not None
    assert original.refunded_amount == 2_500
    assert sorted(topic.split("/")[-2:] for topic in topics) == [["duplicate", "replayed"]] * 9 + [
        ["refund", "approved"]
    ]


async def test_a_reversal_racing_its_original_through_another_instance_never_leaves_the_original_standing(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        pairs = []
        for n in range(25):
            sale = till.sale(1_000 + n, stan=f"{500 + n:06d}")
            reversal = till.request(
                Kind.REVERSAL, "0400", "000000", sale.amount, reference=de90(sale), stan=f"{800 + n:06d}"
            )
            pairs.append((sale, reversal))
        ctx = till.ctx()
        outcomes = await asyncio.gather(
            *(
                asyncio.gather(first.process(sale, ctx, render), second.process(reversal, ctx, render))
                for sale, reversal in pairs
            )
        )
        txns = {(t.kind, t.stan): t for t in await first.all_txns()}

    for (sale, reversal), (sale_result, reversal_result) in zip(pairs, outcomes, strict=True):
        stored_sale = txns[(Kind.PURCHASE, sale.stan)]
        if sale_result.response_code == "00":
            # the reversal came second and found it
            assert reversal_result.response_code == "00"
            assert stored_sale.status is TxnStatus.REVERSED
        else:
            # the reversal came first and left a tombstone that refused the late original
            assert (reversal_result.response_code, reversal_result.reason) == ("25", "reversal_unmatched")
            assert sale_result.reason == "reversed_before_arrival"
            assert txns[(Kind.REVERSAL, reversal.stan)].status is TxnStatus.UNMATCHED
        assert stored_sale.status is not TxnStatus.APPROVED


async def test_first_purchases_of_a_terminal_through_two_instances_open_exactly_one_batch(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        sales = [till.sale(100 + n) for n in range(30)]
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(sale, ctx, render) for n, sale in enumerate(sales))
        )
        batches = await first.list_batches()
        txns = await second.all_txns()

    assert {r.response_code for r in results} == {"00"}
    assert [(b.terminal_id, b.batch_no, b.state.value, b.debit_count) for b in batches] == [(T1, "000001", "open", 30)]
    assert len({t.batch_id for t in txns}) == 1


async def test_a_settlement_racing_purchases_on_another_instance_counts_exactly_what_its_batch_holds(
    postgres_url: str, postgres_schema: str
) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        assert (await first.process(till.sale(1), till.ctx(), render)).response_code == "00"
        sales = [till.sale(100 + n) for n in range(30)]
        settlement = till.request(Kind.SETTLEMENT, "0500", "920000", None, totals=SettlementTotals(0, 0, 0, 0))
        ctx = till.ctx()
        tasks = [asyncio.create_task(first.process(sale, ctx, render)) for sale in sales[:15]]
        tasks.append(asyncio.create_task(second.process(settlement, ctx, render)))
        tasks += [asyncio.create_task(first.process(sale, ctx, render)) for sale in sales[15:]]
        await asyncio.gather(*tasks)
        batches = await second.list_batches()
        conn = await connect_to_schema(postgres_url, postgres_schema)
        try:
            stored = await conn.fetchval("SELECT ledger_totals FROM batches WHERE state = 'closed'")
        finally:
            await conn.close()

    # the settlement closed batch 1; purchases that came after it opened batch 2
    closed = batches[0]
    assert (closed.batch_no, closed.state.value) == ("000001", "closed")
    assert [(b.batch_no, b.state.value) for b in batches[1:]] in ([], [("000002", "open")])
    # the totals the settlement computed are those of every purchase that ended up in its batch
    assert stored == f"0,0,{closed.debit_count},{closed.debit_amount}"
    assert sum(b.debit_count for b in batches) == 31


def _card(n: int) -> str:
    """A distinct card number that passes the Luhn check."""
    body = f"476173{n:09d}"
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


@pytest.mark.parametrize(
    ("policy", "per_card", "declined"),
    [
        pytest.param(Policy(terminal_daily_refund_count=5), False, ("65", "refund_velocity_count"), id="terminal"),
        pytest.param(Policy(card_daily_refund_amount=500), True, ("61", "refund_velocity_amount"), id="card"),
    ],
)
async def test_daily_refund_limits_of_a_terminal_or_a_card_hold_across_instances(
    postgres_url: str, postgres_schema: str, policy: Policy, per_card: bool, declined: tuple[str, str]
) -> None:
    """Sixteen refunds of 100 against sixteen sales: on one terminal (other cards), or of one card (16 terminals)."""
    till = Till(policy=policy)
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        refunds = []
        for n in range(16):
            card, terminal = (CARD_A, f"TERM{n:04d}") if per_card else (_card(n), T1)
            sale = await first.process(till.sale(1_000, card=card, terminal=terminal), till.ctx(), render)
            refunds.append(till.refund(sale.rrn, 100, card=card, terminal=terminal))
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(refund, ctx, render) for n, refund in enumerate(refunds))
        )

    assert sorted(r.response_code for r in results) == ["00"] * 5 + [declined[0]] * 11
    assert {r.reason for r in results if r.response_code != "00"} == {declined[1]}


async def test_rrns_are_unique_twelve_digit_numbers_across_instances(postgres_url: str, postgres_schema: str) -> None:
    till = Till()
    async with (
        _ledger(postgres_url, postgres_schema) as first,
        _ledger(postgres_url, postgres_schema) as second,
    ):
        sales = [till.sale(100) for _ in range(40)]
        ctx = till.ctx()
        results = await asyncio.gather(
            *((first if n % 2 else second).process(sale, ctx, render) for n, sale in enumerate(sales))
        )
    rrns = [r.rrn for r in results]
    assert all(rrn is not None and len(rrn) == 12 and rrn.isdigit() for rrn in rrns)
    assert len(set(rrns)) == 40


async def test_a_deadlock_rolls_the_request_back_and_runs_it_again(postgres_url: str, postgres_schema: str) -> None:
    """An outside session locks the batch, then the original, against a void that locked them the other way."""
    name = f"deadlock-{postgres_schema}"
    settings = {**schema_settings(postgres_schema), "application_name": name, "deadlock_timeout": "300ms"}
    try:
        ledger = await PostgresLedger(postgres_url, server_settings=settings).open()
    except asyncpg.InsufficientPrivilegeError:
        pytest.skip("setting deadlock_timeout needs a superuser")
    till = Till()
    other = await connect_to_schema(postgres_url, postgres_schema)
    try:
        await other.execute("SET deadlock_timeout = '10s'")
        sale_request = till.sale(4_000)
        sale = await ledger.process(sale_request, till.ctx(), render)
        assert sale.rrn is not None
        stored = await ledger.find_txn(MID, sale.rrn)
        assert stored is not None
        void = till.request(Kind.VOID, "0200", "020000", 4_000, reference=Reference(rrn=sale.rrn))

        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM batches WHERE id = $1 FOR UPDATE", stored.batch_id)
        task = asyncio.create_task(ledger.process(void, till.ctx(), render))
        await _until(
            lambda: other.fetchval(
                "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                name,
            ),
            what="the void to wait for the batch",
            within=20.0,
        )
        # the void holds the sale's row and waits for the batch: close the cycle
        await asyncio.wait_for(other.execute("SELECT 1 FROM txns WHERE id = $1 FOR UPDATE", stored.id), 30)
        await tx.commit()
        result = await asyncio.wait_for(task, 30)
        after = await ledger.find_txn(MID, sale.rrn)
    finally:
        await other.close()
        await ledger.close()

    assert ledger.retries >= 1  # the deadlock victim was run again (a loaded machine may need two tries)
    assert result.response_code == "00"
    assert after is not None
    assert after.status is TxnStatus.VOIDED


async def _until(check: Callable[[], Awaitable[Any]], *, what: str, within: float = 5.0) -> None:
    """Poll ``check`` until it is true; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_migrations_run_once_even_when_instances_start_together(postgres_url: str, postgres_schema: str) -> None:
    ledgers = [_ledger(postgres_url, postgres_schema) for _ in range(3)]
    await asyncio.gather(*(ledger.open() for ledger in ledgers))
    for ledger in ledgers:
        await ledger.close()
    async with _ledger(postgres_url, postgres_schema) as again:
        assert again.schema == postgres_schema
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
        types = dict(
            await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = $1 AND table_name = 'txns' AND column_name IN ('amount', 'created_at')",
                postgres_schema,
            )
        )
    finally:
        await conn.close()
    assert [row["version"] for row in versions] == [VERSION]
    assert types == {"amount": "bigint", "created_at": "timestamp with time zone"}


async def _shape(conn: asyncpg.Connection, schema: str) -> dict[str, object]:
    """Columns (table, name, type, nullable, default) and index definitions of a schema, named alike."""
    columns = await conn.fetch(
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = $1 ORDER BY table_name, column_name",
        schema,
    )
    indexes = await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema)
    return {
        "columns": [tuple(str(v).replace(f"{schema}.", "") for v in row) for row in columns],
        "indexes": sorted((row[0], row[1].replace(f"{schema}.", "")) for row in indexes),
    }


async def test_a_ledger_of_schema_version_1_is_upgraded_to_the_schema_of_a_new_ledger(
    postgres_url: str, postgres_schema: str
) -> None:
    legacy = (Path(__file__).parent.parent / "data" / "postgres_ledger_v1.sql").read_text()
    sent_at = START + timedelta(minutes=5)
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        async with conn.transaction():
            await conn.execute(legacy)
            await conn.execute(
                "CREATE TABLE schema_version (version integer PRIMARY KEY, description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await conn.execute("INSERT INTO schema_version (version, description) VALUES (1, 'wave 1')")
            await conn.execute(
                "UPDATE relay_state SET last_error = 'broker unreachable', last_error_at = $1, last_sent_at = $1",
                sent_at,
            )
            await conn.execute(
                "INSERT INTO batches (merchant_id, terminal_id, batch_no, state, opened_at, closed_at, result)"
                " VALUES ($1, $2, '000001', 'closed', $3, $3, 'cutoff')",
                MID, T1, START,
            )  # fmt: skip
    finally:
        await conn.close()

    async with _ledger(postgres_url, postgres_schema) as ledger:
        status = await ledger.status()
        batches = await ledger.list_batches()
        sale = await ledger.process(Till().sale(100), Till().ctx(), render)
    assert (status.last_error, status.last_error_at, status.last_sent_at) == ("broker unreachable", sent_at, sent_at)
    assert [(b.state.value, b.result) for b in batches] == [("closed", "cutoff")]
    assert sale.response_code == "00"

    fresh = f"{postgres_schema}_new"
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        await conn.execute(f'CREATE SCHEMA "{fresh}"')
        try:
            async with _ledger(postgres_url, fresh):
                pass
            old_shape, new_shape = await _shape(conn, postgres_schema), await _shape(conn, fresh)
            versions = await conn.fetch("SELECT version FROM schema_version ORDER BY version")
        finally:
            await conn.execute(f'DROP SCHEMA "{fresh}" CASCADE')
    finally:
        await conn.close()
    assert [row["version"] for row in versions] == [1, VERSION]
    assert old_shape == new_shape


async def test_a_schema_newer_than_this_release_is_refused(postgres_url: str, postgres_schema: str) -> None:
    async with _ledger(postgres_url, postgres_schema):
        pass
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        await conn.execute("INSERT INTO schema_version (version, description) VALUES ($1, 'from the future')", 99)
    finally:
        await conn.close()
    with pytest.raises(RuntimeError, match="version 99"):
        await _ledger(postgres_url, postgres_schema).open()


async def test_the_url_may_name_the_schema_as_a_server_setting(postgres_url: str, postgres_schema: str) -> None:
    separator = "&" if "?" in postgres_url else "?"
    async with PostgresLedger(f"{postgres_url}{separator}search_path={postgres_schema}") as ledger:
        assert ledger.schema == postgres_schema


async def test_the_database_holds_no_full_card_number(postgres_url: str, postgres_schema: str) -> None:
    script_ledger = _ledger(postgres_url, postgres_schema)
    async with script_ledger:
        await scripted_business_day(Script(script_ledger))
    conn = await connect_to_schema(postgres_url, postgres_schema)
    try:
        txns = await conn.fetch("SELECT t::text FROM txns t")
        outbox = await conn.fetch("SELECT payload FROM outbox")
    finally:
        await conn.close()
    dumped = "\n".join(row[0] for row in txns) + "\n".join(bytes(row[0]).decode() for row in outbox)
    assert "476173******0119" in dumped
    assert CARD_A not in dumped
    assert CARD_B not in dumped


async def test_a_reversal_left_unmatched_by_another_sqlite_ledger_refuses_the_late_original(tmp_path: Path) -> None:
    """The SQLite ledger skips the tombstone lookup for terminals without unmatched reversals; that
    knowledge is dropped whenever another process committed (here: the ledger that recorded one)."""
    till = Till()
    async with (
        SqliteLedger(tmp_path / "shared.db", synchronous="OFF") as first,
        SqliteLedger(tmp_path / "shared.db", synchronous="OFF") as second,
    ):
        warm = await first.process(till.sale(1_000), till.ctx(), render)
        assert warm.response_code == "00"  # the first ledger has looked: no unmatched reversal anywhere
        sale = till.sale(2_000, stan="000200")
        reversal = till.request(Kind.REVERSAL, "0400", "000000", sale.amount, reference=de90(sale), stan="000300")
        unmatched = await second.process(reversal, till.ctx(), render)
        assert (unmatched.response_code, unmatched.reason) == ("25", "reversal_unmatched")
        late = await first.process(sale, till.ctx(), render)
        assert late.reason == "reversed_before_arrival"
        # and within one ledger: its own unmatched reversal refuses the next late original at once
        sale2 = till.sale(3_000, stan="000400")
        reversal2 = till.request(Kind.REVERSAL, "0400", "000000", sale2.amount, reference=de90(sale2), stan="000500")
        assert (await first.process(reversal2, till.ctx(), render)).reason == "reversal_unmatched"
        assert (await first.process(sale2, till.ctx(), render)).reason == "reversed_before_arrival"
