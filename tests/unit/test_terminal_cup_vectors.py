"""The emulator's UnionPay (cup) requests against frames from an independent encoder.

tests/vectors/cup-pos.jsonl (a copy of the project's shared vectors) holds eleven frames written from the
published UnionPay POS field layout by an encoder that is not pyiso8583. For every request among them
the emulator's cup dialect, given the same inputs, must build the very same bytes; the answers must
read as the terminal reads them (the batch a sign-on gives, the verdict of a settlement).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from terminal_emulator.codec import IsoMessage, decode_message, encode_message
from terminal_emulator.dialects import Card, Station, dialect_for
from terminal_emulator.dialects.cup import CUP
from terminal_emulator.framing import FrameDecoder, frame
from terminal_emulator.journal import PendingReversal, TransactionRecord
from terminal_emulator.messages import Stamp, Totals
from terminal_emulator.profile import load_profile

VECTOR_DIRS = (Path(__file__).resolve().parents[1] / "vectors",)
PROFILE = load_profile("cup-pos")
TPDU = bytes.fromhex("6000030000")  # the vectors' TPDU: destination 0003, source 0000
STATION = Station(tid="POS00001", mid="898310048990001", batch=2)
CARD = Card("6217001234567890122", expiry="2812")


def _vectors() -> dict[str, dict[str, Any]]:
    found = [d / "cup-pos.jsonl" for d in VECTOR_DIRS if (d / "cup-pos.jsonl").exists()]
    if not found:
        raise AssertionError("tests/vectors/cup-pos.jsonl is missing")
    rows = [json.loads(line) for line in found[0].read_text().splitlines() if line.strip()]
    return {row["description"].split(" (")[0]: row for row in rows}


def _st(stan: int) -> Stamp:
    return Stamp(stan=f"{stan:06d}", transmitted="1207103015", local_time="103015", local_date="1207")


def _record(kind: str, stan: str, **extra: Any) -> TransactionRecord:
    base: dict[str, Any] = {"kind": kind, "mti": "0200", "processing_code": "000000", "stan": stan,
                            "transmitted": "1207103015", "amount": 10000, "currency": "156",
                            "masked_pan": "621700*********0122", "batch": 2, "at": "2026-12-07T10:30:15+00:00",
                            "status": "approved", "date": "1207"}
    return TransactionRecord(**(base | extra))


def _wire(message: IsoMessage) -> str:
    return frame(encode_message(PROFILE, message), PROFILE.framing, TPDU).hex()


def _built() -> dict[str, IsoMessage]:
    sale = _record("purchase", "000002", rrn="120710000002")
    preauth = _record("preauth", "000005", mti="0100", approval_code="B54321")
    lost = CUP.purchase(_st(7), STATION, Card(CARD.pan), 1500, "156")
    lost_record = _record("purchase", "000007", amount=1500,
                          request_fields={str(k): v for k, v in lost.fields.items() if k != 2})
    return {
        "sign-on": CUP.signon(_st(1), Station(STATION.tid, STATION.mid, 1), "01"),
        "sale": CUP.purchase(_st(2), STATION, CARD, 10000, "156"),
        "void of the sale": CUP.void(_st(3), STATION, CARD, 10000, "156", rrn="120710000002", original=sale),
        "refund": CUP.refund(_st(4), STATION, CARD, 3000, "156", rrn="120710000002", original=sale,
                             by_original_data=False),
        "pre-authorization": CUP.preauth(_st(5), STATION, CARD, 50000, "156"),
        "pre-auth completion request": CUP.completion(_st(6), STATION, CARD, 52000, "156", preauth=preauth,
                                                      approval_code="B54321"),
        "reversal of a sale with no answer": CUP.reversal(_st(8), STATION, CARD.pan,
                                                          PendingReversal.for_record(lost_record)),
        "settlement": CUP.settlement(_st(8), STATION, "156", Totals(1, 3000, 1, 10000), Totals()),
    }


def test_the_profile_names_the_cup_dialect() -> None:
    assert dialect_for(PROFILE) is CUP


def test_every_request_the_emulator_builds_equals_the_independent_frame_byte_for_byte() -> None:
    vectors = _vectors()
    built = _built()
    for name, message in built.items():
        vector = vectors[name]
        assert message.mti == vector["mti"], name
        assert {str(k): v for k, v in message.fields.items()} == vector["fields"], name
        assert _wire(message) == vector["frame_hex"], name
    requests = [v for v in vectors.values() if v["mti"][2] in "02"]
    assert len(built) == len(requests) == 8


def _answer(name: str) -> IsoMessage:
    vector = _vectors()[name]
    bodies = FrameDecoder(PROFILE.framing).feed(bytes.fromhex(vector["frame_hex"]))
    return decode_message(PROFILE, bodies[0])


def test_the_sign_on_answer_gives_the_batch_to_use() -> None:
    assert CUP.signed_on_batch(_answer("sign-on answer with the batch to use")) == 2


def test_a_settlement_answer_with_result_2_reads_not_balanced_and_1_balanced() -> None:
    answer = _answer("settlement answer, not balanced")
    assert CUP.reconciliation(answer) == "not_balanced"
    balanced = answer.fields[48][:30] + "1" + answer.fields[48][31:]
    assert CUP.reconciliation(IsoMessage("0510", {**answer.fields, 48: balanced})) == "balanced"
    assert CUP.reconciliation(IsoMessage("0510", {**answer.fields, 39: "97"})) is None


def test_the_totals_a_settlement_carries_read_back_as_sent() -> None:
    sent = Totals(credits_count=1, credits_amount=3000, debits_count=1, debits_amount=10000)
    foreign = Totals(debits_count=2, debits_amount=700)
    message = CUP.settlement(_st(9), STATION, "156", sent, foreign)
    assert CUP.totals_sent(message) == Totals(1, 3000, 3, 10700)


def test_voids_follow_the_originals_kind_pre_auth_void_11_and_completion_void_21() -> None:
    preauth = _record("preauth", "000005", mti="0100", approval_code="B54321")
    completion = _record("completion", "000006", rrn="120710000006", approval_code="C11111")
    pre_void = CUP.void(_st(10), STATION, CARD, 50000, "156", rrn="x", original=preauth)
    assert (pre_void.mti, pre_void.fields[3], pre_void.fields[60][:2], pre_void.fields[25]) == ("0100", "200000",
                                                                                                "11", "06")
    assert (pre_void.fields[38], pre_void.fields[61]) == ("B54321", "0000000000001207")
    done_void = CUP.void(_st(11), STATION, CARD, 52000, "156", rrn="120710000006", original=completion)
    assert (done_void.mti, done_void.fields[60][:2], done_void.fields[61]) == ("0200", "21", "000002000006")
    assert CUP.original_stan(done_void) == "000006"


def _golden(kind: str) -> dict[str, Any]:
    path = Path(__file__).resolve().parents[1] / "vectors" / "cup" / "frames.jsonl"
    if not path.exists():
        pytest.skip("tests/vectors/cup/frames.jsonl not present")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next(row for row in rows if row["kind"] == kind)


def test_batch_upload_and_batch_end_equal_the_hand_derived_frames_byte_for_byte() -> None:
    station = Station(tid="21300017", mid="898440158120035", batch=123)
    completion = _record("completion", "000456", amount=286050, masked_pan="625965******5671", batch=123)
    upload = CUP.batch_upload(_st(458), station, completion, "6259650012345671")
    end = CUP.batch_end(_st(459), station, 1)
    for message, kind in ((upload, "batch_upload"), (end, "batch_end")):
        vector = _golden(kind)
        assert {str(k): v for k, v in message.fields.items()} == vector["fields"], kind
        assert _wire(message).upper() == vector["frame_hex"], kind


def test_a_malformed_settlement_answer_reads_as_no_verdict_not_a_crash() -> None:
    assert CUP.reconciliation(IsoMessage("0510", {39: "00", 48: "ABC"})) is None
    assert CUP.reconciliation(IsoMessage("0510", {39: "00"})) is None


def test_totals_beyond_the_fields_width_are_a_usage_error() -> None:
    from terminal_emulator.errors import UsageError

    with pytest.raises(UsageError, match="3 digits"):
        CUP.settlement(_st(1), STATION, "156", Totals(debits_count=1000, debits_amount=1), Totals())
    with pytest.raises(UsageError, match="12 digits"):
        CUP.settlement(_st(1), STATION, "156", Totals(debits_count=2, debits_amount=10**12), Totals())
