"""Scenario runner over real TCP: references, expectations, lost answers and retransmissions."""

from __future__ import annotations

from collections.abc import Callable

from terminal_emulator import IsoMessage, load_profile
from terminal_emulator.scenario import parse_scenario, run_scenario
from terminal_emulator.testing import StubHost, approve

PROFILE = load_profile("iso87-binary")


def refund_limit_host(limit: int) -> tuple[list[StubHost], Callable[[IsoMessage], IsoMessage | None]]:
    """Approves everything except refunds above ``limit`` minor units (answered 64)."""
    ref: list[StubHost] = []

    def handler(message: IsoMessage) -> IsoMessage | None:
        if message.fields.get(3) == "200000" and int(message.fields[4]) > limit:
            return approve(message, rrn="000000000099", code="64")
        return ref[0].approve_all(message)

    return ref, handler


async def test_saved_answers_can_be_referred_to_by_later_steps() -> None:
    scenario = parse_scenario({
        "steps": [
            {"id": "sale", "sale": {"amount": "12.34"}, "expect": {"39": "00"}},
            {"id": "refund", "refund": {"rrn": "${sale.37}", "amount": "20.00"}, "expect": {"39": "64"}},
            {"id": "ok", "refund": {"rrn": "${sale.37}", "amount": "5.00"},
             "expect": {"39": "00", "request.37": "${sale.37}", "request.4": "000000000500"}},
        ]
    })
    ref, handler = refund_limit_host(1234)
    async with StubHost(PROFILE, handler) as host:
        ref.append(host)
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=2)
    assert result.passed, [s.failures for s in result.steps]
    assert host.messages[1].fields[37] == host.messages[2].fields[37] == "000000000001"
    assert len(result.tid) == 8
    assert {m.fields[41] for m in host.messages} == {result.tid}


async def test_an_expectation_that_does_not_hold_fails_the_step_and_says_why() -> None:
    scenario = parse_scenario({
        "steps": [
            {"id": "sale", "sale": {"amount": "1.00"}, "expect": {"39": "05"}},
            {"echo": {}, "expect": {"39": ["00", "91"], "mti": {"not": "0800"}}},
        ]
    })
    async with StubHost(PROFILE) as host:
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=2)
    assert not result.passed
    assert result.steps[0].failures == ["39: expected '05', got '00'"]
    assert result.steps[1].passed


async def test_a_lost_answer_step_then_shows_the_reversal_sent_before_the_next_step() -> None:
    scenario = parse_scenario({
        "steps": [
            {"id": "lost", "lose_response": True, "sale": {"amount": "20.00"}, "expect": {"39": "00"}},
            {"id": "next", "sale": {"amount": "15.00"},
             "expect": {"reversal.mti": "0410", "reversal.request.90":
                        "0200${lost.request.11}${lost.request.7}0000000000000000000000", "39": "00"}},
            {"settle": {}, "expect": {"request.76": "0000000001", "request.88": "0000000000001500"}},
        ]
    })
    async with StubHost(PROFILE) as host:
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=2)
    assert result.passed, [s.failures for s in result.steps]
    assert host.mtis == ["0200", "0400", "0200", "0500"]
    assert result.steps[0].main is not None
    assert result.steps[0].main.outcome == "lost"


async def test_a_timeout_fails_a_step_unless_the_step_expects_it() -> None:
    scenario = parse_scenario({
        "terminal": {"tid": "TERM0042"},
        "steps": [
            {"sale": {"amount": "1.00"}, "expect": {"39": "00"}},
            {"sale": {"amount": "2.00"}, "expect": {"outcome": "timeout"}},
        ]
    })
    async with StubHost(PROFILE, lambda m: None) as host:
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=0.2)
    assert result.tid == "TERM0042"
    assert result.steps[0].failures[0].startswith("outcome: expected 'answered', got 'timeout'")
    # The second sale first tries to deliver the first one's reversal, which is not answered either:
    # the terminal sends nothing more, so the run stops there.
    assert not result.steps[1].passed
    assert result.steps[1].stopped
    assert "reversal of STAN 000001 still unanswered" in result.steps[1].failures[0]


async def test_a_resend_repeats_the_same_stan_and_time_with_changes_if_asked() -> None:
    scenario = parse_scenario({
        "steps": [
            {"id": "sale", "sale": {"amount": "10.00"}, "expect": {"39": "00"}},
            {"resend": {"step": "sale", "mti": "0201"}, "expect": {"mti": "0210"}},
            {"resend": {"step": "sale", "fields": {"4": "000000002000"}}, "expect": {"request.4": "000000002000"}},
        ]
    })
    async with StubHost(PROFILE) as host:
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=2)
    assert result.passed, [s.failures for s in result.steps]
    first, repeat, changed = host.messages
    assert repeat.mti == "0201"
    assert first.fields[11] == repeat.fields[11] == changed.fields[11]
    assert first.fields[7] == repeat.fields[7] == changed.fields[7]
    assert changed.fields[4] == "000000002000"


async def test_a_reference_to_an_unknown_step_fails_that_step_only() -> None:
    scenario = parse_scenario({
        "steps": [
            {"refund": {"rrn": "${nope.37}", "amount": "1.00"}, "expect": {"39": "00"}},
            {"echo": {}, "expect": {"39": "00"}},
        ]
    })
    async with StubHost(PROFILE) as host:
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=2)
    assert "unknown or later step 'nope'" in result.steps[0].failures[0]
    assert result.steps[1].passed
    assert host.mtis == ["0800"]


async def test_a_lost_connection_no_step_expected_stops_the_run_there() -> None:
    scenario = parse_scenario({
        "steps": [
            {"id": "sale", "sale": {"amount": "1.00"}},
            {"id": "refund", "refund": {"rrn": "${sale.37}", "amount": "0.50"}},
            {"id": "void", "void": {"rrn": "${sale.37}"}},
            {"settle": {}},
        ]
    })
    async with StubHost(PROFILE) as host:
        original = host.handler

        def hang_up_at_the_refund(message: IsoMessage) -> IsoMessage | None:
            if message.fields.get(3) == "200000":
                host.hang_up_next()  # takes effect for the next frame: close instead of answering it
            return original(message)

        host.handler = hang_up_at_the_refund
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=2)
    assert not result.passed
    assert result.stopped is not None and "connection" in result.stopped
    assert [step.step.label for step in result.steps] == ["sale", "refund", "void"]
    assert result.steps[-1].stopped and result.steps[-1].failures == [result.stopped]
    assert not any("has no value" in failure for step in result.steps for failure in step.failures)


async def test_a_lost_connection_the_step_expects_does_not_stop_the_run() -> None:
    scenario = parse_scenario({
        "steps": [
            {"sale": {"amount": "1.00"}, "expect": {"outcome": "connection_lost"}},
            {"echo": {}, "expect": {"39": "00"}},
        ]
    })
    async with StubHost(PROFILE) as host:
        host.hang_up_next()
        result = await run_scenario(scenario, host="127.0.0.1", port=host.port, profile=PROFILE,
                                    response_timeout=2)
    assert result.stopped is None
    assert result.passed, [s.failures for s in result.steps]
