"""Scenario files: the shipped ones parse, and malformed ones are refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from terminal_emulator.scenario import ScenarioError, load_scenario, parse_scenario

SHIPPED = sorted((Path(__file__).resolve().parents[2] / "terminal_emulator" / "scenarios").glob("*.yaml"))


def test_the_scenarios_the_issue_asks_for_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"refund_wrong_amount", "refund_other_card", "double_refund", "void_after_settlement",
            "lost_response_reversal", "retransmission", "completion_over_tolerance",
            "settlement_mismatch"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_scenario_parses_and_expects_something_of_every_step(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name
    assert scenario.tid == "auto"
    for step in scenario.steps:
        assert step.expect, f"{path.stem}: step {step.label} checks nothing"


def test_a_step_needs_exactly_one_action() -> None:
    with pytest.raises(ScenarioError, match="exactly one action"):
        parse_scenario({"steps": [{"sale": {"amount": "1"}, "refund": {"amount": "1"}}]})


def test_unknown_step_keys_are_refused() -> None:
    with pytest.raises(ScenarioError, match="unknown keys"):
        parse_scenario({"steps": [{"sale": {"amount": "1"}, "expct": {}}]})


def test_an_unquoted_response_code_is_refused_because_yaml_would_read_00_as_zero() -> None:
    with pytest.raises(ScenarioError, match="quoted"):
        parse_scenario({"steps": [{"sale": {"amount": "1"}, "expect": {39: 0}}]})


def test_step_ids_are_unique() -> None:
    with pytest.raises(ScenarioError, match="unique"):
        parse_scenario({"steps": [{"id": "a", "echo": {}}, {"id": "a", "echo": {}}]})


def test_a_scenario_without_steps_is_refused() -> None:
    with pytest.raises(ScenarioError, match="steps"):
        parse_scenario({"name": "empty"})
