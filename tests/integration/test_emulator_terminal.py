"""The terminal over real TCP against small hosts that record what they receive."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from terminal_emulator import (
    ConnectionFailed,
    ConnectionLost,
    IsoMessage,
    ResponseTimeout,
    ReversalPending,
    Terminal,
    load_journal,
    load_profile,
)
from terminal_emulator.messages import Totals
from terminal_emulator.testing import StubHost, approve

PROFILE = load_profile("iso87-binary")
PAN = "4761739001010119"
OTHER_PAN = "5500005555555559"


def swallowing(host_ref: list[StubHost], swallow: Callable[[IsoMessage], bool]) -> Callable[[IsoMessage],
                                                                                             IsoMessage | None]:
    """A handler that answers like the stub host except for the requests ``swallow`` picks."""

    def handler(message: IsoMessage) -> IsoMessage | None:
        if swallow(message):
            return None
        return host_ref[0].approve_all(message)

    return handler


def first_sale_only() -> Callable[[IsoMessage], bool]:
    seen: list[IsoMessage] = []

    def pick(message: IsoMessage) -> bool:
        if message.mti == "0200" and message.fields[3] == "000000" and not seen:
            seen.append(message)
            return True
        return False

    return pick


async def test_a_sale_is_approved_and_the_journal_keeps_only_the_masked_pan(tmp_path: Path) -> None:
    journal_path = tmp_path / "journal.json"
    async with StubHost(PROFILE) as host, Terminal(port=host.port, profile=PROFILE, journal=journal_path,
                                                   timeout=2) as terminal:
        sale = await terminal.sale(1234)
    assert sale.approved
    assert sale.rrn == "000000000001"
    request = host.messages[0]
    assert (request.mti, request.fields[2], request.fields[4], request.fields[41]) == ("0200", PAN,
                                                                                         "000000001234", "TERM0001")
    text = journal_path.read_text()
    assert PAN not in text
    assert "476173******0119" in text
    journal = load_journal(journal_path)
    assert journal.stan == 1
    assert journal.pending_reversal is None
    assert journal.transactions[0].status == "approved"


async def test_a_swallowed_sale_times_out_and_its_reversal_goes_out_before_the_next_request() -> None:
    ref: list[StubHost] = []
    async with StubHost(PROFILE, swallowing(ref, first_sale_only())) as host:
        ref.append(host)
        async with Terminal(port=host.port, profile=PROFILE, timeout=0.3) as terminal:
            with pytest.raises(ResponseTimeout) as timed_out:
                await terminal.sale(2000)
            assert timed_out.value.exchange is not None
            assert timed_out.value.exchange.outcome == "timeout"
            assert terminal.journal.pending_reversal is not None
            second = await terminal.sale(1500)
            totals = terminal.journal.totals()
    lost, reversal, sale = host.messages
    assert [lost.mti, reversal.mti, sale.mti] == ["0200", "0400", "0200"]
    assert reversal.fields[90] == "0200" + lost.fields[11] + lost.fields[7] + "0" * 22
    assert reversal.fields[4] == lost.fields[4]
    assert reversal.fields[3] == "000000"
    assert reversal.fields[2] == PAN
    assert reversal.fields[11] not in (lost.fields[11], sale.fields[11])
    assert second.approved
    assert totals == Totals(debits_count=1, debits_amount=1500)


async def test_an_unanswered_reversal_is_repeated_as_0401_three_times_then_nothing_new_is_sent() -> None:
    answering = {"reversals": False}
    ref: list[StubHost] = []

    def swallow(message: IsoMessage) -> bool:
        if message.mti.startswith("04"):
            return not answering["reversals"]
        return message.mti == "0200" and message.fields[4] == "000000002000"

    async with StubHost(PROFILE, swallowing(ref, swallow)) as host:
        ref.append(host)
        async with Terminal(port=host.port, profile=PROFILE, timeout=0.2) as terminal:
            with pytest.raises(ResponseTimeout):
                await terminal.sale(2000)
            with pytest.raises(ReversalPending):
                await terminal.sale(1500)
            assert host.mtis == ["0200", "0400", "0401", "0401", "0401"]
            first, *repeats = host.messages[1:]
            assert all(r.fields[11] == first.fields[11] and r.fields[7] == first.fields[7] for r in repeats)
            assert terminal.journal.pending_reversal is not None
            answering["reversals"] = True
            sale = await terminal.sale(1500)
    assert host.mtis[5:] == ["0401", "0200"]
    assert sale.approved


async def test_a_pending_reversal_survives_the_process_and_is_sent_with_the_card_of_the_next_one(
    tmp_path: Path,
) -> None:
    journal_path = tmp_path / "journal.json"
    ref: list[StubHost] = []
    async with StubHost(PROFILE, swallowing(ref, first_sale_only())) as host:
        ref.append(host)
        async with Terminal(port=host.port, profile=PROFILE, journal=journal_path, timeout=0.2) as first:
            with pytest.raises(ResponseTimeout):
                await first.sale(700, pan=OTHER_PAN)
        assert OTHER_PAN not in journal_path.read_text()
        assert load_journal(journal_path).pending_reversal is not None
        async with Terminal(port=host.port, profile=PROFILE, journal=journal_path, timeout=2) as second:
            await second.echo()
            assert host.mtis == ["0200", "0800"]
            await second.settle()
    assert host.mtis == ["0200", "0800", "0400", "0500"]
    reversal, settlement = host.messages[2], host.messages[3]
    assert reversal.fields[2] == PAN  # the journal has no PAN: the card at hand is used
    assert settlement.fields[76] == "0000000000"
    journal = load_journal(journal_path)
    assert journal.pending_reversal is None
    assert journal.transactions[0].status == "reversed"
    assert journal.batch == 2


async def test_a_connection_the_host_hangs_up_leaves_the_reversal_pending() -> None:
    async with StubHost(PROFILE) as host:
        host.hang_up_next()
        async with Terminal(port=host.port, profile=PROFILE, timeout=2) as terminal:
            with pytest.raises(ConnectionLost):
                await terminal.sale(999)
            assert terminal.journal.pending_reversal is not None
            await terminal.echo()
            await terminal.sale(100)
    assert host.mtis == ["0200", "0800", "0400", "0200"]


async def test_an_unreachable_host_fails_fast_and_leaves_nothing_to_reverse() -> None:
    async with StubHost(PROFILE) as host:
        port = host.port
    terminal = Terminal(port=port, profile=PROFILE, timeout=1)
    with pytest.raises(ConnectionFailed):
        await terminal.sale(100)
    assert terminal.journal.pending_reversal is None
    assert terminal.journal.transactions == []


async def test_void_and_refund_take_amount_and_reference_from_the_journal() -> None:
    async with StubHost(PROFILE) as host, Terminal(port=host.port, profile=PROFILE, timeout=2) as terminal:
        sale = await terminal.sale(1234)
        assert sale.rrn is not None
        await terminal.refund(sale.rrn, amount=234)
        refund_rest = await terminal.refund(sale.rrn)
        sale2 = await terminal.sale(800)
        assert sale2.rrn is not None
        await terminal.void(sale2.rrn)
    refund1, refund2, void = host.messages[1], host.messages[2], host.messages[4]
    assert (refund1.fields[3], refund1.fields[37], refund1.fields[4]) == ("200000", sale.rrn, "000000000234")
    assert refund2.fields[4] == "000000001000"
    assert refund_rest.approved
    assert (void.fields[3], void.fields[37], void.fields[4]) == ("020000", sale2.rrn, "000000000800")


async def test_a_completion_points_at_the_preauth_by_de90_and_carries_its_approval_code() -> None:
    async with StubHost(PROFILE) as host, Terminal(port=host.port, profile=PROFILE, timeout=2) as terminal:
        auth = await terminal.preauth(10000)
        await terminal.complete(amount=11000)
    preauth, completion = host.messages
    assert completion.mti == "0220"
    assert completion.fields[90] == "0100" + preauth.fields[11] + preauth.fields[7] + "0" * 22
    assert completion.fields[38] == auth.approval_code
    assert completion.fields[4] == "000000011000"


async def test_a_manual_partial_reversal_advice_sends_0420_with_de95() -> None:
    async with StubHost(PROFILE) as host, Terminal(port=host.port, profile=PROFILE, timeout=2) as terminal:
        sale = await terminal.sale(1000)
        await terminal.reverse(sale.rrn, advice=True, partial_amount=600)
        totals = terminal.journal.totals()
    advice = host.messages[1]
    assert advice.mti == "0420"
    assert advice.fields[95] == "000000000600" + "0" * 30
    assert totals == Totals(debits_count=1, debits_amount=600)


async def test_a_lost_answer_is_treated_as_a_timeout_although_the_host_answered() -> None:
    async with StubHost(PROFILE) as host, Terminal(port=host.port, profile=PROFILE, timeout=2) as terminal:
        terminal.lose_next_response()
        with pytest.raises(ResponseTimeout) as lost:
            await terminal.sale(2000)
        assert lost.value.exchange is not None
        assert lost.value.exchange.outcome == "lost"
        assert lost.value.exchange.response_code == "00"
        await terminal.sale(100)
    assert host.mtis == ["0200", "0400", "0200"]


async def test_an_answered_retransmission_makes_the_stored_reversal_unnecessary() -> None:
    async with StubHost(PROFILE) as host, Terminal(port=host.port, profile=PROFILE, timeout=2) as terminal:
        terminal.lose_next_response()
        with pytest.raises(ResponseTimeout) as lost:
            await terminal.sale(2000)
        assert lost.value.exchange is not None
        again = await terminal.resend(lost.value.exchange, mti="0201")
        assert again.approved
        assert terminal.journal.pending_reversal is None
        await terminal.sale(100)
    assert host.mtis == ["0200", "0201", "0200"]
    assert host.messages[1].fields[11] == host.messages[0].fields[11]


async def test_the_ascii_profile_speaks_four_digit_lengths_and_hex_bitmaps() -> None:
    profile = load_profile("iso87-ascii")
    async with StubHost(profile) as host, Terminal(port=host.port, profile=profile, timeout=2) as terminal:
        sale = await terminal.sale(1234)
    assert sale.approved
    wire = bytes(host.streams[0])
    assert wire[:4].isdigit()
    assert int(wire[:4]) == len(wire) - 4
    assert wire[4:8] == b"0200"
    assert all(chr(b) in "0123456789ABCDEF" for b in wire[8:24])


async def test_every_exchange_is_reported_including_the_reversals_the_terminal_sends_itself() -> None:
    seen: list[tuple[str, str]] = []
    async with StubHost(PROFILE) as host, Terminal(
        port=host.port, profile=PROFILE, timeout=2, on_exchange=lambda e: seen.append((e.kind, e.outcome))
    ) as terminal:
        terminal.lose_next_response()
        with pytest.raises(ResponseTimeout):
            await terminal.sale(100)
        await terminal.sale(200)
    assert seen == [("purchase", "lost"), ("reversal", "answered"), ("purchase", "answered")]


async def test_declined_answers_are_journaled_as_declined_and_count_nowhere() -> None:
    async with StubHost(PROFILE, lambda m: approve(m, rrn="000000000009", code="05")) as host, Terminal(
        port=host.port, profile=PROFILE, timeout=2
    ) as terminal:
        sale = await terminal.sale(100)
    assert not sale.approved
    assert sale.response_code == "05"
    assert terminal.journal.transactions[0].status == "declined"
    assert terminal.journal.totals() == Totals()
