"""How ``iso-terminal`` prints an exchange: one JSON object, or two human lines (request, answer).

Card data never prints: fields go through :meth:`IsoMessage.masked` (PAN first 6 + last 4; track,
PIN and EMV data redacted), and the human lines show the masked card only.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from .dialects import Dialect
from .exchange import Exchange
from .masking import mask_pan
from .money import format_minor

__all__ = ["RESPONSE_TEXT", "describe_request", "describe_response", "emit"]

#: Response code meanings for the human-readable output (iso87 and UnionPay codes).
RESPONSE_TEXT = {
    "00": "approved",
    "06": "error",
    "12": "invalid transaction",
    "13": "invalid amount",
    "14": "invalid card number",
    "22": "wrong operation or past the allowed days",
    "25": "original not found",
    "30": "format error",
    "40": "function not supported",
    "54": "expired card",
    "58": "not permitted to terminal",
    "61": "exceeds amount limit",
    "64": "original amount incorrect",
    "65": "exceeds frequency limit",
    "91": "issuer or switch unavailable",
    "94": "duplicate transmission",
    "95": "reconciliation error",
    "96": "system malfunction",
    "97": "terminal not registered",
    "98": "no answer",
    "A0": "MAC error",
}


def emit(exchange: Exchange, dialect: Dialect, *, as_json: bool, prefix: str = "") -> None:
    if as_json:
        obj: dict[str, Any] = {
            "mti": exchange.response.mti if exchange.response is not None else None,
            "fields": exchange.response.masked() if exchange.response is not None else {},
            "kind": exchange.kind,
            "outcome": exchange.outcome,
            "elapsed_ms": exchange.elapsed_ms,
            "request": {"mti": exchange.request.mti, "fields": exchange.request.masked()},
        }
        typer.echo(json.dumps(obj, separators=(",", ":")))
        return
    typer.echo(prefix + describe_request(exchange, dialect))
    typer.echo(prefix + describe_response(exchange, dialect))


def describe_request(exchange: Exchange, dialect: Dialect) -> str:
    req = exchange.request
    parts = [f"-> {req.mti} {exchange.kind:<10}", f"STAN {req.get(11) or '-'}"]
    amount = req.get(4)
    if amount is not None:
        cur = req.get(49) or dialect.default_currency
        parts.append(f"amount {format_minor(int(amount), cur)} {cur}")
    pan = req.get(2)
    if pan:
        parts.append(f"card {mask_pan(pan)}")
    for number, label in ((37, "ref RRN"), (38, "ref auth"), (60, "60"), (61, "orig"), (90, "orig"),
                          (95, "remaining")):
        value = req.get(number)
        if value:
            parts.append(f"{label} {value[:20] if number == 90 else value}")
    totals = dialect.totals_sent(req)
    if totals is not None:
        parts.append(f"credits {totals.credits_count}/{totals.credits_amount} "
                     f"debits {totals.debits_count}/{totals.debits_amount}")
    return "  ".join(parts)


def describe_response(exchange: Exchange, dialect: Dialect) -> str:
    resp = exchange.response
    if resp is None:
        return f"<- no answer ({exchange.outcome}, {exchange.elapsed_ms:.0f} ms)"
    code = resp.get(39) or "--"
    parts = [f"<- {resp.mti} {code} {RESPONSE_TEXT.get(code, '')}".rstrip()]
    if resp.get(37):
        parts.append(f"RRN {resp.get(37)}")
    if resp.get(38):
        parts.append(f"auth {resp.get(38)}")
    if exchange.request.mti.startswith("05"):
        verdict = dialect.reconciliation(resp)
        if verdict is not None:
            parts.append(f"settlement {verdict.replace('_', ' ')}")
    if exchange.kind == "signon":
        batch = dialect.signed_on_batch(resp)
        if batch is not None:
            parts.append(f"batch {batch:06d}")
    parts.append(f"{exchange.elapsed_ms:.1f} ms")
    if exchange.outcome == "lost":
        parts.append("(answer dropped: simulated loss)")
    return "  ".join(parts)
