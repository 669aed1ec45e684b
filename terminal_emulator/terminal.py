"""The terminal: a POS terminal's behaviour over a :class:`~terminal_emulator.connection.Connection`.

It keeps its journal (STAN, batch, transactions, pending reversal), has the profile's dialect
(:mod:`terminal_emulator.dialects`) build the requests and read the answers, and does what real
terminals do when an answer does not come: a reversal is stored before every reversible request,
cleared by its answer, and otherwise sent before the next request (and before settlement), repeated
(iso87 as 0401, cup as it was) up to ``max_reversal_repeats`` times.

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
from .dialects import CARD_FIELDS, Card, Dialect, Reconciliation, Station, dialect_for
from .errors import ConnectionFailed, ConnectionLost, ResponseTimeout, ReversalPending, UsageError
from .exchange import Exchange, Outcome
from .journal import Journal, PendingReversal, TransactionRecord, load_journal
from .masking import mask_pan
from .messages import Stamp, Totals
from .profile import WireProfile, load_profile

__all__ = ["Exchange", "Outcome", "Terminal"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Terminal:
    """An emulated POS terminal. Amounts are integers in minor units (``1234`` = 12.34 USD).

    ``journal``: a :class:`Journal`, a path to its JSON file, or ``None`` for an in-memory one.
    ``currency`` and ``pan`` default to the dialect's (840 and a Visa test card for iso87, 156 and a
    UnionPay test card for cup); ``tpdu`` replaces the profile's TPDU (e.g. ``60 0003 0000``).
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
        currency: str | None = None,
        pan: str | None = None,
        journal: Journal | str | Path | None = None,
        timeout: float = 10.0,
        tpdu: bytes | None = None,
        connect_timeout: float | None = None,
        max_reversal_repeats: int = 3,
        clock: Callable[[], datetime] = _utc_now,
        on_exchange: Callable[[Exchange], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        self.dialect: Dialect = dialect_for(self.profile)
        self.tid = tid
        self.mid = mid
        self.currency = currency or self.dialect.default_currency
        self.pan = pan or self.dialect.default_pan
        self.tpdu = tpdu
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
        """Purchase (iso87 0200/000000, cup 0200/000000/22)."""
        card = Card(pan or self.pan, expiry)
        cur = currency or self.currency
        return await self._financial(
            "purchase", lambda st: self.dialect.purchase(st, self.station, card, amount, cur),
            amount=_check_amount(amount), currency=cur, pan=card.pan,
        )

    async def preauth(
        self, amount: int, *, pan: str | None = None, expiry: str | None = None, currency: str | None = None
    ) -> Exchange:
        """Pre-authorization (iso87 0100/000000, cup 0100/030000/10)."""
        card = Card(pan or self.pan, expiry)
        cur = currency or self.currency
        return await self._financial(
            "preauth", lambda st: self.dialect.preauth(st, self.station, card, amount, cur),
            amount=_check_amount(amount), currency=cur, pan=card.pan,
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
        """Pre-auth completion (iso87 0220 with DE90 and DE38; cup 0200/000000/20 with 38 and 61).

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
        card = Card(pan or self.pan)
        cur = currency or (original.currency if original else self.currency)
        return await self._financial(
            "completion",
            lambda st: self.dialect.completion(st, self.station, card, value, cur, preauth=original,
                                               approval_code=code),
            amount=_check_amount(value), currency=cur, pan=card.pan,
            original_rrn=original.rrn if original else rrn, original_stan=original.stan if original else None,
        )

    async def void(
        self, rrn: str, *, amount: int | None = None, pan: str | None = None, currency: str | None = None
    ) -> Exchange:
        """Void of the transaction with RRN ``rrn`` (iso87 0200/020000 with DE37; cup 0200/200000/23
        with 37 and 61, or the pre-auth void 11 / completion void 21); amount from the journal unless given."""
        original = self.journal.find_by_rrn(rrn)
        if amount is not None:
            value = amount
        elif original is not None:
            value = original.effective_amount
        else:
            raise UsageError(f"RRN {rrn} is not in the journal: give the amount")
        card = Card(pan or self.pan)
        cur = currency or (original.currency if original else self.currency)
        return await self._financial(
            "void", lambda st: self.dialect.void(st, self.station, card, value, cur, rrn=rrn, original=original),
            amount=_check_amount(value), currency=cur, pan=card.pan,
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
        """Refund (iso87 0200/200000 by DE37, or DE90 with ``by_original_data``; cup 0220/200000/25
        by 37 and 61), unreferenced when ``rrn`` is ``None``. The amount defaults to what is left."""
        original = self.journal.find_by_rrn(rrn) if rrn else None
        if amount is None:
            if original is None:
                raise UsageError("give the refund amount (the original is not in the journal)")
            amount = original.effective_amount - original.refunded
        if by_original_data and original is None:
            raise UsageError("a refund by original data elements (DE90) needs the original in the journal")
        value = amount
        card = Card(pan or self.pan)
        cur = currency or (original.currency if original else self.currency)
        return await self._financial(
            "refund",
            lambda st: self.dialect.refund(st, self.station, card, value, cur, rrn=rrn, original=original,
                                           by_original_data=by_original_data),
            amount=_check_amount(value), currency=cur, pan=card.pan,
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
        (default: the latest approved one). ``partial_amount`` sends DE95 (the amount that stays;
        iso87 only). Without an answer the reversal stays pending and is repeated before the next
        request. In cup the reversal repeats the original's fields with DE39 06 (the cashier's)."""
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
        pending = PendingReversal.for_record(original, advice=advice, partial_amount=partial_amount, reason="06")
        self.dialect.reversal(_PLACEHOLDER, self.station, self.pan, pending)  # one it cannot send is never stored
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
        """Settlement 0500 with the journal's open batch totals unless overridden (iso87: DE74/76/86/88;
        cup: field 48, the overrides standing for the UnionPay cards). The batch closes when the host
        answers, whatever its verdict. When a cup host answers "not balanced" (48 result 2), every
        transaction of the batch is uploaded (0320) and the upload ended (0320, 60.3 = 207)."""
        await self._flush_pending()
        dialect = self.dialect
        own = self.journal.totals(dialect.in_main_totals)
        totals = Totals(
            credits_count=own.credits_count if credits_count is None else credits_count,
            credits_amount=own.credits_amount if credits_amount is None else credits_amount,
            debits_count=own.debits_count if debits_count is None else debits_count,
            debits_amount=own.debits_amount if debits_amount is None else debits_amount,
        )
        others = self.journal.totals(lambda record: not dialect.in_main_totals(record))
        uploads = self.journal.batch_records()
        message = dialect.settlement(self._stamp(), self.station, self.currency, totals, others)
        try:
            exchange = await self._roundtrip("settlement", message)
        finally:
            self.journal.save()
        try:
            if dialect.has_batch_upload and self.reconciliation(exchange) == "not_balanced":
                await self._batch_upload(uploads)
        finally:
            self.journal.close_batch()
            self.journal.save()
        return exchange

    def reconciliation(self, exchange: Exchange) -> Reconciliation | None:
        """What a settlement's answer says about the totals: balanced, not_balanced or error."""
        return self.dialect.reconciliation(exchange.response) if exchange.response is not None else None

    async def signon(self, operator: str = "01") -> Exchange:
        """Sign-on (iso87 0800 DE70 001; cup 0800 with 60.3 003 and the operator in 63). A cup host's
        answer gives the batch number to use (60.2): the journal takes it."""
        exchange = await self._network("signon", lambda st: self.dialect.signon(st, self.station, operator))
        batch = self.dialect.signed_on_batch(exchange.response) if exchange.response is not None else None
        if batch is not None:
            self.journal.batch = batch
            self.journal.save()
        return exchange

    async def echo(self, code: str = "301") -> Exchange:
        """Network management (iso87 0800 DE70 ``301`` echo, ``001`` sign-on, ``002`` sign-off; cup
        0820 with 60.3 301)."""
        return await self._network("echo", lambda st: self.dialect.echo(st, self.station, code))

    async def send(self, message: IsoMessage, kind: str = "raw") -> Exchange:
        """Send a message as given (no journal, no pending-reversal handling) and await its answer."""
        return await self._roundtrip(kind, message)

    async def resend(
        self, exchange: Exchange, *, mti: str | None = None, fields: Mapping[int, str] | None = None,
        repeat: bool = False,
    ) -> Exchange:
        """Retransmit an earlier request: same STAN and DE7 (a terminal repeating itself), with an
        optional MTI (e.g. ``0201``), or with ``repeat`` the dialect's repeat MTI (iso87 ``0201``,
        cup the same MTI), or changed fields. If the unchanged original's reversal is pending, an
        answer to the retransmission makes it unnecessary."""
        changed = dict(exchange.request.fields)
        if fields:
            changed.update(fields)
        if mti is None:
            mti = self.dialect.repeat_mti(exchange.request.mti) if repeat else exchange.request.mti
        message = IsoMessage(mti=mti, fields=dict(sorted(changed.items())))
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
    @property
    def station(self) -> Station:
        """Terminal, merchant and open batch, as the dialect's builders take them."""
        return Station(self.tid, self.mid, self.journal.batch)

    def _stamp(self) -> Stamp:
        return messages.stamp(self.journal.next_stan(), self._clock())

    async def _network(self, kind: str, build: Callable[[Stamp], IsoMessage]) -> Exchange:
        """Network management: no journal record, no waiting for a pending reversal."""
        st = self._stamp()
        self.journal.save()
        return await self._roundtrip(kind, build(st))

    async def _batch_upload(self, records: list[TransactionRecord]) -> None:
        for record in records:
            # the card this process used for it, else the card a cashier would swipe again (no PAN is journaled)
            pan = self._pans.get(record.stan, self.pan)
            await self._roundtrip("upload", self.dialect.batch_upload(self._stamp(), self.station, record, pan))
            self.journal.save()
        await self._roundtrip("upload_end", self.dialect.batch_end(self._stamp(), self.station, len(records)))

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
                on_late=self.late_responses.append, tpdu=self.tpdu,
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
            date=st.local_date,
            request_fields={str(k): v for k, v in message.fields.items() if k not in CARD_FIELDS},
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
        if exchange.response is not None and exchange.response.get(13):
            record.date = exchange.response.get(13)  # the host's date: what a UnionPay refund names
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
            # iso87 gives a reversal its own STAN; a UnionPay reversal repeats the original's
            own = self.dialect.reversal_has_own_stan
            st = self._stamp() if own else replace(_PLACEHOLDER, stan=pending.original_stan)
            pending.stan, pending.transmitted = st.stan, st.transmitted
            pending.local_time, pending.local_date = st.local_time, st.local_date
        st = Stamp(pending.stan, pending.transmitted or "", pending.local_time or "", pending.local_date or "")
        pan = self._pans.get(pending.original_stan, self.pan)
        message = self.dialect.reversal(st, self.station, pan, pending)
        message = replace(message, mti=pending.current_mti(self.dialect.repeat_mti))

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


#: a stamp for building a message only to check it can be built
_PLACEHOLDER = Stamp(stan="000000", transmitted="0000000000", local_time="000000", local_date="0000")


def _check_amount(amount: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount < 10**12:
        raise UsageError("amount must be an integer of minor units between 0 and 999999999999")
    return amount


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
