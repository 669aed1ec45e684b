"""Properties of the upstream MUX: STANs in flight are never handed out twice, every answer reaches the
caller whose request it answers (whatever the order), and backoff stays within its bounds."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from gateway.adapters.upstream_mux import (
    MAX_STAN,
    Backoff,
    PendingTable,
    StanAllocator,
    is_response,
    mux_key,
    response_class,
    stamped,
)
from gateway.protocol.message import Message

REQUEST_MTIS = st.sampled_from(["0100", "0200", "0201", "0220", "0221", "0400", "0401", "0420", "0421", "0500"])
TERMINALS = st.sampled_from(["TERM0001", "TERM0002", "T3      ", "12345678"])


def answer_mti(request_mti: str) -> str:
    return response_class(request_mti) + "0"


@given(mti=REQUEST_MTIS, stan=st.integers(1, MAX_STAN), terminal=TERMINALS)
def test_the_answer_to_any_request_has_the_requests_key(mti: str, stan: int, terminal: str) -> None:
    request = Message(mti, {11: f"{stan:06d}", 41: terminal})
    answer = Message(answer_mti(mti), {11: f"{stan:06d}", 39: "00", 41: terminal.rstrip()})
    assert is_response(answer.mti) and not is_response(request.mti)
    assert mux_key(request) == mux_key(answer)


@given(start=st.integers(0, MAX_STAN), in_flight=st.sets(st.integers(1, MAX_STAN), max_size=50),
       count=st.integers(1, 60))  # fmt: skip
def test_a_stan_in_flight_is_never_handed_out_and_none_twice_while_in_flight(
    start: int, in_flight: set[int], count: int
) -> None:
    busy = {f"{stan:06d}" for stan in in_flight}
    stans = StanAllocator(last=start)
    for _ in range(count):
        stan = stans.next(busy.__contains__)
        assert stan not in busy
        assert len(stan) == 6 and stan.isdigit() and 1 <= int(stan) <= MAX_STAN
        busy.add(stan)  # it goes out, so it is in flight now


@given(moment=st.datetimes(timezones=st.just(UTC)), stan=st.integers(1, MAX_STAN))
def test_stamping_changes_de7_and_de11_only(moment: datetime, stan: int) -> None:
    original = Message("0200", {3: "000000", 4: "000000001000", 11: "000001", 41: "TERM0001", 49: "840"})
    copy = stamped(original, f"{stan:06d}", moment)
    untouched = {number: value for number, value in original.fields.items() if number != 11}
    assert {number: value for number, value in copy.fields.items() if number not in (7, 11)} == untouched
    assert copy.fields[11] == f"{stan:06d}" and len(copy.fields[7]) == 10 and copy.fields[7].isdigit()


@given(initial=st.floats(0.001, 10), factor=st.floats(1, 1000), attempt=st.integers(0, 10_000),
       unit=st.floats(0, 1, exclude_max=True))  # fmt: skip
def test_backoff_is_between_half_its_ceiling_and_the_cap(
    initial: float, factor: float, attempt: int, unit: float
) -> None:
    backoff = Backoff(initial, initial * factor)
    delay = backoff.delay(attempt, unit)
    assert backoff.ceiling(attempt) / 2 <= delay <= backoff.ceiling(attempt) <= backoff.max_s
    assert backoff.ceiling(attempt) <= backoff.ceiling(attempt + 1)


class InFlight(RuleBasedStateMachine):
    """Requests go out with the allocator's STANs; answers come back in any order, some late, some
    connections drop: each caller gets its own answer or nothing, never another's."""

    sent = Bundle("sent")

    def __init__(self) -> None:
        super().__init__()
        self.table: PendingTable[tuple[str, str, str]] = PendingTable()
        self.stans = StanAllocator(last=MAX_STAN - 5)  # go round the end of the range too
        self.waiting: dict[tuple[str, str, str], int] = {}  # caller -> connection

    @rule(target=sent, mti=REQUEST_MTIS, terminal=TERMINALS, connection=st.integers(1, 3))
    def send(self, mti: str, terminal: str, connection: int) -> tuple[str, str, str]:
        stan = self.stans.next(self.table.has_stan)
        caller = (mti, stan, terminal)
        self.table.add(mux_key(Message(mti, {11: stan, 41: terminal})), caller, connection)
        self.waiting[caller] = connection
        return caller

    @rule(caller=consumes(sent))
    def answer(self, caller: tuple[str, str, str]) -> None:
        mti, stan, terminal = caller
        found = self.table.match(mux_key(Message(answer_mti(mti), {11: stan, 39: "00", 41: terminal})))
        if caller in self.waiting:
            assert found == caller
            del self.waiting[caller]
        else:  # it gave up or its connection dropped: a late answer
            assert found is None

    @rule(caller=sent)
    def give_up(self, caller: tuple[str, str, str]) -> None:
        mti, stan, terminal = caller
        self.table.discard(mux_key(Message(mti, {11: stan, 41: terminal})), caller)
        self.waiting.pop(caller, None)

    @rule(connection=st.integers(1, 3))
    def drop(self, connection: int) -> None:
        expected = {caller for caller, on in self.waiting.items() if on == connection}
        assert set(self.table.take_connection(connection)) == expected
        for caller in expected:
            del self.waiting[caller]

    @invariant()
    def table_holds_exactly_the_waiting_callers(self) -> None:
        assert len(self.table) == len(self.waiting)
        for _, stan, _ in self.waiting:
            assert self.table.has_stan(stan)


InFlight.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestInFlight = InFlight.TestCase
