"""The policy the rules apply: plain values built from the configuration at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta


@dataclass(frozen=True, slots=True)
class Velocity:
    """Approved, unreversed refunds of the current UTC day."""

    terminal_count: int = 0
    terminal_amount: int = 0
    card_count: int = 0
    card_amount: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    refund_window: timedelta = timedelta(days=30)
    preauth_validity: timedelta = timedelta(days=30)
    completion_tolerance_pct: int = 15
    #: "TERMID", "MERCHANT/TERMID" or "*"
    unreferenced_refund_terminals: frozenset[str] = field(default_factory=frozenset)
    terminal_daily_refund_count: int | None = None
    terminal_daily_refund_amount: int | None = None
    card_daily_refund_count: int | None = None
    card_daily_refund_amount: int | None = None
    standin_max_amount: int | None = None
    check_luhn: bool = True
    check_expiry: bool = True
    duplicate_ttl: timedelta = timedelta(hours=48)

    def allows_unreferenced_refund(self, merchant_id: str, terminal_id: str) -> bool:
        allowed = self.unreferenced_refund_terminals
        return "*" in allowed or terminal_id in allowed or f"{merchant_id}/{terminal_id}" in allowed

    @property
    def velocity_limited(self) -> bool:
        # asked for every refund: four comparisons, not a generator (six Python calls)
        return (
            self.terminal_daily_refund_count is not None
            or self.terminal_daily_refund_amount is not None
            or self.card_daily_refund_count is not None
            or self.card_daily_refund_amount is not None
        )
