"""Scenarios are dialect-neutral: the paths they expect read the same meaning from iso87 and cup frames."""

from __future__ import annotations

from pathlib import Path

import pytest

from terminal_emulator.codec import IsoMessage
from terminal_emulator.dialects import Card, Dialect, Station
from terminal_emulator.dialects.cup import CUP
from terminal_emulator.dialects.iso87 import ISO87
from terminal_emulator.exchange import Exchange
from terminal_emulator.journal import PendingReversal, TransactionRecord
from terminal_emulator.messages import Stamp, Totals
from terminal_emulator.scenario import ScenarioError, Step, StepResult, _path_value, load_scenario

SHIPPED = Path(__file__).resolve().parents[2] / "terminal_emulator" / "scenarios"
STATION = Station("TERM0001", "MERCHANT0000001", 3)
ST = Stamp("000042", "1207103015", "103015", "1207")
#: data elements whose meaning differs between the dialects: a shipped scenario must not expect them
DIALECT_FIELDS = {"3", "48", "60", "61", "70", "74", "76", "86", "88", "90", "95"}


def _result(request: IsoMessage, response: IsoMessage | None = None) -> StepResult:
    exchange = Exchange("x", request, response, 1.0)
    return StepResult(step=Step(action="settle", params={}), main=exchange)


@pytest.mark.parametrize("dialect", [ISO87, CUP], ids=["iso87", "cup"])
def test_totals_paths_read_what_the_settlement_carried(dialect: Dialect) -> None:
    totals = Totals(credits_count=1, credits_amount=500, debits_count=2, debits_amount=2500)
    request = dialect.settlement(ST, STATION, "156", totals, Totals())
    result = _result(request)
    assert [_path_value(result, f"totals.{n}", dialect) for n in ("credits_count", "credits_amount",
                                                                  "debits_count", "debits_amount")] == [
        "1", "500", "2", "2500"]
    with pytest.raises(ScenarioError):
        _path_value(result, "totals.refunds", dialect)


def test_the_settlement_path_reads_95_in_iso87_and_the_result_digit_in_cup() -> None:
    iso_request = ISO87.settlement(ST, STATION, "840", Totals(), Totals())
    assert _path_value(_result(iso_request, IsoMessage("0510", {39: "95"})), "settlement", ISO87) == "not_balanced"
    assert _path_value(_result(iso_request, IsoMessage("0510", {39: "00"})), "settlement", ISO87) == "balanced"
    cup_request = CUP.settlement(ST, STATION, "156", Totals(debits_count=1, debits_amount=5), Totals())
    answer = {39: "00", 48: cup_request.fields[48][:30] + "2" + cup_request.fields[48][31:]}
    assert _path_value(_result(cup_request, IsoMessage("0510", answer)), "settlement", CUP) == "not_balanced"


@pytest.mark.parametrize("dialect", [ISO87, CUP], ids=["iso87", "cup"])
def test_original_stan_names_the_reversed_sale(dialect: Dialect) -> None:
    sale = dialect.purchase(Stamp("000007", "1207103015", "103015", "1207"), STATION, Card(dialect.default_pan),
                            1500, "156")
    record = TransactionRecord("purchase", sale.mti, sale.fields[3], "000007", "1207103015", 1500, "156",
                               "621700*********0122", 3, "2026-12-07T10:30:15+00:00", status="approved",
                               request_fields={str(k): v for k, v in sale.fields.items() if k != 2})
    reversal = dialect.reversal(ST, STATION, dialect.default_pan, PendingReversal.for_record(record))
    assert _path_value(_result(reversal), "request.original_stan", dialect) == "000007"


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.stem)
def test_a_shipped_scenario_expects_no_dialect_specific_field(path: Path) -> None:
    scenario = load_scenario(path)
    for step in scenario.steps:
        for key in step.expect:
            parts = key.split(".")
            assert not (set(parts) & DIALECT_FIELDS), f"{path.stem} {step.label}: {key}"
        assert "mti" not in step.params, f"{path.stem} {step.label}: a repeat MTI is iso87's; use repeat: true"
