"""The host simulator's answers, sans-I/O: what each request gets by default, what rules change,
reversals of originals the host saw or not, RRNs that stay unique across restarts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from terminal_emulator.codec import IsoMessage
from terminal_emulator.host.engine import HostEngine, RrnIssuer, classify
from terminal_emulator.host.rules import Rule, Then, When

CARD = "4761739001010119"
HOST_PACKAGE = Path(__file__).resolve().parents[2] / "terminal_emulator" / "host"


class FrozenClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def engine(*rules: Rule) -> HostEngine:
    return HostEngine(rules, clock=FrozenClock())


def financial(mti: str = "0200", stan: str = "000001", amount: int = 1000, **extra: str) -> IsoMessage:
    fields = {2: CARD, 3: "000000", 4: f"{amount:012d}", 7: "1122101010", 11: stan, 12: "101010", 13: "1122",
              14: "2912", 35: f"{CARD}=2912", 41: "TERM0001", 42: "MERCHANT0000001", 49: "840", 52: "00FF00FF00FF00FF"}
    fields.update({int(k.removeprefix("de")): v for k, v in extra.items()})
    return IsoMessage(mti, fields)


def reversal(mti: str, original_stan: str, stan: str = "000900", amount: int = 1000) -> IsoMessage:
    return IsoMessage(mti, {3: "000000", 4: f"{amount:012d}", 11: stan, 41: "TERM0001", 42: "MERCHANT0000001",
                            49: "840", 90: f"0200{original_stan}1122101010" + "0" * 22})


@pytest.mark.parametrize(
    ("mti", "kind"),
    [("0800", "network"), ("0100", "authorization"), ("0201", "financial"), ("0220", "advice"),
     ("0121", "advice"), ("0400", "reversal"), ("0401", "reversal"), ("0420", "reversal_advice"),
     ("0421", "reversal_advice"), ("0500", "settlement"), ("0210", "response"), ("0810", "response"),
     ("0600", "other"), ("02x0", "other")],
)  # fmt: skip
def test_every_mti_has_a_kind(mti: str, kind: str) -> None:
    assert classify(mti) == kind


@pytest.mark.parametrize(("code", "expected"), [("001", "00"), ("002", "00"), ("301", "00"), ("161", "12")])
def test_network_management_is_answered_0810_with_de70_echoed(code: str, expected: str) -> None:
    outcome = engine().handle(IsoMessage("0800", {7: "1122101010", 11: "000007", 41: "TERM0001", 70: code}))
    assert outcome.answer == IsoMessage("0810", {7: "1122101010", 11: "000007", 39: expected, 41: "TERM0001", 70: code})


def test_network_management_without_de70_is_a_format_error() -> None:
    answer = engine().handle(IsoMessage("0800", {11: "000008", 41: "TERM0001"})).answer
    assert answer == IsoMessage("0810", {11: "000008", 39: "30", 41: "TERM0001"})


def test_a_purchase_is_approved_with_the_usual_fields_echoed_and_no_card_data() -> None:
    outcome = engine().handle(financial())
    assert outcome.action == "answer"
    answer = outcome.answer
    assert answer is not None
    assert answer.mti == "0210"
    assert set(answer.fields) == {3, 4, 7, 11, 12, 13, 37, 38, 39, 41, 42, 49}
    assert answer.fields[39] == "00"
    assert len(answer.fields[37]) == 12 and answer.fields[37].isdigit()
    assert len(answer.fields[38]) == 6
    assert all(answer.fields[n] == financial().fields[n] for n in (3, 4, 7, 11, 12, 13, 41, 42, 49))


def test_a_request_that_has_an_rrn_gets_it_back_and_a_repeat_gets_the_base_response_mti() -> None:
    outcome = engine().handle(financial("0201", de37="123456789012"))
    assert outcome.answer is not None
    assert (outcome.answer.mti, outcome.answer.fields[37]) == ("0210", "123456789012")


def test_a_preauthorization_is_approved_0110() -> None:
    answer = engine().handle(financial("0100")).answer
    assert answer is not None and (answer.mti, answer.fields[39]) == ("0110", "00")


def test_a_decline_carries_no_approval_code_and_a_rule_may_set_the_approval_code() -> None:
    host = engine(Rule(When(amount_over=5000), Then(code="51")), Rule(When(amount=(42,)), Then(approval_code="XYZ789")))
    declined = host.handle(financial(amount=5001)).answer
    assert declined is not None and declined.fields[39] == "51" and 38 not in declined.fields and 37 in declined.fields
    chosen = host.handle(financial(amount=42)).answer
    assert chosen is not None and chosen.fields[38] == "XYZ789"


def test_an_advice_is_accepted_0230_with_its_approval_code_echoed() -> None:
    answer = engine().handle(financial("0221", de38="A1B2C3", de90="0100000001" + "0" * 32)).answer
    assert answer is not None
    assert (answer.mti, answer.fields[39], answer.fields[38], answer.fields[90][:4]) == ("0230", "00", "A1B2C3", "0100")


def test_a_reversal_of_an_original_the_host_saw_is_00_and_of_an_unknown_one_25() -> None:
    host = engine()
    host.handle(financial(stan="000001"))
    seen = host.handle(reversal("0400", "000001"))
    unknown = host.handle(reversal("0401", "000002"))
    assert seen.original_found is True and seen.answer is not None
    assert (seen.answer.mti, seen.answer.fields[39]) == ("0410", "00")
    assert unknown.original_found is False and unknown.answer is not None
    assert (unknown.answer.mti, unknown.answer.fields[39]) == ("0410", "25")
    assert unknown.answer.fields[90] == reversal("0401", "000002").fields[90]


def test_a_reversal_advice_is_accepted_even_when_its_original_is_unknown() -> None:
    outcome = engine().handle(reversal("0421", "000077"))
    assert outcome.original_found is False
    assert outcome.answer is not None and (outcome.answer.mti, outcome.answer.fields[39]) == ("0430", "00")


def test_a_reversal_of_a_request_whose_answer_was_dropped_finds_its_original() -> None:
    host = engine(Rule(When(mti=("0200",)), Then(drop=True)))
    assert host.handle(financial(stan="000005")).action == "drop"
    outcome = host.handle(reversal("0400", "000005"))
    assert outcome.original_found is True and outcome.answer is not None and outcome.answer.fields[39] == "00"


def test_a_reversal_without_de90_matches_the_same_stan_and_amount_on_the_same_terminal() -> None:
    host = engine()
    host.handle(financial(stan="000010", amount=1500))
    same = IsoMessage("0400", {3: "000000", 4: "000000001500", 11: "000010", 41: "TERM0001"})
    other_amount = IsoMessage("0400", {3: "000000", 4: "000000001400", 11: "000010", 41: "TERM0001"})
    other_terminal = IsoMessage("0400", {3: "000000", 4: "000000001500", 11: "000010", 41: "TERM0002"})
    assert [host.handle(m).original_found for m in (same, other_amount, other_terminal)] == [True, False, False]


def test_a_rule_overrides_the_reversal_default() -> None:
    host = engine(Rule(When(mti=("0400",)), Then(code="00")))
    outcome = host.handle(reversal("0400", "000404"))
    assert outcome.original_found is False and outcome.answer is not None and outcome.answer.fields[39] == "00"


def test_settlement_is_answered_0510_00_and_unknown_requests_12() -> None:
    host = engine()
    settled = host.handle(IsoMessage("0500", {3: "920000", 11: "000020", 41: "TERM0001", 74: "0000000000"}))
    other = host.handle(IsoMessage("0600", {11: "000021", 41: "TERM0001"}))
    assert settled.answer is not None and (settled.answer.mti, settled.answer.fields[39]) == ("0510", "00")
    assert other.answer is not None and (other.answer.mti, other.answer.fields[39]) == ("0610", "12")


def test_a_response_sent_to_the_host_is_ignored_and_does_not_count_for_rules() -> None:
    host = engine(Rule(When(nth=(1,)), Then(code="05")))
    ignored = host.handle(IsoMessage("0210", {11: "000001", 39: "00"}))
    assert (ignored.action, ignored.answer) == ("ignore", None)
    first = host.handle(financial()).answer
    assert first is not None and first.fields[39] == "05"


def test_drop_and_close_answer_nothing_and_close_keeps_its_delay() -> None:
    host = engine(Rule(When(amount=(1,)), Then(drop=True)), Rule(When(amount=(2,)), Then(close=True, delay_ms=30)),
                  Rule(When(amount=(3,)), Then(delay_ms=25)))
    dropped, closed, delayed = (host.handle(financial(amount=a)) for a in (1, 2, 3))
    assert (dropped.action, dropped.answer, dropped.decision.rule) == ("drop", None, 1)
    assert (closed.action, closed.answer, closed.delay_ms) == ("close", None, 30)
    assert delayed.action == "answer" and delayed.delay_ms == 25 and delayed.answer is not None


def test_new_rules_take_effect_at_once_and_count_from_zero() -> None:
    host = engine(Rule(When(), Then(drop=True, times=1)))
    assert host.handle(financial()).action == "drop"
    assert host.handle(financial()).action == "answer"
    host.rules = [Rule(When(), Then(drop=True, times=1))]
    assert host.handle(financial()).action == "drop"


def test_rrns_are_12_digits_and_unique_even_when_the_clock_stands_still() -> None:
    issuer = RrnIssuer(FrozenClock(1_700_000_000.0))
    rrns = [issuer.next() for _ in range(1000)]
    assert len(set(rrns)) == 1000
    assert all(len(r) == 12 and r.isdigit() for r in rrns)


def test_rrns_of_a_restarted_host_do_not_repeat_the_previous_ones() -> None:
    clock = FrozenClock(1_700_000_000.0)
    first = RrnIssuer(clock)
    before = {first.next() for _ in range(500)}  # 500 answers within one millisecond
    clock.now += 1.0  # restarted a second later
    again = RrnIssuer(clock)
    assert not before & {again.next() for _ in range(500)}


def test_no_module_of_the_host_simulator_imports_the_gateway() -> None:
    for path in sorted(HOST_PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            assert not any(n == "gateway" or n.startswith("gateway.") for n in names), f"{path.name} imports {names}"
    script = ("import sys, terminal_emulator.host.cli, terminal_emulator.host; "
              "print(sorted(m for m in sys.modules if m == 'gateway' or m.startswith('gateway.')))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"
