"""The ``cup`` dialect: UnionPay POS practice (profile ``cup-pos``, issue 25).

A transaction is MTI + processing code (3) + transaction type (60.1); 25 is 00 for sales and 06 for
the pre-auth family; no DE7 and no DE12/13 in requests (the host's time comes back in 12/13).

| request          | MTI  | 3      | 25 | 60.1 | names the original by                        |
|------------------|------|--------|----|------|----------------------------------------------|
| sale             | 0200 | 000000 | 00 | 22   |                                              |
| void             | 0200 | 200000 | 00 | 23   | 37 RRN, 61 = original batch n6 + trace n6 *  |
| refund           | 0220 | 200000 | 00 | 25   | 37 RRN, 61 = 000000 000000 + original MMDD   |
| pre-auth         | 0100 | 030000 | 06 | 10   |                                              |
| pre-auth void    | 0100 | 200000 | 06 | 11   | 38 approval code, 61 = zeros + pre-auth MMDD |
| completion       | 0200 | 000000 | 06 | 20   | 38 approval code, 61 = zeros + pre-auth MMDD |
| completion void  | 0200 | 200000 | 06 | 21   | 37, 38, 61 = completion batch + trace        |
| reversal         | 0400 | the original's fields again (same 11 and 60), 39 = 98 no answer / 06 other |
| sign-on          | 0800 | 60 = 00 + batch + 003, 63 = operator; the 0810's 60.2 is the batch to use  |
| echo             | 0820 | 60 = 00 + batch + 301                                                      |
| settlement       | 0500 | 60 = 00 + batch + 201, 48 = totals; the 0510's 48 holds the verdict       |
| batch upload     | 0320 | 60 = 00 + batch + 201, 48 = 01 + org + trace + PAN n20 + amount (one each)  |
| batch end        | 0320 | 60 = 00 + batch + 207, 48 = transactions uploaded n4                       |

(*) 61 = zeros when the journal does not hold the original (its answer was lost): 37 alone names it.

60 = 60.1 type n2 + 60.2 batch n6 + 60.3 network code n3 (000 for transactions); a sale adds 60.4
read capability 6 (contact and contactless chip), 60.5 chip condition 0, 60.6 partial approval 1.
Field 48 of a settlement: domestic (UnionPay, BIN 62) debit amount n12, count n3, credit amount n12,
count n3, result n1, then the same for foreign cards; the answer's result digits are 1 balanced,
2 not balanced, 3 error (0 none).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..codec import IsoMessage
from ..errors import UsageError
from ..journal import PendingReversal, TransactionRecord
from ..messages import Stamp, Totals
from . import CARD_FIELDS, Card, LoadReference, Reconciliation, Station

__all__ = ["CUP", "Cup"]

#: 60.1 by what the request does
TYPES: Mapping[str, str] = {
    "signon": "00", "preauth": "10", "preauth_void": "11", "completion": "20", "completion_void": "21",
    "purchase": "22", "void": "23", "completion_advice": "24", "refund": "25",
}
ENTRY_MODE = "021"  # 22: PAN read from the magnetic stripe, the terminal can take a PIN
SALE_CAPABILITY = "601"  # 60.4-60.6 of a sale
DOMESTIC_BIN = "62"  # UnionPay's own card range: 内卡; other cards are foreign (外卡)
_NO_ORIGINAL_TRACE = "000000000000"  # 61.1 + 61.2 of a refund or completion: only the date counts
_VERDICTS: Mapping[str, Reconciliation] = {"1": "balanced", "2": "not_balanced", "3": "error"}


def field60(type_code: str, batch: int, network: str = "000", tail: str = "") -> str:
    return f"{type_code}{batch:06d}{network}{tail}"


def totals48(totals: Totals, result: str = "0") -> str:
    """One half of field 48: debit amount n12, count n3, credit amount n12, count n3, result n1."""
    if max(totals.debits_count, totals.credits_count) > 999:
        raise UsageError("UnionPay settlement counts are 3 digits: settle before 1000 transactions")
    if max(totals.debits_amount, totals.credits_amount) >= 10**12:
        raise UsageError("UnionPay settlement amounts are 12 digits")
    return (f"{totals.debits_amount:012d}{totals.debits_count:03d}"
            f"{totals.credits_amount:012d}{totals.credits_count:03d}{result}")


def _parse48(value: str) -> list[tuple[Totals, str]]:
    """The 31-digit halves of a settlement's 48 (a host's malformed half is skipped, never a crash)."""
    halves = []
    for start in range(0, len(value) - 30, 31):
        part = value[start : start + 31]
        if not part.isdigit():
            continue
        halves.append((Totals(debits_amount=int(part[0:12]), debits_count=int(part[12:15]),
                              credits_amount=int(part[15:27]), credits_count=int(part[27:30])), part[30]))
    return halves


def _date(record: TransactionRecord | None, st: Stamp) -> str:
    """The original's MMDD: the host's date from the journal, else today's (a slip from today)."""
    return (record.date if record and record.date else None) or st.local_date


class Cup:
    name = "cup"
    default_pan = "6217001234567890122"  # a UnionPay test number (Luhn-valid)
    default_currency = "156"  # CNY
    reversal_has_own_stan = False
    has_batch_upload = True

    # --- requests ------------------------------------------------------------------------------
    def _financial(
        self, mti: str, processing_code: str, kind: str, st: Stamp, station: Station, card: Card, amount: int,
        currency: str, *, extra: Mapping[int, str] | None = None,
    ) -> IsoMessage:
        fields: dict[int, str] = {
            2: card.pan, 3: processing_code, 4: f"{amount:012d}", 11: st.stan, 22: ENTRY_MODE,
            25: "06" if kind in ("preauth", "preauth_void", "completion", "completion_void") else "00",
            41: station.tid, 42: station.mid, 49: currency,
            60: field60(TYPES[kind], station.batch, tail=SALE_CAPABILITY if kind == "purchase" else ""),
        }
        if card.expiry:
            fields[14] = card.expiry
        if extra:
            fields.update(extra)
        return IsoMessage(mti=mti, fields=dict(sorted(fields.items())))

    def purchase(self, st: Stamp, station: Station, card: Card, amount: int, currency: str) -> IsoMessage:
        return self._financial("0200", "000000", "purchase", st, station, card, amount, currency)

    def preauth(self, st: Stamp, station: Station, card: Card, amount: int, currency: str) -> IsoMessage:
        return self._financial("0100", "030000", "preauth", st, station, card, amount, currency)

    def completion(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        preauth: TransactionRecord | None, approval_code: str | None,
    ) -> IsoMessage:
        if not approval_code:
            raise UsageError("a UnionPay completion names its pre-authorization by approval code (38)")
        extra = {38: approval_code, 61: _NO_ORIGINAL_TRACE + _date(preauth, st)}
        return self._financial("0200", "000000", "completion", st, station, Card(card.pan), amount, currency,
                               extra=extra)

    def void(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        rrn: str, original: TransactionRecord | None,
    ) -> IsoMessage:
        plain = Card(card.pan)
        if original is None:  # e.g. a sale whose answer was lost: the RRN names it, 61 says "unknown"
            return self._financial("0200", "200000", "void", st, station, plain, amount, currency,
                                   extra={37: rrn, 61: _NO_ORIGINAL_TRACE})
        if original.kind == "preauth":
            if not original.approval_code:
                raise UsageError("the pre-authorization has no approval code to void")
            extra = {38: original.approval_code, 61: _NO_ORIGINAL_TRACE + _date(original, st)}
            return self._financial("0100", "200000", "preauth_void", st, station, plain, amount, currency,
                                   extra=extra)
        extra = {37: rrn, 61: f"{original.batch:06d}{original.stan}"}
        if original.kind == "completion":
            if original.approval_code:
                extra[38] = original.approval_code
            return self._financial("0200", "200000", "completion_void", st, station, plain, amount, currency,
                                   extra=extra)
        return self._financial("0200", "200000", "void", st, station, plain, amount, currency, extra=extra)

    def refund(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str, *,
        rrn: str | None, original: TransactionRecord | None, by_original_data: bool,
    ) -> IsoMessage:
        if by_original_data:
            raise UsageError("--by-original-data is iso87's DE90; a UnionPay refund names its original by 37 and 61")
        extra = {37: rrn, 61: _NO_ORIGINAL_TRACE + _date(original, st)} if rrn else {}
        return self._financial("0220", "200000", "refund", st, station, Card(card.pan), amount, currency,
                               extra=extra)

    def reversal(self, st: Stamp, station: Station, pan: str, pending: PendingReversal) -> IsoMessage:
        if pending.mti != "0400" or pending.partial_amount is not None:
            raise UsageError("UnionPay terminals reverse with a full 0400: no advice, no partial reversal")
        if not pending.original_fields:
            raise UsageError(f"the journal does not hold the request of STAN {pending.original_stan} to repeat")
        fields = {int(k): v for k, v in pending.original_fields.items() if int(k) not in CARD_FIELDS}
        fields[2] = pan
        fields[39] = pending.reason
        return IsoMessage(mti="0400", fields=dict(sorted(fields.items())))

    def repeat_mti(self, mti: str) -> str:
        return mti  # a UnionPay terminal repeats a reversal as it was

    def settlement(self, st: Stamp, station: Station, currency: str, totals: Totals, others: Totals) -> IsoMessage:
        fields = {11: st.stan, 41: station.tid, 42: station.mid, 48: totals48(totals) + totals48(others),
                  49: currency, 60: field60("00", station.batch, "201")}
        return IsoMessage(mti="0500", fields=fields)

    def in_main_totals(self, record: TransactionRecord) -> bool:
        return record.masked_pan.startswith(DOMESTIC_BIN)

    def batch_upload(self, st: Stamp, station: Station, record: TransactionRecord, pan: str) -> IsoMessage:
        # 48 = count n2 (one transaction a message) + card organisation n2 (00 UnionPay, 01 other) + its
        # trace n6 + PAN n20 (left-aligned, 0-filled) + amount n12, as tests/vectors/cup/12-batch-upload.md
        organisation = "00" if self.in_main_totals(record) else "01"
        entry = f"01{organisation}{record.stan}{pan:0<20}{record.effective_amount:012d}"
        fields = {11: st.stan, 41: station.tid, 42: station.mid, 48: entry, 60: field60("00", station.batch, "201")}
        return IsoMessage(mti="0320", fields=fields)

    def batch_end(self, st: Stamp, station: Station, count: int) -> IsoMessage:
        fields = {11: st.stan, 41: station.tid, 42: station.mid, 48: f"{count:04d}",
                  60: field60("00", station.batch, "207")}
        return IsoMessage(mti="0320", fields=fields)

    def echo(self, st: Stamp, station: Station, code: str) -> IsoMessage:
        mti = "0820" if code == "301" else "0800"
        return IsoMessage(mti=mti, fields={11: st.stan, 41: station.tid, 42: station.mid,
                                           60: field60("00", station.batch, code)})

    def signon(self, st: Stamp, station: Station, operator: str) -> IsoMessage:
        fields = {11: st.stan, 41: station.tid, 42: station.mid, 60: field60("00", station.batch, "003"),
                  63: f"{operator:<3}"}
        return IsoMessage(mti="0800", fields=fields)

    # --- reading answers and requests ----------------------------------------------------------
    def signed_on_batch(self, response: IsoMessage) -> int | None:
        value = response.get(60) or ""
        if response.get(39) != "00" or len(value) < 8 or not value[2:8].isdigit() or int(value[2:8]) == 0:
            return None
        return int(value[2:8])

    def reconciliation(self, response: IsoMessage) -> Reconciliation | None:
        if response.get(39) != "00":
            return None
        digits = {result for _, result in _parse48(response.get(48) or "")}
        for digit in ("3", "2", "1"):  # the worst verdict of the two halves
            if digit in digits:
                return _VERDICTS[digit]
        return None

    def totals_sent(self, request: IsoMessage) -> Totals | None:
        halves = [totals for totals, _ in _parse48(request.get(48) or "")] if request.mti.startswith("05") else []
        if not halves:
            return None
        return Totals(  # domestic and foreign cards together, as the gateway compares them
            credits_count=sum(t.credits_count for t in halves), credits_amount=sum(t.credits_amount for t in halves),
            debits_count=sum(t.debits_count for t in halves), debits_amount=sum(t.debits_amount for t in halves),
        )

    def original_stan(self, request: IsoMessage) -> str | None:
        if request.mti.startswith("04"):
            return request.stan
        reference = request.get(61) or ""
        return reference[6:12] if len(reference) >= 12 and reference[6:12] != "000000" else None

    # --- load mode -----------------------------------------------------------------------------
    def load_templates(
        self, st: Stamp, station: Station, card: Card, amount: int, currency: str
    ) -> Mapping[str, IsoMessage]:
        sale = self.purchase(st, station, card, amount, currency)
        placeholder = {37: "000000000000", 61: "0" * 12}
        refund_ref = {37: "000000000000", 61: "0" * 16}
        reversal = {k: v for k, v in sale.fields.items() if k not in CARD_FIELDS} | {2: card.pan, 39: "98"}
        return {
            "purchase": sale,
            "void": self._financial("0200", "200000", "void", st, station, Card(card.pan), amount, currency,
                                    extra=placeholder),
            "refund": self._financial("0220", "200000", "refund", st, station, Card(card.pan), amount, currency,
                                      extra=refund_ref),
            "reversal": IsoMessage(mti="0400", fields=dict(sorted(reversal.items()))),
        }

    def load_reference(self, kind: str, original: LoadReference, batch: int) -> dict[int, str]:
        if kind == "reversal":
            return {11: original.stan}
        if kind == "void":
            return {37: original.rrn, 61: f"{batch:06d}{original.stan}"}
        return {37: original.rrn, 61: _NO_ORIGINAL_TRACE + original.date}


CUP = Cup()
