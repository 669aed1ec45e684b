"""Correction events as CloudEvents 1.0, structured JSON mode (design section 6).

``render_event`` turns a pure ``CorrectionEvent`` fact into the MQTT topic and the JSON payload
that the outbox stores and the relay publishes. The pydantic models below are the published
contract: ``export_schemas`` writes one JSON Schema per event type from them, and consumers may use
``parse_event`` to read a payload back.

Decisions (documented in docs/events.md):

- Topic: ``{prefix}/{merchant_id}/{terminal_id}/{kind}/{outcome}``. Merchant and terminal ids are
  ISO 8583 ``ans`` fields that may hold padding or any printable character, so each id becomes one
  safe topic level: surrounding whitespace (fixed-length padding) is stripped, then ``%``, ``/``,
  the MQTT wildcards ``+`` and ``#``, whitespace and control characters are percent-encoded
  (``%2F``, ``%2B``, ``%23``, ...). The encoding is reversible and never lets an id add a topic level
  or act as a wildcard. An empty id becomes ``-``.
- ``subject`` is ``{merchant}/{terminal}/{rrn}`` built from the same safe segments; it is also the
  outbox ordering key (events about one original are published in order).
- The PAN in ``data.request.pan`` is always masked here (first 6 + last 4), even if a caller hands in
  a full one; anything that does not look like a PAN is fully starred.
- Times are RFC 3339 UTC with milliseconds and ``Z``.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, get_args
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from gateway.core.cards import mask_pan
from gateway.core.events import BalanceInfo, CorrectionEvent, OriginalInfo, RequestInfo

__all__ = [
    "DATACONTENTTYPE",
    "EVENT_TYPES",
    "SPECVERSION",
    "BalanceData",
    "CloudEvent",
    "CorrectionData",
    "EventType",
    "OriginalData",
    "RequestData",
    "event_schema",
    "event_subject",
    "format_time",
    "mask_pan",
    "new_event_id",
    "parse_event",
    "render_event",
    "topic_segment",
    "validate_topic_prefix",
]

SPECVERSION = "1.0"
DATACONTENTTYPE = "application/json"
SOURCE_SCHEME = "urn:iso-gateway:"

EventType = Literal[
    "pos.void.approved",
    "pos.void.declined",
    "pos.refund.approved",
    "pos.refund.declined",
    "pos.completion.approved",
    "pos.completion.declined",
    "pos.reversal.applied",
    "pos.reversal.unmatched",
    "pos.reversal.late",
    "pos.reversal.declined",
    "pos.reversal.conflict",
    "pos.duplicate.replayed",
    "pos.duplicate.conflict",
    "pos.batch.settled",
    "pos.batch.mismatch",
    "pos.batch.closed",
    "pos.upstream.reversal_queued",
    "pos.upstream.reversal_acknowledged",
    "pos.upstream.reversal_failed",
]

#: Every event type the gateway publishes, in documentation order.
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
_EVENT_TYPE_SET = frozenset(EVENT_TYPES)

_TIME_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
_MASKED_PAN_PATTERN = r"^(?:[0-9]{6}\*{3,}[0-9]{4}|\*+)$"

Timestamp = Annotated[
    str,
    Field(
        pattern=_TIME_PATTERN,
        json_schema_extra={"format": "date-time"},
        description="RFC 3339, UTC, milliseconds, 'Z'",
    ),
]
Amount = Annotated[int, Field(ge=0, description="minor units of the currency")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RequestData(_Model):
    """The correction request as the terminal sent it (wire values, masked PAN)."""

    mti: str = Field(description="message type indicator of the request")
    stan: str = Field(description="DE11 system trace audit number")
    rrn: str | None = Field(description="DE37 retrieval reference number the gateway assigned")
    amount: Amount | None = Field(description="DE4 in minor units")
    currency: str | None = Field(description="DE49 ISO 4217 numeric currency code")
    pan: Annotated[str, Field(pattern=_MASKED_PAN_PATTERN)] | None = Field(
        description="masked PAN: first 6 + last 4 digits"
    )


class OriginalData(_Model):
    """The original authorization the correction points at, as recorded in the ledger."""

    mti: str
    stan: str = Field(description="DE11 of the original")
    rrn: str = Field(description="DE37 of the original")
    approval_code: str | None = Field(description="DE38 of the original")
    amount: Amount
    currency: str = Field(description="ISO 4217 numeric")
    batch: str = Field(description="batch number the original belongs to")
    approved_at: Timestamp


class BalanceData(_Model):
    """The original's balance after this correction."""

    original_amount: Amount
    refunded: Amount
    reversed: Amount
    refundable: Amount
    status: str = Field(description="the original's state, e.g. approved, partially_refunded, voided")


class CorrectionData(_Model):
    """The ``data`` member of every correction event."""

    merchant_id: str = Field(description="DE42 card acceptor id")
    terminal_id: str = Field(description="DE41 card acceptor terminal id")
    response_code: str | None = Field(
        description="DE39 answered to the terminal; null for what the gateway did on its own (pos.batch.closed)"
    )
    reason: str | None = Field(
        description="stable snake_case reason: why a request was refused, or what happened (a late or "
        "conflicting reversal, a batch closed by the cut-off); null when approved"
    )
    request: RequestData | None = Field(
        description="the request; null for what the gateway did on its own (pos.batch.closed)"
    )
    original: OriginalData | None = Field(description="null when no original was found")
    balance: BalanceData | None = Field(description="null when there is no original to balance")
    details: dict[str, JsonValue] = Field(
        description="kind-specific content, e.g. batch totals for pos.batch.*; empty when none"
    )


class CloudEvent(_Model):
    """A correction event, CloudEvents 1.0 structured JSON mode."""

    specversion: Literal["1.0"]
    id: str = Field(min_length=1, description="unique per event; consumers de-duplicate on it")
    source: str = Field(min_length=1, description="urn:iso-gateway:<instance id>")
    type: EventType
    time: Timestamp
    subject: str = Field(description="<merchant>/<terminal>/<rrn of the original, else of the request>")
    datacontenttype: Literal["application/json"]
    data: CorrectionData


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and ``Z`` (``2026-11-22T10:00:00.123Z``)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("event times must be timezone-aware")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"



_SEGMENT_UNSAFE = re.compile(r"[%/+#\x00-\x20\x7f-\x9f\s]")


@lru_cache(maxsize=8192)
def topic_segment(value: str) -> str:
    """One safe MQTT topic level for an id: stripped, wildcards/'/'/'%'/whitespace percent-encoded.

    Cached: merchant and terminal ids repeat on every event.
    """
    stripped = value.strip()
    if not stripped:
        return "-"
    return _SEGMENT_UNSAFE.sub(lambda m: quote(m.group(0), safe=""), stripped)


@lru_cache(maxsize=32)
def validate_topic_prefix(prefix: str) -> str:
    """Check a configured topic prefix; returns it unchanged or raises ``ValueError``."""
    if not prefix:
        raise ValueError("MQTT topic prefix must not be empty")
    if any(ch in prefix for ch in "+#\x00"):
        raise ValueError(f"MQTT topic prefix {prefix!r} must not contain '+', '#' or NUL")
    if prefix.startswith("$"):
        raise ValueError(f"MQTT topic prefix {prefix!r} must not start with '$' (reserved by brokers)")
    if prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
        raise ValueError(f"MQTT topic prefix {prefix!r} must not have empty levels")
    return prefix


def event_subject(fact: CorrectionEvent) -> str:
    """``{merchant}/{terminal}/{rrn}``: the CloudEvents subject and the outbox ordering key."""
    return "/".join((topic_segment(fact.merchant_id), topic_segment(fact.terminal_id), topic_segment(fact.subject_rrn)))


def _request(info: RequestInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "mti": info.mti,
        "stan": info.stan,
        "rrn": info.rrn,
        "amount": _amount(info.amount),
        "currency": info.currency,
        "pan": mask_pan(info.pan),
    }


def _original(info: OriginalInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "mti": info.mti,
        "stan": info.stan,
        "rrn": info.rrn,
        "approval_code": info.approval_code,
        "amount": _amount(info.amount),
        "currency": info.currency,
        "batch": info.batch,
        "approved_at": format_time(info.approved_at),
    }


def _balance(info: BalanceInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "original_amount": _amount(info.original_amount),
        "refunded": _amount(info.refunded),
        "reversed": _amount(info.reversed),
        "refundable": _amount(info.refundable),
        "status": info.status,
    }


def _amount(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ValueError("event amounts are never negative")
    return value


@lru_cache(maxsize=64)
def _source(instance_id: str) -> str:
    return SOURCE_SCHEME + quote(instance_id, safe=":-._~")


def event_document(fact: CorrectionEvent, *, event_id: str, instance_id: str, time: datetime) -> dict[str, Any]:
    """The CloudEvent for a fact as plain data, in exactly the shape of :class:`CloudEvent`.

    This is the hot path (one per correction); :func:`build_event` validates the same document with
    the pydantic models, and a test keeps the two equal for every event type.
    """
    event_type = fact.type
    if event_type not in _EVENT_TYPE_SET:
        raise ValueError(f"unknown correction event type {event_type!r}")
    if not event_id:
        raise ValueError("an event needs an id")
    return {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": _source(instance_id),
        "type": event_type,
        "time": format_time(time),
        "subject": event_subject(fact),
        "datacontenttype": DATACONTENTTYPE,
        "data": {
            "merchant_id": fact.merchant_id,
            "terminal_id": fact.terminal_id,
            "response_code": fact.response_code,
            "reason": fact.reason,
            "request": _request(fact.request),
            "original": _original(fact.original),
            "balance": _balance(fact.balance),
            "details": dict(fact.details),
        },
    }


def build_event(fact: CorrectionEvent, *, event_id: str, instance_id: str, time: datetime) -> CloudEvent:
    """The validated CloudEvent for a fact (the models check what :func:`event_document` builds)."""
    return CloudEvent.model_validate(event_document(fact, event_id=event_id, instance_id=instance_id, time=time))


def new_event_id() -> str:
    """A random (version 4) UUID: the CloudEvents ``id`` of a new event."""
    return str(uuid.uuid4())


def render_event(
    fact: CorrectionEvent,
    *,
    event_id: str,
    instance_id: str,
    time: datetime,
    topic_prefix: str,
) -> tuple[str, bytes]:
    """The MQTT topic and the CloudEvents JSON payload for one correction fact.

    Raises ``ValueError`` for an unknown event type, an invalid topic prefix or a naive time.
    """
    prefix = validate_topic_prefix(topic_prefix)
    document = event_document(fact, event_id=event_id, instance_id=instance_id, time=time)
    topic = "/".join(
        (prefix, topic_segment(fact.merchant_id), topic_segment(fact.terminal_id), fact.kind, fact.outcome)
    )
    return topic, orjson.dumps(document)


def parse_event(payload: bytes | str) -> CloudEvent:
    """Read a published payload back into the model (raises ``pydantic.ValidationError``)."""
    return CloudEvent.model_validate_json(payload)


def event_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one event type: the shared model, ``type`` fixed."""
    if event_type not in _EVENT_TYPE_SET:
        raise ValueError(f"unknown correction event type {event_type!r}")
    schema = CloudEvent.model_json_schema(mode="validation")
    schema["properties"]["type"] = {"const": event_type, "title": "Type", "type": "string"}
    kind, outcome = event_type.split(".")[1:]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{event_type}.schema.json",
        **schema,
        "title": event_type,
        "description": (
            f"Correction event '{event_type}' (kind {kind}, outcome {outcome}), CloudEvents 1.0 "
            "structured JSON. Published on {prefix}/{merchant_id}/{terminal_id}/" + f"{kind}/{outcome}."
        ),
    }
