"""The ``iso87`` dialect (design section 4): the builders of :mod:`terminal_emulator.messages` behind
the :class:`~terminal_emulator.dialects.Dialect` seam.

Originals are named by DE37 (void, refund) or DE90 (completion, reversal, refund by original data);
totals travel in DE74/76/86/88 and the host's verdict is DE39 (00 balanced, 95 not balanced).
"""

from __future__ import annotations

from collections.abc import Mapping

from .. import messages
from ..codec import IsoMessage
from ..errors import UsageError
from ..journal import PendingReversal, TransactionRecord
from ..messages import DEFAULT_PAN, Stamp, Totals
from . import Card, LoadReference, Reconciliation, Station

__all__ = ["ISO87", "Iso87"]

_ZERO_RRN = "000000000000"
#: a settlement answer's DE39: 00 the totals agree, 95 they do not (design section 5)
_VERDICTS: Mapping[str, Reconciliation] = {"00": "balanced", "95": "not_balanced"}


class Iso87:
    name = "iso87"
    default_pan = DEFAULT_PAN
    default_currency = "840"
    reversal_has_own_stan = True
    has_batch_upload = False

    def purchase(self, st: Stamp, station: Station, card: Card, amount: int, currency: str) -> IsoMessage:
        return messages.purchase(st, tid=station.tid, mid=station.mid, pan=card.pan, amount=amount,
                                 currency=currency, expiry=card.expiry)

    def preauth(self, st: Stamp, station: Station, card: Card, amount: int, currency: str) -> IsoMessage:
        return messages.preauth(st, tid=station.tid, mid=station.mid, pan=card.pan, amount=amount,
                                currency=currency, expiry=card.expiry)

    def completion(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        preauth: TransactionRecord | None, approval_code: str | None,
    ) -> IsoMessage:
        return messages.completion(st, tid=station.tid, mid=station.mid, pan=card.pan, amount=amount,
                                   currency=currency, approval_code=approval_code,
                                   original=preauth.original if preauth else None)

    def void(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        rrn: str, original: TransactionRecord | None,
    ) -> IsoMessage:
        return messages.void(st, tid=station.tid, mid=station.mid, pan=card.pan, amount=amount, currency=currency,
                             original_rrn=rrn)

    def refund(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        rrn: str | None, original: TransactionRecord | None, by_original_data: bool,
    ) -> IsoMessage:
        ref = original.original if (by_original_data and original) else None
        return messages.refund(st, tid=station.tid, mid=station.mid, pan=card.pan, amount=amount,
                               currency=currency, original_rrn=None if by_original_data else rrn, original=ref)

    def reversal(self, st: Stamp, station: Station, pan: str, pending: PendingReversal) -> IsoMessage:
        return messages.reversal(
            st, tid=station.tid, mid=station.mid, pan=pan, processing_code=pending.processing_code,
            amount=pending.amount, currency=pending.currency, original=pending.original,
            advice=pending.mti.startswith("042"), partial_amount=pending.partial_amount,
        )

    def repeat_mti(self, mti: str) -> str:
        return mti[:3] + "1"

    def settlement(self, st: Stamp, station: Station, currency: str, totals: Totals, others: Totals) -> IsoMessage:
        return messages.settlement(st, tid=station.tid, mid=station.mid, currency=currency, totals=totals)

    def in_main_totals(self, record: TransactionRecord) -> bool:
        return True

    def batch_upload(self, st: Stamp, station: Station, record: TransactionRecord, pan: str) -> IsoMessage:
        raise UsageError("the iso87 dialect has no batch upload: a settlement is answered 00 or 95")

    def batch_end(self, st: Stamp, station: Station, count: int) -> IsoMessage:
        raise UsageError("the iso87 dialect has no batch upload: a settlement is answered 00 or 95")

    def echo(self, st: Stamp, station: Station, code: str) -> IsoMessage:
        return messages.echo(st, tid=station.tid, mid=station.mid, code=code)

    def signon(self, st: Stamp, station: Station, operator: str) -> IsoMessage:
        return messages.echo(st, tid=station.tid, mid=station.mid, code="001")

    def signed_on_batch(self, response: IsoMessage) -> int | None:
        return None  # the gateway opens a batch with the terminal's first transaction

    def reconciliation(self, response: IsoMessage) -> Reconciliation | None:
        return _VERDICTS.get(response.get(39) or "")

    def totals_sent(self, request: IsoMessage) -> Totals | None:
        if 74 not in request.fields:
            return None
        return Totals(
            credits_count=int(request.fields[74]), credits_amount=int(request.get(86) or 0),
            debits_count=int(request.get(76) or 0), debits_amount=int(request.get(88) or 0),
        )

    def original_stan(self, request: IsoMessage) -> str | None:
        reference = request.get(90)
        return reference[4:10] if reference else None

    def load_templates(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str
    ) -> Mapping[str, IsoMessage]:
        return {
            "purchase": self.purchase(st, station, card, amount, currency),
            "refund": messages.refund(st, tid=station.tid, mid=station.mid, pan=card.pan, amount=amount,
                                      currency=currency, original_rrn=_ZERO_RRN),
            "void": self.void(st, station, card, amount, currency, rrn=_ZERO_RRN, original=None),
            "reversal": messages.reversal(
                st, tid=station.tid, mid=station.mid, pan=card.pan, processing_code="000000", amount=amount,
                currency=currency, original=("0200", "000000", "0000000000"),
            ),
        }

    def load_reference(self, kind: str, original: LoadReference, batch: int) -> dict[int, str]:
        if kind == "reversal":
            return {90: messages.original_data_elements("0200", original.stan, original.transmitted)}
        return {37: original.rrn}


ISO87 = Iso87()
