"""The ``cup`` dialect in memory: what each UnionPay request means, what it points at, how it is answered.

Requests are the shared interop vectors (built by an encoder that is not ours) or variations of them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, time
from pathlib import Path

import pytest

from gateway.core.batches import batch_to_use
from gateway.core.cards import pan_digest
from gateway.core.model import Batch, BatchState, ClosedBy, Kind, Reference, SettlementTotals, UploadLine
from gateway.core.policy import Policy
from gateway.core.uploads import kept_line
from gateway.protocol.cup import DIALECT, TRANSACTIONS, settlement_totals
from gateway.protocol.dialect import AnswerFacts, DialectError, UnsupportedMessage, dialect_for
from gateway.protocol.message import Message

#: the shared UnionPay vectors (a copy: frames from an encoder that is not ours)
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "cup-pos.jsonl"
CARD = "6217001234567890122"


def vector(description_start: str) -> Message:
    """The vector whose description starts so."""
    for line in VECTORS.read_text(encoding="utf-8").splitlines():
        raw = json.loads(line)
        if raw["description"].startswith(description_start):
            return Message(raw["mti"], {int(number): value for number, value in raw["fields"].items()})
    raise AssertionError(f"no vector {description_start!r}")


def sale(**changes: str | None) -> Message:
    """A UnionPay sale (0200, 3 = 000000, 25 = 00, 60.1 = 22) with fields replaced or removed (None)."""
    fields = {2: CARD, 3: "000000", 4: "000000010000", 11: "000002", 22: "021", 25: "00", 41: "POS00001",
              42: "898310048990001", 49: "156", 60: "22000002000601"}  # fmt: skip
    mti = changes.pop("mti", None) or "0200"
    for name, value in changes.items():
        number = int(name.removeprefix("f"))
        if value is None:
            fields.pop(number, None)
        else:
            fields[number] = value
    return Message(mti, fields)


def test_the_gateway_gives_profiles_naming_cup_this_dialect() -> None:
    assert dialect_for("cup") is DIALECT


@pytest.mark.parametrize(
    ("description", "kind"),
    [
        ("sign-on", Kind.NETWORK),
        ("sale (", Kind.PURCHASE),
        ("void", Kind.VOID),
        ("refund", Kind.REFUND),
        ("pre-authorization", Kind.PREAUTH),
        ("pre-auth completion", Kind.COMPLETION),
        ("reversal", Kind.REVERSAL),
        ("settlement (", Kind.SETTLEMENT),
    ],
)
def test_each_vector_request_is_classified_by_mti_processing_code_and_60_1(description: str, kind: Kind) -> None:
    assert DIALECT.classify(vector(description)).kind is kind


def test_every_row_of_the_transaction_table_classifies_to_its_kind() -> None:
    for (mti_class, code, txn_type), txn in TRANSACTIONS.items():
        message = sale(mti=mti_class + "0", f3=code, f25=txn.condition, f60=txn_type + "000002000",
                       f37="120710000002", f38="B54321")  # fmt: skip
        assert DIALECT.classify(message).kind is txn.kind, txn.name


def test_the_references_name_the_original_as_unionpay_terminals_do() -> None:
    void = DIALECT.classify(vector("void"))
    refund = DIALECT.classify(vector("refund"))
    completion = DIALECT.classify(vector("pre-auth completion"))
    reversal = DIALECT.classify(vector("reversal"))
    trace_only = DIALECT.classify(sale(f3="200000", f60="23000002", f61="000002000002"))
    preauth_void = DIALECT.classify(sale(mti="0100", f3="200000", f25="06", f60="11000002", f38="B54321"))

    assert void.reference == Reference(rrn="120710000002", expects=frozenset({Kind.PURCHASE}))
    assert refund.reference == Reference(rrn="120710000002")
    assert completion.reference == Reference(approval_code="B54321")
    assert reversal.reference == Reference(same_stan=True)
    assert trace_only.reference == Reference(stan="000002", expects=frozenset({Kind.PURCHASE}))
    assert preauth_void.reference == Reference(approval_code="B54321", expects=frozenset({Kind.PREAUTH}))


def test_a_refund_without_an_rrn_is_unreferenced() -> None:
    refund = DIALECT.classify(sale(mti="0220", f3="200000", f60="25000002", f61="0000000000001207"))
    assert refund.kind is Kind.REFUND and refund.reference is None


@pytest.mark.parametrize(
    "message",
    [
        sale(f3="310000", f60="01000002"),  # balance inquiry
        sale(f60="36000002"),  # a 60.1 the table does not know
        sale(mti="0320", f60="00000002203"),  # an IC card batch upload
        sale(mti="0800", f60="00000002360"),  # parameter download
        sale(mti="0500", f60="00000002202"),
        sale(mti="0400", f3="310000", f60="01000002"),  # a reversal of something not reversible
    ],
    ids=["balance inquiry", "unknown 60.1", "IC card batch upload", "parameter download", "0500 not 201", "reversal"],
)
def test_what_the_dialect_does_not_handle_is_unsupported(message: Message) -> None:
    with pytest.raises(UnsupportedMessage):
        DIALECT.classify(message)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (sale(f60=None), 60),
        (sale(f60="2200"), 60),
        (sale(f25="06"), 25),
        (sale(f25=None), 25),
        (sale(f4=None), 4),
        (sale(f2=None), 2),
        (sale(f3=None), 3),
        (sale(f41="62170012"), 41),  # 8 digits of the card
        (sale(f41="1234=281"), 41),
        (sale(f42="6217D2812101000"), 42),  # track 2 with its BCD separator
        (sale(mti="0500", f60="00000002201", f48="0001"), 48),
        (sale(mti="0320", f60="00000002201", f48="01" + "0" * 39), 48),
        (sale(mti="0320", f60="00000002201", f48="01" + "00000001" + "0" * 4 + CARD[:16] + "000000000100"), 48),
    ],
)
def test_a_malformed_request_is_a_format_error_naming_the_field(message: Message, field: int) -> None:
    with pytest.raises(DialectError) as caught:
        DIALECT.classify(message)
    assert caught.value.field == field


def test_a_terminal_id_may_hold_the_letter_d() -> None:
    assert DIALECT.classify(sale(f41="POSD0001")).terminal_id == "POSD0001"


def test_settlement_totals_add_domestic_and_foreign_cards() -> None:
    domestic = "000000010000" "002" "000000003000" "001" "0"
    foreign = "000000000500" "001" "000000000000" "000" "0"
    assert settlement_totals(domestic + foreign) == SettlementTotals(1, 3000, 3, 10500)
    assert DIALECT.classify(vector("settlement (")).totals == SettlementTotals(1, 3000, 1, 10000)


LOCAL = datetime(2026, 12, 7, 10, 30, 20, tzinfo=UTC)


def test_a_sale_answer_carries_what_the_vector_answer_carries() -> None:
    expected = vector("sale answer")

    answer = DIALECT.build_response(vector("sale ("), "00", rrn="120710000002", approval_code="A12345",
                                    facts=AnswerFacts("approved", LOCAL))  # fmt: skip

    assert answer == expected


@pytest.mark.parametrize(("reason", "digit"), [("settlement_mismatch", "2"), ("approved", "1"), ("system_error", "3")])
def test_a_settlement_answer_gives_its_result_in_48_with_39_00(reason: str, digit: str) -> None:
    answer = DIALECT.build_response(vector("settlement ("), "00", facts=AnswerFacts(reason, LOCAL))

    assert answer.mti == "0510" and answer.fields[39] == "00"
    assert answer.fields[48][30] == digit and answer.fields[48][61] == "0"
    assert answer.fields[60] == "00000002201"


def test_a_sign_on_answer_gives_the_batch_to_use_in_60_2() -> None:
    answer = DIALECT.build_response(vector("sign-on ("), "00", facts=AnswerFacts("approved", LOCAL, "000002"))

    assert answer.fields[60] == "00000002003"
    assert (answer.fields[12], answer.fields[13]) == ("103020", "1207")


def test_a_sign_on_is_told_the_open_batch_else_the_next_number() -> None:
    opened = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    open_batch = Batch(1, "M", "T", "000007", BatchState.OPEN, opened)
    settled = Batch(1, "M", "T", "999999", BatchState.CLOSED, opened, opened, ClosedBy.SETTLEMENT, "settled")
    with_cutoff = Policy(cutoff=time(23, 0))

    assert batch_to_use(None, Policy(), opened) == "000001"
    assert batch_to_use(open_batch, with_cutoff, opened.replace(hour=22)) == "000007"
    assert batch_to_use(open_batch, with_cutoff, opened.replace(hour=23, minute=1)) == "000008"  # past the cut-off
    assert batch_to_use(settled, Policy(), opened) == "000001"  # counting starts again after 999999


def test_the_transaction_table_of_docs_profiles_is_the_dialects() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "profiles.md").read_text(encoding="utf-8")
    table = text.split("<!-- cup-transactions")[1].split("<!-- /cup-transactions -->")[0]
    documented = set()
    for row in table.splitlines():
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) == 6 and cells[2].isdigit() and len(cells[2]) == 6:
            documented.add((cells[1][:3], cells[2], cells[4], cells[3]))

    assert documented == {(mti, code, kind, txn.condition) for (mti, code, kind), txn in TRANSACTIONS.items()}


def test_an_uploaded_card_ending_in_0_is_told_from_its_zero_fill_by_the_ledgers_card() -> None:
    key = b"k"
    ending_in_zero = "62170012345678900"  # 17 digits, the last one a 0
    listed = UploadLine("000123", 100, ending_in_zero.ljust(20, "0"))

    kept = kept_line(listed, key, pan_digest(key, ending_in_zero))
    unknown = kept_line(listed, key, None)

    assert (kept.pan_hmac, kept.pan_masked) == (pan_digest(key, ending_in_zero), "621700*******8900")
    assert unknown.pan_hmac == pan_digest(key, "621700123456789")  # the shortest: another card than any


GOLDEN_FILE = Path(__file__).resolve().parents[1] / "vectors" / "cup" / "frames.jsonl"
GOLDEN = [json.loads(line) for line in GOLDEN_FILE.read_text(encoding="utf-8").splitlines()]
GOLDEN_REQUESTS = [raw for raw in GOLDEN if DIALECT.response_mti(raw["mti"])]
GOLDEN_KINDS = {"sign_on": Kind.NETWORK, "sale": Kind.PURCHASE, "void": Kind.VOID, "refund": Kind.REFUND,
                "reversal": Kind.REVERSAL, "pre_auth": Kind.PREAUTH, "preauth": Kind.PREAUTH,
                "completion": Kind.COMPLETION, "settlement": Kind.SETTLEMENT, "batch_upload": Kind.BATCH_UPLOAD,
                "batch_end": Kind.BATCH_UPLOAD}  # fmt: skip


@pytest.mark.parametrize("raw", GOLDEN_REQUESTS, ids=lambda raw: raw["file"])
def test_each_hand_derived_golden_request_is_understood(raw: dict[str, object]) -> None:
    fields = raw["fields"]
    assert isinstance(fields, dict)
    request = DIALECT.classify(Message(str(raw["mti"]), {int(number): value for number, value in fields.items()}))

    assert request.kind is GOLDEN_KINDS[str(raw["kind"])]
    assert request.terminal_batch == fields["60"][2:8]
