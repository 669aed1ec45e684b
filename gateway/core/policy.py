"""The policy the rules apply: plain values built from the configuration at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta, tzinfo

from gateway.core.model import Kind


@dataclass(frozen=True, slots=True)
class Velocity:
    """Approved, unreversed refunds of the current settlement day (see :meth:`Policy.day_start`)."""

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
    #: the settlement time zone: every "day" (daily limits, the cut-off) is a day there, not in UTC
    timezone: tzinfo = UTC
    #: the daily settlement cut-off, a local time of day in ``timezone``; None: no cut-off
    cutoff: time | None = None
    #: kinds the acquirer host decides (an upstream is configured); empty: the gateway stands in
    forward: frozenset[Kind] = frozenset()
    #: with the host unreachable: approve by the stand-in rules and advise the host later (else 91)
    standin_when_down: bool = False

    def allows_unreferenced_refund(self, merchant_id: str, terminal_id: str) -> bool:
        allowed = self.unreferenced_refund_terminals
        return "*" in allowed or terminal_id in allowed or f"{merchant_id}/{terminal_id}" in allowed

    @property
    def velocity_limited(self) -> bool:
        return any(
            limit is not None
            for limit in (
                self.terminal_daily_refund_count,
                self.terminal_daily_refund_amount,
                self.card_daily_refund_count,
                self.card_daily_refund_amount,
            )
        )

    def day_start(self, now: datetime) -> datetime:
        """The instant (UTC) the settlement day holding ``now`` began: local midnight in ``timezone``."""
        local = now.astimezone(self.timezone)
        return datetime.combine(local.date(), time(), tzinfo=self.timezone).astimezone(UTC)

    def last_cutoff(self, now: datetime) -> datetime | None:
        """The latest cut-off instant (UTC) at or before ``now``; None without a cut-off.

        A batch opened before it is closed, whatever a background task has done yet (design §5).
        """
        if self.cutoff is None:
            return None
        local = now.astimezone(self.timezone)
        candidate = datetime.combine(local.date(), self.cutoff, tzinfo=self.timezone)
        if candidate > local:
            candidate = datetime.combine(local.date() - timedelta(days=1), self.cutoff, tzinfo=self.timezone)
        return candidate.astimezone(UTC)

    def next_cutoff(self, now: datetime) -> datetime | None:
        """The first cut-off instant (UTC) after ``now``; None without a cut-off."""
        if self.cutoff is None:
            return None
        local = now.astimezone(self.timezone)
        candidate = datetime.combine(local.date(), self.cutoff, tzinfo=self.timezone)
        if candidate <= local:
            candidate = datetime.combine(local.date() + timedelta(days=1), self.cutoff, tzinfo=self.timezone)
        return candidate.astimezone(UTC)
