"""Batch upload: after a settlement that did not balance, a UnionPay terminal lists the transactions of
its batch (0320), then ends the upload; the gateway compares the list with the ledger's records of that
batch, record by record, so that an operator sees which transactions the two disagree on. Pure.
"""

from __future__ import annotations

from gateway.core.cards import mask_pan, pan_digest
from gateway.core.model import Kind, Txn, TxnStatus, UploadedLine, UploadLine

#: what a terminal's batch upload lists: the transactions settlement totals count
UPLOADED_KINDS = frozenset({Kind.PURCHASE, Kind.COMPLETION, Kind.REFUND})


def kept_line(line: UploadLine, key: bytes, recorded_hmac: str | None) -> UploadedLine:
    """The line as the ledger keeps it, its card masked and keyed-hashed. The listed card is the PAN
    filled with zeros to 20 digits, so a PAN ending in 0 cannot be told from the fill: every length from
    its last non-zero digit up to 19 is a candidate, and the one whose keyed hash is that of the ledger's
    record with this trace (``recorded_hmac``) is the card; none is: the shortest, shown as another card."""
    significant = len(line.card.rstrip("0"))
    candidates = [line.card[:length] for length in range(max(significant, 12), min(len(line.card), 19) + 1)]
    if not candidates:
        return UploadedLine(line.stan, line.amount, None, None)
    digests = [pan_digest(key, pan) for pan in candidates]
    chosen = digests.index(recorded_hmac) if recorded_hmac in digests else 0
    return UploadedLine(line.stan, line.amount, mask_pan(candidates[chosen]), digests[chosen])


def differences(ledger: list[Txn], uploaded: list[UploadedLine]) -> list[dict[str, object]]:
    """Every transaction the ledger and the terminal disagree on, by trace number (DE11), in trace order:

    - ``not_on_terminal``: approved and standing in the ledger (not voided or reversed), not listed;
    - ``not_in_ledger``: listed, but the ledger has no approved, standing record of it (its status says
      why when it has one: declined, voided, reversed);
    - ``amount``: listed with another amount than the ledger's (after partial reversals);
    - ``card``: listed with another card than the ledger's (compared by keyed hash).
    """
    recorded = {txn.stan: txn for txn in ledger if txn.kind in UPLOADED_KINDS}  # id order: the latest wins
    listed = {line.stan: line for line in uploaded}
    found: list[dict[str, object]] = []
    for stan in sorted(recorded.keys() | listed.keys()):
        txn, line = recorded.get(stan), listed.get(stan)
        standing = txn is not None and txn.status is TxnStatus.APPROVED
        if line is None:
            difference = "not_on_terminal" if standing else None
        elif txn is None or not standing:
            difference = "not_in_ledger"
        elif txn.effective_amount != line.amount:
            difference = "amount"
        elif txn.pan_hmac != line.pan_hmac:
            difference = "card"
        else:
            difference = None
        if difference is not None:
            found.append(_line(difference, stan, txn, line))
    return found


def _line(difference: str, stan: str, txn: Txn | None, line: UploadedLine | None) -> dict[str, object]:
    return {
        "difference": difference,
        "stan": stan,
        "kind": txn.kind.value if txn is not None else None,
        "rrn": txn.rrn if txn is not None else None,
        "ledger_status": txn.status.value if txn is not None else None,
        "ledger_amount": txn.effective_amount if txn is not None else None,
        "terminal_amount": line.amount if line is not None else None,
        "pan": (line.pan_masked if line is not None else None) or (txn.pan_masked if txn is not None else None),
    }
