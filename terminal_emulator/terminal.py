"""The terminal: a POS terminal's behaviour over a :class:`~terminal_emulator.connection.Connection`.

It keeps its journal (STAN, batch, transactions, pending reversal), builds the dialect's requests,
and does what real terminals do when an answer does not come: a reversal is stored before every
reversible request, cleared by its answer, and otherwise sent before the next request (and before
settlement), repeated as 0401 up to ``max_reversal_repeats`` times.

Example::

    async with Terminal("127.0.0.1", 8583, profile="iso87-binary") as terminal:
        sale = await terminal.sale(1234)
        refund = await terminal.refund(sale.rrn, amount=500)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from . import messages
from .codec import IsoMessage, MessageEncodeError
from .connection import Connection
from .errors import ConnectionFailed, ConnectionLost, ResponseTimeout, ReversalPending, UsageError
from .exchange import Exchange, Outcome
from .journal import Journal, PendingReversal, TransactionRecord, load_journal
from .masking import mask_pan
from .messages import DEFAULT_PAN, Stamp, Totals
from .profile import WireProfile, load_profile

__all__ = ["Exchange", "Outcome", "Terminal"]

def _utc_now() -> datetime:
    return datetime.now(UTC)


class Terminal:
    """An emulated POS terminal. Amounts are integers in minor units (``1234`` = 12.34 USD).

    ``journal``: a :class:`Journal`, a path to its JSON file, or ``None`` for an in-memory one.
    ``on_exchange`` is called with every exchange, including reversals sent on the terminal's own.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8583,
        *,
        profile: WireProfile | str = "iso87-binary",
        tid: str = "TERM0001",
        mid: str = "MERCHANT0000001",
        currency: str = "840",
        pan: str = DEFAULT_PAN,
        journal: Journal | str | Path | None = None,
        timeout: float = 10.0,
        connect_timeout: float | None = None,
        max_reversal_repeats: int = 3,
        clock: Callable[[], datetime] = _utc_now,
        on_exchange: Callable[[Exchange], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.tid = tid
        self.mid = mid
        self.currency = currency
        self.pan = pan
        self.journal = journal if isinstance(journal, Journal) else load_journal(journal)
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        self.max_reversal_repeats = max_reversal_repeats
        self.on_exchange = on_exchange
        self.late_responses: list[IsoMessage] = []
        self._clock = clock
        self._connection: Connection | None = None
        self._pans: dict[str, str] = {}  # STAN -> PAN used, in memory only (for reversals)
        self._lose_next = False

    # --- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Terminal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await connection.close()

    def lose_next_response(self) -> None:
        """Fault injection: the next answer is received and then dropped, as if the network had
        lost it. The request then raises :class:`ResponseTimeout` and its reversal stays pending."""
        self._lose_next = True

    # --- transactions --------------------------------------------------------------------------
    async def sale(
        self, amount: int, *, pan: str | None = None, expiry: str | None = None, currency: str | None = None
    ) -> Exchange:
        """Purchase: 0200, DE3 000000."""
        card = pan or self.pan
        cur = currency or self.currency
        return await self._financial(
            "purchase",
            lambda st: messages.purchase(st, tid=self.tid, mid=self.mid, pan=card, amount=amount, currency=cur,
                                         expiry=expiry),
            amount=_check_amount(amount), currency=cur, pan=card,
        )

    async def preauth(
        self, amount: int, *, pan: str | None = None, expiry: str | None = None, currency: str | None = None
    ) -> Exchange:
        """Pre-authorization: 0100, DE3 000000."""
        card = pan or self.pan
        cur = currency or self.currency
        return await self._financial(
            "preauth",
            lambda st: messages.preauth(st, tid=self.tid, mid=self.mid, pan=card, amount=amount, currency=cur,
                                        expiry=expiry),
            amount=_check_amount(amount), currency=cur, pan=card,
        )

    async def complete(
        self,
        rrn: str | None = None,
        *,
        amount: int | None = None,
        approval_code: str | None = None,
        pan: str | None = None,
        currency: str | None = None,
    ) -> Exchange:
        """Pre-auth completion: 0220 with DE90 (the pre-auth's MTI, STAN, DE7) and DE38.

        The pre-auth is looked up in the journal by ``rrn``, else the latest uncompleted approved
        pre-auth is used; without a journal entry, ``approval_code`` and ``amount`` are required.
        """
        original = self.journal.find_by_rrn(rrn) if rrn else self._last_open_preauth()
        if original is not None and original.kind != "preauth":
            raise UsageError(f"RRN {rrn} is a {original.kind}, not a pre-authorization")
        if original is None and (approval_code is None or amount is None):
            raise UsageError("pre-authorization not in the journal: give --approval-code and --amount")
        code = approval_code or (original.approval_code if original else None)
        value = amount if amount is not None else (original.amount if original else 0)
        card = pan or self.pan
        cur = currency or (original.currency if original else self.currency)
        ref = original.original if original else None
        return await self._financial(
            "completion",
            lambda st: messages.completion(st, tid=self.tid, mid=self.mid, pan=card, amount=value, currency=cur,
                                           approval_code=code, original=ref),
            amount=_check_amount(value), currency=cur, pan=card,
            original_rrn=original.rrn if original else rrn, original_stan=original.stan if original else None,
        )

    async def void(
        self, rrn: str, *, amount: int | None = None, pan: str | None = None, currency: str | None = None
    ) -> Exchange:
        """Void: 0200, DE3 020000, DE37 = the original's RRN; amount from the journal unless given."""
        original = self.journal.find_by_rrn(rrn)
        if amount is not None:
            value = amount
        elif original is not None:
            value = original.effective_amount
        else:
            raise UsageError(f"RRN {rrn} is not in the journal: give the amount")
        card = pan or self.pan
        cur = currency or (original.currency if original else self.currency)
        return await self._financial(
            "void",
            lambda st: messages.void(st, tid=self.tid, mid=self.mid, pan=card, amount=value, currency=cur,
                                     original_rrn=rrn),
            amount=_check_amount(value), currency=cur, pan=card,
            original_rrn=rrn, original_stan=original.stan if original else None,
        )

    async def refund(
        self,
        rrn: str | None = None,
        *,
        amount: int | None = None,
        pan: str | None = None,
        currency: str | None = None,
        by_original_data: bool = False,
    ) -> Exchange:
        """Refund: 0200, DE3 200000. Referenced by DE37 (or DE90 with ``by_original_data``), or
        unreferenced when ``rrn`` is ``None``. The amount defaults to what is left to refund."""
        original = self.journal.find_by_rrn(rrn) if rrn else None
        if amount is None:
            if original is None:
                raise UsageError("give the refund amount (the original is not in the journal)")
            amount = original.effective_amount - original.refunded
        if by_original_data and original is None:
            raise UsageError("a refund by original data elements (DE90) needs the original in the journal")
        value = amount
        card = pan or self.pan
        cur = currency or (original.currency if original else self.currency)
        ref = original.original if (by_original_data and original) else None
        return await self._financial(
            "refund",
            lambda st: messages.refund(st, tid=self.tid, mid=self.mid, pan=card, amount=value, currency=cur,
                                       original_rrn=None if by_original_data else rrn, original=ref),
            amount=_check_amount(value), currency=cur, pan=card,
            original_rrn=rrn, original_stan=original.stan if original else None,
        )

    async def reverse(
        self,
        rrn: str | None = None,
        *,
        stan: str | None = None,
        advice: bool = False,
        partial_amount: int | None = None,
        pan: str | None = None,
    ) -> Exchange:
        """Reversal (0400, or 0420 with ``advice``) of a journal transaction, by RRN or STAN
        (default: the latest approved one). ``partial_amount`` sends DE95 (the amount that stays).
        Without an answer the reversal stays pending and is repeated before the next request."""
        if rrn:
            original = self.journal.find_by_rrn(rrn)
        elif stan:
            original = self.journal.find_by_stan(stan.zfill(6))
        else:
            original = self.journal.last("purchase", "preauth", "completion", "void", "refund", status="approved")
        if original is None:
            raise UsageError("no such transaction in the journal to reverse")
        if partial_amount is not None:
            _check_amount(partial_amount)
            if partial_amount >= original.amount:
                raise UsageError("a partial reversal's remaining amount must be below the original amount")
        await self._flush_pending()
        if pan:
            self._pans[original.stan] = pan
        pending = PendingReversal.for_record(original, advice=advice, partial_amount=partial_amount)
        self.journal.pending_reversal = pending
        return await self._send_reversal(pending)

    async def settle(
        self,
        *,
        credits_count: int | None = None,
        credits_amount: int | None = None,
        debits_count: int | None = None,
        debits_amount: int | None = None,
    ) -> Exchange:
        """Settlement: 0500, DE3 920000, totals from the journal's open batch unless overridden.
        The batch closes when the host answers, whatever the code (00 or 95 mismatch)."""
        await self._flush_pending()
        own = self.journal.totals()
        totals = Totals(
            credits_count=own.credits_count if credits_count is None else credits_count,
            credits_amount=own.credits_amount if credits_amount is None else credits_amount,
            debits_count=own.debits_count if debits_count is None else debits_count,
            debits_amount=own.debits_amount if debits_amount is None else debits_amount,
        )
        st = self._stamp()
        message = messages.settlement(st, tid=self.tid, mid=self.mid, currency=self.currency, totals=totals)
        try:
            exchange = await self._roundtrip("settlement", message)
        finally:
            self.journal.save()
        self.journal.close_batch()
        self.journal.save()
        return exchange

    async def echo(self, code: str = "301") -> Exchange:
        """Network management 0800 (``301`` echo, ``001`` sign-on, ``002`` sign-off)."""
        st = self._stamp()
        self.journal.save()
        return await self._roundtrip("echo", messages.echo(st, tid=self.tid, mid=self.mid, code=code))

    async def send(self, message: IsoMessage, kind: str = "raw") -> Exchange:
        """Send a message as given (no journal, no pending-reversal handling) and await its answer."""
        return await self._roundtrip(kind, message)

    async def resend(
        self, exchange: Exchange, *, mti: str | None = None, fields: Mapping[int, str] | None = None
    ) -> Exchange:
        """Retransmit an earlier request: same STAN and DE7 (a terminal repeating itself), with an
        optional repeat MTI (e.g. ``0201``) or changed fields. If the unchanged original's reversal
        is pending, an answer to the retransmission makes it unnecessary."""
        changed = dict(exchange.request.fields)
        if fields:
            changed.update(fields)
        message = IsoMessage(mti=mti or exchange.request.mti, fields=dict(sorted(changed.items())))
        answer = await self._roundtrip("resend", message)
        record = exchange.record
        if record is not None and not fields and answer.response is not None:
            self.journal.record_response(record, answer.response_code, answer.rrn, answer.approval_code)
            self.journal.save()
        return answer

    async def flush_reversal(self) -> None:
        """Deliver the pending reversal now, if any (raises :class:`ReversalPending` if it cannot)."""
        await self._flush_pending()

    # --- internals -----------------------------------------------------------------------------
    def _stamp(self) -> Stamp:
        return messages.stamp(self.journal.next_stan(), self._clock())

    def _last_open_preauth(self) -> TransactionRecord | None:
        for record in reversed(self.journal.transactions):
            if record.kind == "preauth" and record.status == "approved" and not record.completed:
                return record
        return None

    async def _connect(self) -> Connection:
        if self._connection is None or not self._connection.is_open:
            if self._connection is not None:
                await self._drop_connection()
            self._connection = await Connection.open(
                self.host, self.port, self.profile, connect_timeout=self.connect_timeout,
                on_late=self.late_responses.append,
            )
        return self._connection

    async def _drop_connection(self) -> None:
        # After a time-out the link is in doubt: a real terminal hangs up and dials again.
        await self.close()

    def _notify(self, exchange: Exchange) -> Exchange:
        if self.on_exchange is not None:
            self.on_exchange(exchange)
        return exchange

    async def _roundtrip(
        self, kind: str, message: IsoMessage, before_send: Callable[[], None] | None = None
    ) -> Exchange:
        connection = await self._connect()
        try:
            data = connection.encode(message)
        except MessageEncodeError as exc:
            raise UsageError(str(exc)) from None
        if before_send is not None:
            before_send()
        lose, self._lose_next = self._lose_next, False
        started = time.perf_counter()
        try:
            response = await connection.request(message, self.timeout, data=data)
        except ResponseTimeout as exc:
            await self._drop_connection()
            timed_out = self._notify(Exchange(kind, message, None, _ms(started), "timeout"))
            raise ResponseTimeout(str(exc), timed_out) from None
        except ConnectionLost as exc:
            await self._drop_connection()
            lost = self._notify(Exchange(kind, message, None, _ms(started), "connection_lost"))
            raise ConnectionLost(str(exc), lost) from None
        if lose:
            await self._drop_connection()
            dropped = self._notify(Exchange(kind, message, response, _ms(started), "lost"))
            raise ResponseTimeout(f"answer to {message.mti} STAN {message.stan} lost (simulated)", dropped)
        return self._notify(Exchange(kind, message, response, _ms(started)))

    async def _financial(
        self,
        kind: str,
        build: Callable[[Stamp], IsoMessage],
        *,
        amount: int,
        currency: str,
        pan: str,
        original_rrn: str | None = None,
        original_stan: str | None = None,
    ) -> Exchange:
        await self._flush_pending()
        st = self._stamp()
        message = build(st)
        record = TransactionRecord(
            kind=kind,
            mti=message.mti,
            processing_code=message.fields[3],
            stan=st.stan,
            transmitted=st.transmitted,
            amount=amount,
            currency=currency,
            masked_pan=mask_pan(pan),
            batch=self.journal.batch,
            at=self._clock().astimezone(UTC).isoformat(timespec="seconds"),
            original_rrn=original_rrn,
            original_stan=original_stan,
        )

        def store_reversal_then_send() -> None:
            self.journal.add(record)
            self.journal.pending_reversal = PendingReversal.for_record(record)
            self._pans[record.stan] = pan
            self.journal.save()

        try:
            exchange = await self._roundtrip(kind, message, before_send=store_reversal_then_send)
        except (ResponseTimeout, ConnectionLost) as exc:
            self.journal.record_unanswered(record)
            self.journal.save()
            if exc.exchange is not None:
                exc.exchange = replace(exc.exchange, record=record)
            raise
        except ConnectionFailed:
            self.journal.save()  # keep the STAN counter moving
            raise
        self.journal.record_response(record, exchange.response_code, exchange.rrn, exchange.approval_code)
        self.journal.save()
        return replace(exchange, record=record)

    async def _flush_pending(self) -> None:
        pending = self.journal.pending_reversal
        if pending is None:
            return
        failures = 0
        while True:
            try:
                await self._send_reversal(pending)
                return
            except (ResponseTimeout, ConnectionLost, ConnectionFailed) as exc:
                failures += 1
                if failures > self.max_reversal_repeats:
                    raise ReversalPending(
                        f"reversal of STAN {pending.original_stan} still unanswered after {failures} tries "
                        f"({exc}); nothing else is sent until it is delivered",
                        exc.exchange,
                    ) from None

    async def _send_reversal(self, pending: PendingReversal) -> Exchange:
        if pending.stan is None:
            st = self._stamp()
            pending.stan, pending.transmitted = st.stan, st.transmitted
            pending.local_time, pending.local_date = st.local_time, st.local_date
        st = Stamp(pending.stan, pending.transmitted or "", pending.local_time or "", pending.local_date or "")
        pan = self._pans.get(pending.original_stan, self.pan)
        message = messages.reversal(
            st, tid=self.tid, mid=self.mid, pan=pan, processing_code=pending.processing_code,
            amount=pending.amount, currency=pending.currency, original=pending.original,
            advice=pending.mti.startswith("042"), partial_amount=pending.partial_amount,
        )
        message = replace(message, mti=pending.current_mti())

        def count_attempt() -> None:
            pending.attempts += 1
            self.journal.save()

        try:
            exchange = await self._roundtrip("reversal", message, before_send=count_attempt)
        finally:
            self.journal.save()
        self.journal.record_reversal_answer(pending, exchange.response_code)
        self.journal.save()
        return exchange


def _check_amount(amount: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount < 10**12:
        raise UsageError("amount must be an integer of minor units between 0 and 999999999999")
    return amount


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
