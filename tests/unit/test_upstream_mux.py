"""The upstream link's pure half: MUX keys, the link's STANs, the table of requests in flight, backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.adapters.upstream_mux import (
    ECHO,
    SIGN_ON,
    Backoff,
    DuplicateInFlight,
    PendingTable,
    StanAllocator,
    is_response,
    mux_key,
    network_request,
    response_class,
    stamped,
    transmission_time,
)
from gateway.protocol.message import Message

MOMENT = datetime(2026, 12, 7, 21, 44, 58, 176000, tzinfo=UTC)


def test_a_purchase_and_its_answer_share_the_key_of_mti_class_stan_and_terminal() -> None:
    request = Message("0200", {2: "4761739001010119", 11: "000123", 41: "TERM0001"})
    answer = Message("0210", {11: "000123", 39: "00", 41: "TERM0001"})
    assert mux_key(request) == mux_key(answer) == ("021", "000123", "TERM0001")


@pytest.mark.parametrize(
    ("request_mti", "answer_mti"),
    [("0100", "0110"), ("0200", "0210"), ("0201", "0210"), ("0220", "0230"), ("0400", "0410"), ("0420", "0430"),
     ("0421", "0430"), ("0500", "0510"), ("0800", "0810")],
)  # fmt: skip
def test_requests_and_their_repeats_are_answered_in_one_class(request_mti: str, answer_mti: str) -> None:
    assert response_class(request_mti) == response_class(answer_mti) == answer_mti[:3]


def test_another_terminal_another_stan_or_another_class_is_another_key() -> None:
    key = mux_key(Message("0210", {11: "000123", 41: "TERM0001"}))
    assert mux_key(Message("0210", {11: "000123", 41: "TERM0002"})) != key
    assert mux_key(Message("0210", {11: "000124", 41: "TERM0001"})) != key
    assert mux_key(Message("0430", {11: "000123", 41: "TERM0001"})) != key


def test_a_network_message_has_no_terminal_in_its_key() -> None:
    assert mux_key(network_request(ECHO, "000007", MOMENT)) == ("081", "000007", None)
    assert mux_key(Message("0810", {11: "000007", 39: "00", 70: "301"})) == ("081", "000007", None)


def test_a_terminal_id_padded_or_trimmed_by_the_host_is_the_same_terminal() -> None:
    padded, trimmed = Message("0200", {11: "000001", 41: "T1      "}), Message("0210", {11: "000001", 41: "T1"})
    assert mux_key(padded) == mux_key(trimmed)


def test_responses_are_told_from_requests_by_the_third_digit() -> None:
    assert [is_response(mti) for mti in ("0210", "0430", "0810", "0200", "0421", "0800", "02x0", "021")] == [
        True, True, True, False, False, False, False, False]  # fmt: skip
    with pytest.raises(ValueError, match="4 digits"):
        response_class("02")


def test_de7_is_mmddhhmmss_in_utc() -> None:
    assert transmission_time(MOMENT) == "1207214458"
    shanghai = MOMENT.astimezone(timezone(timedelta(hours=8)))
    assert transmission_time(shanghai) == "1207214458"
    with pytest.raises(ValueError, match="timezone-aware"):
        transmission_time(datetime(2026, 1, 1))


def test_stamping_sets_de11_and_de7_and_keeps_the_rest_without_touching_the_original() -> None:
    original = Message("0200", {3: "000000", 7: "0101000000", 11: "999999", 37: "123456789012", 41: "TERM0001"})
    copy = stamped(original, "000042", MOMENT)
    assert copy.fields == {3: "000000", 7: "1207214458", 11: "000042", 37: "123456789012", 41: "TERM0001"}
    assert original.fields[11] == "999999" and original.fields[7] == "0101000000"


def test_a_sign_on_is_an_0800_with_de70_001() -> None:
    message = network_request(SIGN_ON, "000001", MOMENT)
    assert (message.mti, dict(message.fields)) == ("0800", {7: "1207214458", 11: "000001", 70: "001"})


def test_stans_count_from_000001_and_go_round_after_999999() -> None:
    stans = StanAllocator()
    assert [stans.next(lambda stan: False) for _ in range(3)] == ["000001", "000002", "000003"]
    near_end = StanAllocator(last=999_998)
    assert [near_end.next(lambda stan: False) for _ in range(3)] == ["999999", "000001", "000002"]


def test_a_stan_still_in_flight_is_skipped() -> None:
    in_flight = {"000002", "000003"}
    stans = StanAllocator()
    assert [stans.next(in_flight.__contains__) for _ in range(3)] == ["000001", "000004", "000005"]


def test_with_every_stan_in_flight_there_is_none_to_give() -> None:
    with pytest.raises(RuntimeError, match="every STAN is in flight"):
        StanAllocator().next(lambda stan: True)
    with pytest.raises(ValueError, match=r"0\.\.999999"):
        StanAllocator(last=1_000_000)


def test_an_answer_finds_its_waiter_once() -> None:
    table: PendingTable[str] = PendingTable()
    table.add(("021", "000001", "T1"), "caller 1", connection=1)
    assert table.has_stan("000001") and len(table) == 1
    assert table.match(("021", "000001", "T1")) == "caller 1"
    assert table.match(("021", "000001", "T1")) is None  # a second answer is a late one
    assert not table.has_stan("000001") and len(table) == 0


def test_a_key_already_in_flight_is_refused() -> None:
    table: PendingTable[str] = PendingTable()
    table.add(("043", "000009", "T1"), "first 0420", connection=1)
    with pytest.raises(DuplicateInFlight):
        table.add(("043", "000009", "T1"), "its 0421", connection=2)
    table.add(("043", "000009", "T2"), "another terminal", connection=1)
    table.add(("021", "000009", "T1"), "another class", connection=1)
    assert len(table) == 3


def test_a_caller_that_gave_up_is_forgotten_but_not_its_successor() -> None:
    table: PendingTable[str] = PendingTable()
    key = ("021", "000001", "T1")
    table.add(key, "gave up", connection=1)
    table.discard(key, "gave up")
    table.add(key, "successor", connection=1)
    table.discard(key, "gave up")  # the first caller's clean-up comes late: the successor stays
    assert table.match(key) == "successor"


def test_a_dropped_connection_takes_only_its_own_requests() -> None:
    table: PendingTable[str] = PendingTable()
    table.add(("021", "000001", "T1"), "on 1", connection=1)
    table.add(("021", "000002", "T1"), "on 2", connection=2)
    table.add(("081", "000003", None), "echo on 1", connection=1)
    assert (table.count(1), table.count(2)) == (2, 1)
    assert sorted(table.take_connection(1)) == ["echo on 1", "on 1"]
    assert list(table.keys()) == [("021", "000002", "T1")]
    assert not table.has_stan("000001") and table.has_stan("000002")
    assert table.take_all() == ["on 2"] and len(table) == 0


def test_the_same_stan_for_two_terminals_stays_in_flight_until_both_are_answered() -> None:
    table: PendingTable[str] = PendingTable()
    table.add(("021", "000005", "T1"), "a", connection=1)
    table.add(("021", "000005", "T2"), "b", connection=1)
    table.match(("021", "000005", "T1"))
    assert table.has_stan("000005")
    table.match(("021", "000005", "T2"))
    assert not table.has_stan("000005")


def test_backoff_doubles_up_to_its_cap_with_equal_jitter() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0)
    assert [backoff.ceiling(attempt) for attempt in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.ceiling(10_000) == 30.0
    assert backoff.delay(0, 0.0) == 0.25 and backoff.delay(0, 0.999) < 0.5
    assert backoff.delay(20, 0.0) == 15.0
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        Backoff(initial_s=2, max_s=1)
