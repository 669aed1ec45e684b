"""Stable decision reasons and the rule table (design section 5).

Each reason is a snake_case string that never changes meaning. The response code sent for a reason
belongs to the wire profile (``[dialect.response_codes]`` in ``specs/*.toml``); ``ISO87_CODES`` is the
``iso87`` map and ``docs/rules.md`` is kept equal to ``RULES`` by a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    APPROVED = "approved"
    # shared by corrections
    ORIGINAL_NOT_FOUND = "original_not_found"
    ORIGINAL_NOT_APPROVED = "original_not_approved"
    ALREADY_VOIDED = "already_voided"
    ALREADY_REVERSED = "already_reversed"
    PAN_MISMATCH = "pan_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    AMOUNT_MISMATCH = "amount_mismatch"
    INVALID_AMOUNT = "invalid_amount"
    HAS_LATER_ACTIVITY = "has_later_activity"
    # void
    NOT_VOIDABLE = "not_voidable"
    TERMINAL_MISMATCH = "terminal_mismatch"
    BATCH_SETTLED = "batch_settled"
    # refund
    UNREFERENCED_REFUND_DISABLED = "unreferenced_refund_disabled"
    NOT_REFUNDABLE = "not_refundable"
    EXCEEDS_REFUNDABLE = "exceeds_refundable"
    REFUND_WINDOW_EXPIRED = "refund_window_expired"
    REFUND_VELOCITY_COUNT = "refund_velocity_count"
    REFUND_VELOCITY_AMOUNT = "refund_velocity_amount"
    # completion
    NOT_COMPLETABLE = "not_completable"
    ALREADY_COMPLETED = "already_completed"
    PREAUTH_EXPIRED = "preauth_expired"
    # stand-in
    LUHN_FAILED = "luhn_failed"
    EXPIRED_CARD = "expired_card"
    OVER_LIMIT = "over_limit"
    REVERSED_BEFORE_ARRIVAL = "reversed_before_arrival"
    # reversal
    REVERSAL_UNMATCHED = "reversal_unmatched"
    # duplicates
    DUPLICATE_CONFLICT = "duplicate_conflict"
    # settlement
    SETTLEMENT_MISMATCH = "settlement_mismatch"
    # protocol and infrastructure
    FORMAT_ERROR = "format_error"
    TERMINAL_NOT_ALLOWED = "terminal_not_allowed"
    UNSUPPORTED_MESSAGE = "unsupported_message"
    SYSTEM_ERROR = "system_error"
    # acquirer host (GATEWAY_UPSTREAM__URL)
    UPSTREAM_DECLINED = "upstream_declined"  #: the host declined (the terminal gets the host's code)
    UPSTREAM_TIMEOUT = "upstream_timeout"  #: sent, no answer in time: a reversal is queued
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  #: no connection to the host: nothing was sent
    UPSTREAM_PENDING = "upstream_pending"  #: a repeat of a request whose host answer is awaited


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str  #: the request kind the rule applies to ("any" for shared ones)
    check: str  #: what must hold for the request to pass
    reason: Reason  #: the reason given when it does not
    code: str  #: the iso87 response code


#: Every check, in the order it is applied per kind. docs/rules.md mirrors this table.
RULES: tuple[Rule, ...] = (
    Rule("any", "terminal is on the allow-list (when one is configured)", Reason.TERMINAL_NOT_ALLOWED, "58"),
    Rule("any", "fields are present and well-formed", Reason.FORMAT_ERROR, "30"),
    Rule(
        "any",
        "a retransmission (same merchant, terminal, STAN and MTI class within the duplicate window; DE7 is not "
        "part of it) repeats the content of the first (DE2, 3, 4, 37, 49, 90)",
        Reason.DUPLICATE_CONFLICT,
        "94",
    ),
    Rule(
        "purchase, preauth, void, refund, completion",
        "not reversed before it arrived (no unmatched reversal of the same terminal named it)",
        Reason.REVERSED_BEFORE_ARRIVAL,
        "12",
    ),
    Rule("purchase, preauth", "amount > 0", Reason.INVALID_AMOUNT, "13"),
    Rule("purchase, preauth", "PAN passes the Luhn check", Reason.LUHN_FAILED, "14"),
    Rule("purchase, preauth", "card not expired (DE14)", Reason.EXPIRED_CARD, "54"),
    Rule("purchase, preauth", "amount within standin.max_amount", Reason.OVER_LIMIT, "61"),
    Rule("void", "original found (same merchant)", Reason.ORIGINAL_NOT_FOUND, "25"),
    Rule("void", "original approved", Reason.ORIGINAL_NOT_APPROVED, "12"),
    Rule("void", "original kind is voidable (purchase, completion, pre-auth)", Reason.NOT_VOIDABLE, "12"),
    Rule("void", "not already voided", Reason.ALREADY_VOIDED, "12"),
    Rule("void", "not already reversed", Reason.ALREADY_REVERSED, "12"),
    Rule("void", "no refund or completion against it, approved or awaiting the host", Reason.HAS_LATER_ACTIVITY, "12"),
    Rule("void", "same terminal as the original", Reason.TERMINAL_MISMATCH, "12"),
    Rule(
        "void", "original's batch still open: not settled, not past the cut-off (else use a refund)",
        Reason.BATCH_SETTLED, "12",
    ),
    Rule("void", "same card", Reason.PAN_MISMATCH, "14"),
    Rule("void", "same currency", Reason.CURRENCY_MISMATCH, "12"),
    Rule("void", "amount equals the original's", Reason.AMOUNT_MISMATCH, "64"),
    Rule("refund", "a reference is given, unless allowed for this terminal", Reason.UNREFERENCED_REFUND_DISABLED, "58"),
    Rule("refund", "original found (same merchant)", Reason.ORIGINAL_NOT_FOUND, "25"),
    Rule("refund", "original approved", Reason.ORIGINAL_NOT_APPROVED, "12"),
    Rule("refund", "original kind is purchase or completion", Reason.NOT_REFUNDABLE, "12"),
    Rule("refund", "original not voided", Reason.ALREADY_VOIDED, "12"),
    Rule("refund", "original not reversed", Reason.ALREADY_REVERSED, "12"),
    Rule("refund", "same card", Reason.PAN_MISMATCH, "14"),
    Rule("refund", "same currency", Reason.CURRENCY_MISMATCH, "12"),
    Rule("refund", "amount > 0", Reason.INVALID_AMOUNT, "13"),
    Rule(
        "refund", "amount <= original - approved refunds - refunds awaiting the host's answer",
        Reason.EXCEEDS_REFUNDABLE, "64",
    ),
    Rule("refund", "within policy.refund_window_days of the original", Reason.REFUND_WINDOW_EXPIRED, "12"),
    Rule(
        "refund", "daily (settlement time zone) refund count per terminal and per card",
        Reason.REFUND_VELOCITY_COUNT, "65",
    ),
    Rule(
        "refund", "daily (settlement time zone) refund amount per terminal and per card",
        Reason.REFUND_VELOCITY_AMOUNT, "61",
    ),
    Rule("completion", "pre-auth found (same merchant)", Reason.ORIGINAL_NOT_FOUND, "25"),
    Rule("completion", "pre-auth approved", Reason.ORIGINAL_NOT_APPROVED, "12"),
    Rule("completion", "original is a pre-auth", Reason.NOT_COMPLETABLE, "12"),
    Rule("completion", "pre-auth not voided", Reason.ALREADY_VOIDED, "12"),
    Rule("completion", "pre-auth not reversed", Reason.ALREADY_REVERSED, "12"),
    Rule("completion", "not already completed, nor a completion awaiting the host", Reason.ALREADY_COMPLETED, "12"),
    Rule("completion", "same card", Reason.PAN_MISMATCH, "14"),
    Rule("completion", "same currency", Reason.CURRENCY_MISMATCH, "12"),
    Rule("completion", "amount > 0", Reason.INVALID_AMOUNT, "13"),
    Rule("completion", "within policy.preauth_validity_days of the pre-auth", Reason.PREAUTH_EXPIRED, "12"),
    Rule("completion", "amount <= pre-auth x (1 + completion_tolerance_pct/100)", Reason.AMOUNT_MISMATCH, "64"),
    Rule(
        "reversal",
        "original found, from the same terminal: by DE90, else by STAN within the duplicate window with DE4 "
        "equal to the original's amount (0400 only; advices are accepted and leave a tombstone)",
        Reason.REVERSAL_UNMATCHED,
        "25",
    ),
    Rule(
        "reversal",
        "no refund or completion stands against the original, approved or awaiting the host (0400 only; advices "
        "apply)",
        Reason.HAS_LATER_ACTIVITY,
        "12",
    ),
    Rule(
        "settlement",
        "terminal totals equal the ledger's for every batch of the terminal no 0500 reconciled yet (the open "
        "one and those the cut-off closed)",
        Reason.SETTLEMENT_MISMATCH,
        "95",
    ),
    Rule(
        "upstream", "no earlier copy of this request still awaits the host's answer", Reason.UPSTREAM_PENDING, "09"
    ),
    Rule(
        "upstream",
        "the acquirer host approves (purchases and pre-auths after the local checks; voids, refunds and "
        "completions after the rules above): the terminal gets the host's DE39 and DE38",
        Reason.UPSTREAM_DECLINED,
        "05",
    ),
    Rule(
        "upstream", "a connection to the host is signed on (when_down = decline; standin applies the stand-in rules)",
        Reason.UPSTREAM_UNAVAILABLE, "91",
    ),
    Rule(
        "upstream", "the host answers within GATEWAY_UPSTREAM__TIMEOUT_S (else a reversal is queued for it)",
        Reason.UPSTREAM_TIMEOUT, "91",
    ),
    Rule("any", "the message type is supported", Reason.UNSUPPORTED_MESSAGE, "12"),
    Rule("any", "the ledger is reachable", Reason.SYSTEM_ERROR, "96"),
)

#: The iso87 dialect's reason -> DE39 map.
ISO87_CODES: dict[str, str] = {"approved": "00", **{rule.reason.value: rule.code for rule in RULES}}


def rules_table() -> str:
    """The rule table as Markdown (docs/rules.md embeds it; a test keeps them equal)."""
    lines = ["| kind | check, in order | reason | iso87 RC |", "|---|---|---|---|"]
    lines += [f"| {rule.kind} | {rule.check} | `{rule.reason.value}` | {rule.code} |" for rule in RULES]
    return "\n".join(lines) + "\n"
