"""Correction events: CloudEvents rendering, topics, masking and the exported JSON Schemas."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jsonschema
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.events import BalanceInfo, CorrectionEvent, OriginalInfo, RequestInfo
from gateway.events import (
    EVENT_TYPES,
    event_schema,
    event_subject,
    format_time,
    mask_pan,
    parse_event,
    render_event,
    topic_segment,
)
from gateway.export_schemas import export_schemas

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOCS_EVENTS = DOCS / "events"
FULL_PAN = "4761739001010119"
MASKED_PAN = "476173******0119"
PREFIX = "pos/corrections"
WHEN = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
APPROVED_AT = datetime(2026, 11, 22, 9, 30, 5, 7000, tzinfo=UTC)
PAN_RUN = re.compile(rb"(?<![0-9])[0-9]{13,19}(?![0-9])")

ORIGINAL = OriginalInfo(
    mti="0200",
    stan="000123",
    rrn="633012000123",
    approval_code="A1B2C3",
    amount=1234,
    currency="840",
    batch="000001",
    approved_at=APPROVED_AT,
)

#: (kind, outcome) -> response code, reason, whether an original is known, details
_SHAPES: dict[str, tuple[str | None, str | None, bool, dict[str, object]]] = {
    "pos.void.approved": ("00", None, True, {}),
    "pos.void.declined": ("12", "batch_settled", True, {}),
    "pos.refund.approved": ("00", None, True, {}),
    "pos.refund.declined": ("25", "original_not_found", False, {}),
    "pos.completion.approved": ("00", None, True, {}),
    "pos.completion.declined": ("64", "amount_mismatch", True, {}),
    "pos.reversal.applied": ("00", None, True, {"partial": False}),
    "pos.reversal.unmatched": ("00", "original_not_found", False, {"tombstone": True}),
    "pos.reversal.late": ("00", "reversed_after_settlement", True, {}),
    "pos.reversal.declined": ("12", "has_later_activity", True, {}),
    "pos.reversal.conflict": (
        "00",
        "credited_beyond_original",
        True,
        {"reversed_amount": 1234, "refunded_amount": 500, "credited_beyond": 500, "refunds": []},
    ),
    "pos.duplicate.replayed": ("00", None, True, {"replayed_mti": "0210"}),
    "pos.duplicate.conflict": ("94", "duplicate_conflict", True, {}),
    "pos.batch.settled": (
        "00",
        None,
        False,
        {
            "batch": "000001",
            "terminal_totals": {"credits_count": 1, "credits_amount": 500, "debits_count": 3, "debits_amount": 9000},
            "ledger_totals": {"credits_count": 1, "credits_amount": 500, "debits_count": 3, "debits_amount": 9000},
        },
    ),
    "pos.batch.mismatch": (
        "95",
        "totals_mismatch",
        False,
        {
            "batch": "000001",
            "terminal_totals": {"credits_count": 1, "credits_amount": 500, "debits_count": 3, "debits_amount": 9000},
            "ledger_totals": {"credits_count": 2, "credits_amount": 700, "debits_count": 3, "debits_amount": 9000},
        },
    ),
    "pos.batch.closed": (
        None,
        "cutoff",
        False,
        {
            "batch": "000001",
            "ledger_totals": {"credits_count": 1, "credits_amount": 500, "debits_count": 3, "debits_amount": 9000},
        },
    ),
    "pos.upstream.reversal_queued": ("00", None, True, {"attempts": 0}),
    "pos.upstream.reversal_acknowledged": (None, None, True, {"attempts": 2, "host_response_code": "00"}),
    "pos.upstream.reversal_failed": (None, "not answered in 86400 s (5 attempts)", True, {"attempts": 5}),
}


def fact_for(event_type: str, *, pan: str | None = MASKED_PAN) -> CorrectionEvent:
    _, kind, outcome = event_type.split(".")
    response_code, reason, has_original, details = _SHAPES[event_type]
    is_batch = kind == "batch"
    request = RequestInfo(
        mti="0500" if is_batch else "0200",
        stan="000124",
        rrn="633012000124",
        amount=None if is_batch else 500,
        currency="840",
        pan=None if is_batch else pan,
    )
    return CorrectionEvent(
        kind=kind,
        outcome=outcome,
        merchant_id="MERCHANT0000001",
        terminal_id="TERM0001",
        response_code=response_code,
        reason=reason,
        subject_rrn=ORIGINAL.rrn if has_original else request.rrn or "",
        request=None if outcome == "closed" else request,  # the gateway closed it on its own
        original=ORIGINAL if has_original else None,
        balance=BalanceInfo(1234, 500, 0, 734, "partially_refunded") if has_original else None,
        details=details,
    )


def render(fact: CorrectionEvent, *, prefix: str = PREFIX, time: datetime = WHEN) -> tuple[str, bytes]:
    return render_event(fact, event_id="evt-0001", instance_id="gw-a", time=time, topic_prefix=prefix)


def committed_schema(event_type: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DOCS_EVENTS / f"{event_type}.schema.json").read_text())
    return loaded


def test_the_eighteen_design_types_and_the_declined_reversal_each_have_a_sample_here() -> None:
    assert len(EVENT_TYPES) == 19
    assert set(_SHAPES) == set(EVENT_TYPES)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_renders_and_validates_against_its_exported_schema(event_type: str) -> None:
    topic, payload = render(fact_for(event_type))
    document = orjson.loads(payload)

    jsonschema.Draft202012Validator.check_schema(committed_schema(event_type))
    jsonschema.validate(document, committed_schema(event_type), cls=jsonschema.Draft202012Validator)
    assert document["type"] == event_type
    _, kind, outcome = event_type.split(".")
    assert topic == f"{PREFIX}/MERCHANT0000001/TERM0001/{kind}/{outcome}"


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_an_event_does_not_validate_against_the_schema_of_another_type(event_type: str) -> None:
    other = EVENT_TYPES[(EVENT_TYPES.index(event_type) + 1) % len(EVENT_TYPES)]
    _, payload = render(fact_for(event_type))

    with pytest.raises(jsonschema.ValidationError, match="was expected"):
        jsonschema.validate(orjson.loads(payload), committed_schema(other))


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_no_payload_holds_a_full_pan_even_when_the_fact_carries_one(event_type: str) -> None:
    _, payload = render(fact_for(event_type, pan=FULL_PAN))

    assert PAN_RUN.search(payload) is None
    assert FULL_PAN.encode() not in payload


def test_the_payload_carries_the_design_envelope_and_data() -> None:
    _, payload = render(fact_for("pos.refund.approved", pan=FULL_PAN))

    assert orjson.loads(payload) == {
        "specversion": "1.0",
        "id": "evt-0001",
        "source": "urn:iso-gateway:gw-a",
        "type": "pos.refund.approved",
        "time": "2026-11-22T10:00:00.123Z",
        "subject": "MERCHANT0000001/TERM0001/633012000123",
        "datacontenttype": "application/json",
        "data": {
            "merchant_id": "MERCHANT0000001",
            "terminal_id": "TERM0001",
            "response_code": "00",
            "reason": None,
            "request": {
                "mti": "0200",
                "stan": "000124",
                "rrn": "633012000124",
                "amount": 500,
                "currency": "840",
                "pan": MASKED_PAN,
            },
            "original": {
                "mti": "0200",
                "stan": "000123",
                "rrn": "633012000123",
                "approval_code": "A1B2C3",
                "amount": 1234,
                "currency": "840",
                "batch": "000001",
                "approved_at": "2026-11-22T09:30:05.007Z",
            },
            "balance": {
                "original_amount": 1234,
                "refunded": 500,
                "reversed": 0,
                "refundable": 734,
                "status": "partially_refunded",
            },
            "details": {},
        },
    }


def test_a_refusal_without_an_original_has_null_original_and_balance() -> None:
    _, payload = render(fact_for("pos.refund.declined"))
    data = orjson.loads(payload)["data"]

    assert (data["original"], data["balance"], data["reason"]) == (None, None, "original_not_found")
    assert orjson.loads(payload)["subject"] == "MERCHANT0000001/TERM0001/633012000124"


def test_batch_totals_travel_in_details() -> None:
    _, payload = render(fact_for("pos.batch.mismatch"))

    details = orjson.loads(payload)["data"]["details"]
    assert details["terminal_totals"]["credits_amount"] == 500
    assert details["ledger_totals"]["credits_amount"] == 700


def test_a_payload_parses_back_into_the_model_it_was_rendered_from() -> None:
    fact = fact_for("pos.void.approved")
    _, payload = render(fact)

    event = parse_event(payload)
    assert event.type == "pos.void.approved"
    assert event.data.original is not None
    assert event.data.original.rrn == ORIGINAL.rrn
    assert event.data.request.pan == MASKED_PAN


def test_times_are_utc_with_milliseconds_and_z_whatever_the_input_zone() -> None:
    shanghai = timezone(timedelta(hours=8))
    local = datetime(2026, 11, 22, 18, 0, 0, 999999, tzinfo=shanghai)

    assert format_time(local) == "2026-11-22T10:00:00.999Z"
    _, payload = render(fact_for("pos.void.approved"), time=local)
    assert orjson.loads(payload)["time"] == "2026-11-22T10:00:00.999Z"


@given(
    st.datetimes(datetime(1970, 1, 2), datetime(9998, 12, 30), timezones=st.just(UTC)),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_a_utc_time_formats_as_the_same_moment_in_any_other_zone(moment: datetime, offset_min: int) -> None:
    elsewhere = moment.astimezone(timezone(timedelta(minutes=offset_min)))
    text = format_time(moment)
    assert text == format_time(elsewhere)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
    assert text == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        render(fact_for("pos.void.approved"), time=datetime(2026, 11, 22, 10, 0))


def test_an_unknown_event_type_is_refused() -> None:
    fact = replace(fact_for("pos.void.approved"), outcome="maybe")

    with pytest.raises(ValueError, match=r"unknown correction event type 'pos\.void\.maybe'"):
        render(fact)


@pytest.mark.parametrize("prefix", ["", "pos/+/x", "pos/#", "/pos", "pos/", "pos//x", "$SYS/pos"])
def test_an_unsafe_topic_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="MQTT topic prefix"):
        render(fact_for("pos.void.approved"), prefix=prefix)


def test_wildcards_and_slashes_in_ids_cannot_add_topic_levels() -> None:
    fact = replace(fact_for("pos.refund.approved"), merchant_id="ACME/+#%  42", terminal_id="T 1  ")

    topic, payload = render(fact)

    assert topic == f"{PREFIX}/ACME%2F%2B%23%25%20%2042/T%201/refund/approved"
    assert topic.count("/") == PREFIX.count("/") + 4
    assert "+" not in topic
    assert "#" not in topic
    data = orjson.loads(payload)["data"]
    assert (data["merchant_id"], data["terminal_id"]) == ("ACME/+#%  42", "T 1  ")


def test_padding_is_stripped_and_an_empty_id_becomes_a_dash() -> None:
    fact = replace(fact_for("pos.void.declined"), merchant_id="   ", terminal_id="TERM0001    ")

    topic, _ = render(fact)

    assert topic == f"{PREFIX}/-/TERM0001/void/declined"
    assert event_subject(fact) == "-/TERM0001/633012000123"


@given(st.text())
def test_a_topic_segment_is_one_safe_level_that_decodes_back_to_the_stripped_id(value: str) -> None:
    segment = topic_segment(value)

    assert segment
    assert not set(segment) & {"/", "+", "#", "\x00"}
    assert segment == "-" or unquote(segment) == value.strip()


@pytest.mark.parametrize(
    ("pan", "masked"),
    [
        (FULL_PAN, MASKED_PAN),
        ("4761739001010", "476173***1010"),
        ("6212345678901234567", "621234*********4567"),
        (MASKED_PAN, MASKED_PAN),
        ("  4761739001010119 ", MASKED_PAN),
        ("4761=7390010", "************"),
        ("123", "***"),
        ("", None),
        (None, None),
    ],
)
def test_pans_are_masked_to_first_six_and_last_four_and_anything_else_is_starred(
    pan: str | None, masked: str | None
) -> None:
    assert mask_pan(pan) == masked


def test_the_committed_schemas_equal_what_export_schemas_generates(tmp_path: Path) -> None:
    written = export_schemas(tmp_path)

    assert sorted(p.name for p in written) == sorted(p.name for p in DOCS_EVENTS.glob("*.schema.json"))
    for path in written:
        assert path.read_bytes() == (DOCS_EVENTS / path.name).read_bytes(), (
            f"docs/events/{path.name} is stale: run python -m gateway.export_schemas"
        )


def test_each_schema_fixes_its_own_type_and_nothing_else_differs() -> None:
    schemas = {t: event_schema(t) for t in EVENT_TYPES}

    assert all(s["properties"]["type"] == {"const": t, "title": "Type", "type": "string"} for t, s in schemas.items())
    shared = {json.dumps(s["$defs"], sort_keys=True) for s in schemas.values()}
    assert len(shared) == 1


def test_docs_show_one_example_per_type_and_each_validates_against_its_schema() -> None:
    examples = re.findall(
        r"^### `(pos\.[a-z_.]+)`\n\nTopic `([^`]+)`\n\n```json\n(.*?)\n```",
        (DOCS / "events.md").read_text(),
        re.M | re.S,
    )

    assert [event_type for event_type, _, _ in examples] == list(EVENT_TYPES)
    for event_type, topic, text in examples:
        document = json.loads(text)
        jsonschema.validate(document, committed_schema(event_type), cls=jsonschema.Draft202012Validator)
        _, kind, outcome = event_type.split(".")
        assert topic == f"pos/corrections/{document['subject'].rsplit('/', 1)[0]}/{kind}/{outcome}"
        assert PAN_RUN.search(text.encode()) is None


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_the_fast_rendering_equals_the_validated_model_for_every_type(event_type: str) -> None:
    from gateway.events import build_event

    fact = fact_for(event_type)
    moment = datetime(2026, 11, 22, 10, 0, 0, 123456, tzinfo=UTC)
    _, payload = render_event(fact, event_id="e-1", instance_id="gw", time=moment, topic_prefix=PREFIX)
    validated = build_event(fact, event_id="e-1", instance_id="gw", time=moment)
    assert orjson.loads(payload) == validated.model_dump(mode="json")


def test_event_ids_are_random_uuids_in_canonical_form_and_never_repeat() -> None:
    import uuid

    from gateway.events import new_event_id

    ids = [new_event_id() for _ in range(3000)]  # several refills of the random pool
    assert len(set(ids)) == len(ids)
    for text in ids[:300]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_reuse_its_parents_random_bytes() -> None:
    import os

    from gateway.events import new_event_id

    new_event_id()  # the pool holds bytes the child would otherwise also hold
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(write, new_event_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != new_event_id()
