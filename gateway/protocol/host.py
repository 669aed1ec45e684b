"""Messages to the acquirer host in ISO 8583:1987 (the ``iso87`` dialect the host link speaks), from the
typed :class:`~gateway.core.host.HostRequest`.

Pure. A forwarded request carries the card fields of the terminal's message, which only memory holds:
DE2 (or the PAN of DE35), DE14 expiry, DE22 entry mode, DE23 card sequence, DE35 track 2 and DE55 chip
data are copied as the terminal sent them. DE52 (a PIN block under the terminal's keys) is not: PINs
would need translating under the host's keys in an HSM, which this gateway does not have. Queued
reversals and advices carry no card data at all (the ledger holds none): the host finds the original by
DE37, DE11 and DE90.
"""

from __future__ import annotations

from gateway.core.host import HostRequest
from gateway.protocol.message import Message

#: card fields a forwarded request copies from the terminal's message
CARD_FIELDS: tuple[int, ...] = (2, 14, 22, 23, 35, 55)
#: DE32 acquiring institution and DE33 forwarding institution in DE90 when the host was not told them
_NO_INSTITUTION = "0" * 11


def host_message(request: HostRequest, terminal: Message | None = None) -> Message:
    """``request`` as an iso87 message, with the card fields of ``terminal`` (the terminal's request)."""
    fields: dict[int, str] = {}
    if terminal is not None:
        fields.update({number: terminal.fields[number] for number in CARD_FIELDS if number in terminal.fields})
    fields[3] = request.processing_code
    fields[4] = f"{request.amount:012d}"
    fields[7] = request.transmission_time
    fields[11] = request.stan
    fields[37] = request.rrn
    original = request.original
    if request.approval_code is not None:
        fields[38] = request.approval_code
    elif original is not None and original.approval_code is not None and request.mti[:3] == "022":
        fields[38] = original.approval_code  # a completion names its pre-auth's approval too
    if request.response_code is not None:
        fields[39] = request.response_code
    fields[41] = request.terminal_id.ljust(8)
    fields[42] = request.merchant_id.ljust(15)
    fields[49] = request.currency
    if original is not None:
        fields[90] = f"{original.mti}{original.stan}{original.transmission_time}{_NO_INSTITUTION}{_NO_INSTITUTION}"
    if request.replacement_amount is not None:
        fields[95] = f"{request.replacement_amount:012d}" + "0" * 30
    return Message(request.mti, dict(sorted(fields.items())))
