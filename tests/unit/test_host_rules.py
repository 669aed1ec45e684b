"""The host simulator's rules: what each condition matches, which rule wins, and files refused with
a message that names the rule and the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from terminal_emulator.codec import IsoMessage
from terminal_emulator.host.rules import Decision, Rule, RuleBook, RulesError, Then, When, load_rules, parse_rules

CARD = "4761739001010119"  # Luhn-valid
BAD_CARD = "4761739001010118"


def request(mti: str = "0200", amount: int | None = 1000, pan: str | None = CARD, stan: str = "000001",
            **extra: str) -> IsoMessage:
    fields: dict[int, str] = {3: "000000", 11: stan, 41: "TERM0001", 42: "MERCHANT0000001", 49: "840"}
    if amount is not None:
        fields[4] = f"{amount:012d}"
    if pan is not None:
        fields[2] = pan
    fields.update({int(k.removeprefix("de")): v for k, v in extra.items()})
    return IsoMessage(mti, fields)


def book(text: str) -> RuleBook:
    return RuleBook(parse_rules(tomllib.loads(text)))


def test_no_rules_decide_nothing_so_the_host_answers_by_default() -> None:
    assert RuleBook().decide(request()) == Decision()


def test_an_amount_over_rule_declines_only_amounts_strictly_above_it() -> None:
    rules = book('[[rule]]\nwhen = { amount_over = 100000 }\nthen = { code = "51" }')
    assert rules.decide(request(amount=100001)).code == "51"
    assert rules.decide(request(amount=100000)).code is None
    assert rules.decide(request(amount=None)).code is None  # no DE4: the condition cannot hold


def test_amount_under_and_exact_amounts() -> None:
    rules = book('[[rule]]\nwhen = { amount_under = 100 }\nthen = { code = "13" }\n'
                 '[[rule]]\nwhen = { amount = [777, 888] }\nthen = { code = "05" }')
    assert [rules.decide(request(amount=a)).code for a in (99, 100, 777, 888, 889)] == ["13", None, "05", "05", None]


def test_the_first_matching_rule_wins_and_its_position_and_name_are_reported() -> None:
    rules = book('[[rule]]\nname = "slow"\nwhen = { mti = "0200" }\nthen = { delay_ms = 50 }\n'
                 '[[rule]]\nwhen = { amount_over = 0 }\nthen = { code = "51" }')
    decision = rules.decide(request())
    assert (decision.rule, decision.name, decision.delay_ms, decision.code) == (1, "slow", 50, None)
    assert rules.decide(request("0100")).rule == 2


def test_pan_exact_prefix_and_luhn_failure() -> None:
    rules = book(f'[[rule]]\nwhen = {{ pan = "{CARD}" }}\nthen = {{ code = "05" }}\n'
                 '[[rule]]\nwhen = { pan_prefix = ["5", "41"] }\nthen = { code = "57" }\n'
                 '[[rule]]\nwhen = { pan_fails_luhn = true }\nthen = { code = "14" }')
    assert rules.decide(request(pan=CARD)).code == "05"
    assert rules.decide(request(pan="5555555555554444")).code == "57"
    assert rules.decide(request(pan="4111111111111111")).code == "57"
    assert rules.decide(request(pan=BAD_CARD)).code == "14"
    assert rules.decide(request(pan="4000000000000002")).code is None  # valid, no rule for it
    assert rules.decide(request(pan=None)).code is None


def test_the_pan_is_taken_from_track_2_when_de2_is_absent() -> None:
    rules = book(f'[[rule]]\nwhen = {{ pan = "{CARD}" }}\nthen = {{ code = "05" }}')
    assert rules.decide(request(pan=None, de35=f"{CARD}=2912101123456789")).code == "05"
    assert rules.decide(request(pan=None, de35=f"{CARD}D2912101123456789")).code == "05"


def test_stan_terminal_merchant_processing_code_and_network_code() -> None:
    rules = book('[[rule]]\nwhen = { stan = "42" }\nthen = { code = "01" }\n'
                 '[[rule]]\nwhen = { terminal = "TERM0002" }\nthen = { code = "02" }\n'
                 '[[rule]]\nwhen = { processing_code = "20" }\nthen = { code = "03" }\n'
                 '[[rule]]\nwhen = { network_code = "301" }\nthen = { drop = true }\n'
                 '[[rule]]\nwhen = { merchant = "SHOP" }\nthen = { code = "04" }')
    assert rules.decide(request(stan="000042")).code == "01"
    assert rules.decide(request(de41="TERM0002")).code == "02"
    assert rules.decide(request(de3="200000")).code == "03"
    assert rules.decide(IsoMessage("0800", {11: "000001", 70: "301"})).drop
    assert not rules.decide(IsoMessage("0800", {11: "000001", 70: "001"})).drop
    assert rules.decide(request(de42="SHOP           ")).code == "04"  # DE42 padding ignored


def test_times_drops_the_first_matching_requests_then_lets_later_ones_through() -> None:
    rules = book('[[rule]]\nwhen = { mti = ["0420", "0421"] }\nthen = { drop = true, times = 2 }')
    drops = [rules.decide(request(mti)).drop for mti in ("0420", "0421", "0200", "0421", "0421")]
    assert drops == [True, True, False, False, False]


def test_nth_counts_only_the_requests_that_meet_the_rules_other_conditions() -> None:
    rules = book('[[rule]]\nwhen = { mti = "0200", nth = [2, 4] }\nthen = { code = "91" }')
    codes = [rules.decide(request(mti)).code for mti in ("0200", "0100", "0200", "0200", "0800", "0200", "0200")]
    assert codes == [None, None, "91", None, None, "91", None]


def test_an_earlier_winning_rule_hides_the_request_from_later_rules_counts() -> None:
    rules = book('[[rule]]\nwhen = { amount_over = 500 }\nthen = { code = "51" }\n'
                 '[[rule]]\nwhen = { nth = 2 }\nthen = { close = true }')
    outcomes = [rules.decide(request(amount=a)) for a in (1000, 10, 1000, 10)]
    assert [(d.code, d.close) for d in outcomes] == [("51", False), (None, False), ("51", False), (None, True)]


def test_rules_can_be_written_in_python_too() -> None:
    rules = RuleBook([Rule(When(mti=("0200",), amount_over=10), Then(code="05"), name="py")])
    assert rules.decide(request(amount=11)) == Decision(rule=1, name="py", code="05")


def test_an_empty_then_answers_by_default_and_exempts_the_request_from_later_rules() -> None:
    rules = book(f'[[rule]]\nwhen = {{ pan = "{CARD}" }}\nthen = {{}}\n'
                 '[[rule]]\nthen = { code = "05" }')
    assert rules.decide(request(pan=CARD)) == Decision(rule=1)
    assert rules.decide(request(pan="4111111111111111")).code == "05"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("[[rules]]\nthen = {}", "unknown top-level key 'rules'"),
        ("rule = 3", "`rule` must be a list of tables"),
        ("[[rule]]\nwhen = { amount_over = 1 }", "rule 1: missing `then`"),
        ("[[rule]]\nthen = {}\n[[rule]]\nwhen = { amout_over = 1 }\nthen = {}",
         "rule 2: when: unknown key 'amout_over'"),
        ('[[rule]]\nwhen = { amount_over = "100.00" }\nthen = {}', "rule 1: when.amount_over: must be an integer"),
        ("[[rule]]\nwhen = { amount_over = 100.5 }\nthen = {}", "amounts are minor units"),
        ("[[rule]]\nwhen = { mti = \"200\" }\nthen = {}", "rule 1: when.mti: '200' is not valid (4 digits"),
        ("[[rule]]\nwhen = { mti = [] }\nthen = {}", "rule 1: when.mti: an empty list matches nothing"),
        ("[[rule]]\nwhen = { pan = \"4761 7390\" }\nthen = {}", "when.pan: '4761 7390' is not valid"),
        ("[[rule]]\nwhen = { pan_fails_luhn = 1 }\nthen = {}", "when.pan_fails_luhn: must be true or false"),
        ("[[rule]]\nwhen = { stan = \"12345678\" }\nthen = {}", "when.stan: must be up to 6 digits"),
        ("[[rule]]\nwhen = { stan = 123 }\nthen = {}", "when.stan: must be up to 6 digits, quoted"),
        ("[[rule]]\nwhen = { nth = 0 }\nthen = {}", "when.nth: must be an integer of at least 1"),
        ("[[rule]]\nthen = { code = 51 }", "rule 1: then.code must be 2 characters, quoted"),
        ("[[rule]]\nthen = { code = \"510\" }", "then.code must be 2 characters"),
        ("[[rule]]\nthen = { delay_ms = -1 }", "then.delay_ms must be a number of milliseconds"),
        ("[[rule]]\nthen = { drop = true, close = true }", "then.drop and then.close exclude each other"),
        ("[[rule]]\nthen = { drop = true, code = \"05\" }", "mean nothing when nothing is answered"),
        ("[[rule]]\nthen = { drop = true, delay_ms = 5 }", "then.delay_ms means nothing with drop"),
        ("[[rule]]\nthen = { code = \"05\", approval_code = \"X1\" }", "then.approval_code goes with an approval"),
        ("[[rule]]\nthen = { times = 0 }", "then.times: must be an integer of at least 1"),
        ("[[rule]]\nthen = { dorp = true }", "rule 1: then: unknown key 'dorp' (known: code,"),
        ("[[rule]]\nname = \"\"\nthen = {}", "rule 1: name must be a non-empty string"),
        ("[[rule]]\nwhen = 5\nthen = {}", "rule 1: `when` must be a table"),
    ],
)
def test_a_malformed_rule_is_refused_with_the_rule_and_key_named(document: str, message: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(tomllib.loads(document))
    assert message in str(caught.value)


def test_a_toml_and_a_yaml_file_give_the_same_rules(tmp_path: Path) -> None:
    (tmp_path / "host.toml").write_text(
        '[[rule]]\nname = "big"\nwhen = { amount_over = 100000, mti = ["0100", "0200"] }\nthen = { code = "51" }\n'
        '[[rule]]\nwhen = { mti = "0420" }\nthen = { drop = true, times = 2 }\n'
    )
    (tmp_path / "host.yaml").write_text(
        'rule:\n  - name: big\n    when: {amount_over: 100000, mti: ["0100", "0200"]}\n    then: {code: "51"}\n'
        '  - when: {mti: "0420"}\n    then: {drop: true, times: 2}\n'
    )
    assert load_rules(tmp_path / "host.toml") == load_rules(tmp_path / "host.yaml")
    assert load_rules(tmp_path / "host.toml")[1] == Rule(When(mti=("0420",)), Then(drop=True, times=2))


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[[rule]\n")
    (tmp_path / "unquoted.yaml").write_text("rule:\n  - then: {code: 00}\n")
    (tmp_path / "rules.json").write_text("{}")
    cases = [
        (tmp_path / "bad.toml", "bad.toml: not valid TOML"),
        (tmp_path / "unquoted.yaml", "unquoted.yaml: rule 1: then.code must be 2 characters, quoted"),
        (tmp_path / "rules.json", "a rules file ends in .toml, .yaml or .yml"),
        (tmp_path / "missing.toml", "missing.toml: cannot read the rules file"),
    ]
    for path, message in cases:
        with pytest.raises(RulesError) as caught:
            load_rules(path)
        assert message in str(caught.value)


def test_the_rules_examples_in_docs_host_md_are_valid_and_say_the_same_in_toml_and_yaml() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "host.md").read_text()
    toml_rules = parse_rules(tomllib.loads(re.findall(r"```toml\n(.*?)```", text, re.S)[0]))
    yaml_rules = parse_rules(yaml.safe_load(re.findall(r"```yaml\n(.*?)```", text, re.S)[0]))
    assert len(toml_rules) == 6
    assert yaml_rules == [toml_rules[0], Rule(toml_rules[3].when, toml_rules[3].then)]  # the YAML has no name there
