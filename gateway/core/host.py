"""Messages for the acquirer host as typed values, built from ledger records (sans-I/O).

The gateway's own STAN and RRN identify a record at the host: DE37 is the record's RRN, DE11 is
derived from it (:func:`upstream_stan`) and DE7 is the record's time, so a reversal queued for the
host, even after a restart, names exactly what the host got (DE90). No card data: the PAN and card
fields of a forwarded request come from the terminal's message in memory (``gateway.protocol.host``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.core.model import Kind, SafItem, Txn


@dataclass(frozen=True, slots=True)
class HostReference:
    """The original as the host got it (DE90: its MTI, STAN and DE7), and its RRN and approval code."""

    mti: str
    stan: str
    transmission_time: str
    rrn: str | None
    approval_code: str | None


@dataclass(frozen=True, slots=True)
class HostRequest:
    """A message for the acquirer host, as typed values (no card data: the service adds the card fields
    of the terminal's request, which only memory holds; ``gateway.protocol.host`` renders it)."""

    mti: str
    processing_code: str
    amount: int
    currency: str
    stan: str  #: derived from ``rrn`` (:func:`upstream_stan`)
    transmission_time: str  #: the record's time (:func:`upstream_time`)
    rrn: str
    merchant_id: str
    terminal_id: str
    original: HostReference | None = None
    replacement_amount: int | None = None  #: DE95: a partial reversal's new amount
    approval_code: str | None = None  #: DE38: an advice's stand-in approval
    response_code: str | None = None  #: DE39: an advice's answer


def host_reference(txn: Txn) -> HostReference:
    assert txn.rrn is not None
    forwarded = f"{txn.mti[:3]}0"
    return HostReference(forwarded, upstream_stan(txn.rrn), upstream_time(txn.created_at), txn.rrn, txn.approval_code)


def host_request(record: Txn, original: Txn | None) -> HostRequest:
    """What the host gets for a pending record: its first copy's MTI, this gateway's RRN and STAN."""
    assert record.rrn is not None
    reference = host_reference(original) if original is not None and original.rrn is not None else None
    return HostRequest(
        mti=f"{record.mti[:3]}0", processing_code=record.processing_code, amount=record.amount,
        currency=record.currency, stan=upstream_stan(record.rrn), transmission_time=upstream_time(record.created_at),
        rrn=record.rrn, merchant_id=record.merchant_id, terminal_id=record.terminal_id, original=reference,
    )  # fmt: skip


def host_saf_message(item: SafItem, now: datetime) -> HostRequest:
    """A queued entry as sent: a reversal (0420, repeats 0421) naming the record in DE90, or an advice of a
    stand-in approval (0220 / 0120 for a pre-auth; repeats xx21). Each repeat keeps the STAN."""
    txn = item.txn
    assert txn.rrn is not None
    repeat = "1" if item.attempts else "0"
    if item.action == "reverse":
        return HostRequest(
            mti=f"042{repeat}", processing_code=txn.processing_code, amount=txn.amount, currency=txn.currency,
            stan=upstream_stan(txn.rrn), transmission_time=upstream_time(now), rrn=txn.rrn,
            merchant_id=txn.merchant_id, terminal_id=txn.terminal_id, original=host_reference(txn),
            replacement_amount=item.amount,
        )  # fmt: skip
    advice_class = "012" if txn.kind is Kind.PREAUTH else "022"
    return HostRequest(
        mti=f"{advice_class}{repeat}", processing_code=txn.processing_code, amount=txn.amount,
        currency=txn.currency, stan=upstream_stan(txn.rrn), transmission_time=upstream_time(now), rrn=txn.rrn,
        merchant_id=txn.merchant_id, terminal_id=txn.terminal_id, approval_code=txn.approval_code,
        response_code=txn.response_code,
    )  # fmt: skip


def upstream_stan(rrn: str) -> str:
    """The STAN (DE11) of the host's messages about the record with this RRN: unique among the last
    999,999 records (RRNs are), never 000000, the same for every repeat of a queued reversal."""
    return f"{int(rrn) % 999_999 + 1:06d}"


def upstream_time(moment: datetime) -> str:
    """DE7 of a message to the host (MMDDhhmmss, UTC)."""
    return moment.strftime("%m%d%H%M%S")
