"""The use case: one framed request in, one framed response out.

Decode (codec), understand (dialect), decide and record (ledger driving the pure engine), answer
(dialect + codec), and write one ``message.processed`` log line. The TCP server calls
:meth:`GatewayService.handle` once per frame; nothing here touches sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway.core.engine import Context
from gateway.core.events import CorrectionEvent
from gateway.core.model import Kind, Request
from gateway.core.policy import Policy
from gateway.core.reasons import Reason
from gateway.core.upstream import HostAnswer, NoAnswer
from gateway.events import new_event_id, render_event
from gateway.ports import Clock, Completion, LedgerResult, Renderer, Upstream, UpstreamDown, UpstreamTimeout
from gateway.protocol.codec import Codec, DecodeError, EncodeError
from gateway.protocol.dialect import AnswerFacts, Dialect, DialectError, UnsupportedMessage, dialect_for
from gateway.protocol.host import CARD_FIELDS, host_message
from gateway.protocol.message import Message
from gateway.protocol.profile import Profile


class Ledger(Protocol):
    def submit(self, request: Request, ctx: Context, completion: Completion) -> None:
        """Decide and record ``request``, and tell ``completion`` (see :class:`gateway.ports.Completion`)."""
        ...

    async def mark_answered(self, txn_ids: Sequence[int]) -> None:
        """Record that these records' answers were written to their terminals."""
        ...

    async def batch_to_use(self, merchant_id: str, terminal_id: str, policy: Policy, now: datetime) -> str:
        """The batch number a terminal signing on is to use."""
        ...

    async def conclude(
        self, txn_id: int, request: Request | None, result: HostAnswer | NoAnswer, ctx: Context, render: Renderer
    ) -> LedgerResult:
        """The acquirer host's answer (or its absence) for a pending record, committed durably."""
        ...


class Recorder(Protocol):
    """Where per-request figures go (Prometheus metrics in production)."""

    def request_done(self, mti: str, kind: str, response_code: str, seconds: float) -> None: ...


class FrameRejectedError(Exception):
    """A frame that cannot be answered at all (no readable request MTI): costs the connection."""


@dataclass(slots=True)
class Peer:
    """What the service and the TCP server share about one connection."""

    address: str  #: host:port of the client
    #: the terminals a verified client certificate binds the connection to ("TERMID", "MERCHANT/TERMID"
    #: or "*"); None without a certificate. Requests for any other terminal are refused (58).
    bound_terminals: frozenset[str] | None = None
    #: set once the connection sent a request the service accepted from an allowed terminal (or had a
    #: client certificate): the server keeps slots for such connections
    proven: bool = False


def _listed(entries: frozenset[str], merchant_id: str, terminal_id: str) -> bool:
    return "*" in entries or terminal_id in entries or f"{merchant_id}/{terminal_id}" in entries


#: answered records are marked in the ledger this often, together (one statement for many)
ANSWERED_FLUSH_S = 0.2


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    instance_id: str
    topic_prefix: str
    pan_key: bytes
    policy: Policy
    #: "TERMID" / "MERCHANT/TERMID" entries; empty allows every terminal
    allowed_terminals: frozenset[str] = frozenset()


class SystemClock:
    """The wall clock, in UTC (the composition root passes it in; tests pass their own)."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class GatewayService:
    """Answers requests: the only place that knows the order of codec, dialect, rules and ledger."""

    def __init__(
        self,
        profile: Profile,
        ledger: Ledger,
        config: ServiceConfig,
        *,
        clock: Clock | None = None,
        logger: Any = None,
        recorder: Recorder | None = None,
        answered_flush_s: float = ANSWERED_FLUSH_S,
        upstream: Upstream | None = None,
    ) -> None:
        self.profile = profile
        self.codec = Codec(profile)
        self.dialect: Dialect = dialect_for(profile.dialect)
        self.ledger = ledger
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.log = logger
        self.recorder = recorder
        #: records whose answers were written, not yet marked in the ledger
        self._answered: list[int] = []
        self._answered_flush: asyncio.TimerHandle | None = None
        self._answered_flush_s = answered_flush_s
        self._marking: set[asyncio.Task[None]] = set()
        #: the acquirer host; None: the gateway stands in (decides purchases itself)
        self.upstream = upstream
        #: pending records whose host answer is awaited -> repeats of their request waiting for it too
        self._awaiting: dict[int, list[_Answer]] = {}
        self._forwarding: set[asyncio.Task[None]] = set()
        #: told when a decision queued something for the host (the store-and-forward sender looks at once)
        self.on_queued: Callable[[], None] | None = None
        #: card fields of stand-in approvals by record id, for their advices (memory only; the sender's)
        self.advice_cards: dict[int, dict[int, str]] | None = None

    def response_code(self, reason: str) -> str:
        return self.profile.response_code(reason)

    def facts(self, reason: str, batch_no: str | None = None) -> AnswerFacts:
        """What an answer may carry beyond its codes: the reason, the host's time in the settlement time
        zone (DE12 / DE13 of the ``cup`` dialect's answers) and the batch number a sign-on is told."""
        return AnswerFacts(reason, self.clock.now().astimezone(self.config.policy.timezone), batch_no)

    def render(self, event: CorrectionEvent) -> tuple[str, str, bytes]:
        """An event for the outbox: (event id, topic, CloudEvents payload)."""
        event_id = new_event_id()
        topic, payload = render_event(
            event,
            event_id=event_id,
            instance_id=self.config.instance_id,
            time=self.clock.now(),
            topic_prefix=self.config.topic_prefix,
        )
        return event_id, topic, payload

    async def handle(self, payload: bytes) -> bytes | None:
        """Answer one frame's payload. Returns None for a message that gets no answer (a response MTI).

        Raises :class:`FrameRejectedError` when the frame is not even a readable request.
        """
        answer: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

        def reply(data: bytes | None, delivered: Callable[[], None] | None = None) -> None:
            answer.set_result(data)
            if delivered is not None:
                delivered()

        self.handle_nowait(payload, reply, answer.set_exception)
        return await answer

    def handle_nowait(
        self,
        payload: bytes,
        reply: Callable[..., None],
        fail: Callable[[BaseException], None],
        peer: Peer | None = None,
    ) -> None:
        """Answer one frame without a task of its own: ``reply(answer, delivered)`` gets the answer (None: no
        answer), now or when the ledger has committed, and calls ``delivered`` once the terminal has it
        (the record is then marked answered; never, if the connection went first); ``fail`` gets an
        exception that must cost the connection.

        Raises :class:`FrameRejectedError` at once when the frame is not even a readable request.
        """
        started = time.perf_counter()
        try:
            message = self.codec.decode(payload)
        except DecodeError as exc:
            reply(self._format_error(exc, started))
            return
        if self.dialect.response_mti(message.mti) is None:
            self._warn("message.ignored", mti=message.mti, detail="not a request MTI")
            reply(None)
            return
        try:
            request = self.dialect.classify(message)
        except DialectError as exc:
            reply(self._answer(message, None, Reason.FORMAT_ERROR, started, field=exc.field, detail=exc.reason))
            return
        except UnsupportedMessage:
            reply(self._answer(message, None, Reason.UNSUPPORTED_MESSAGE, started))
            return
        if request.kind is Kind.NETWORK and not request.assigns_batch:
            reply(self._answer(message, request, Reason.APPROVED, started))
            return
        allowed = self.config.allowed_terminals  # empty: every terminal
        merchant, terminal = request.merchant_id, request.terminal_id
        bound = peer.bound_terminals if peer is not None else None
        if (allowed and not _listed(allowed, merchant, terminal)) or (
            bound is not None and not _listed(bound, merchant, terminal)
        ):
            reply(self._answer(message, request, Reason.TERMINAL_NOT_ALLOWED, started))
            return
        if peer is not None:
            peer.proven = True
        if request.kind is Kind.NETWORK:  # a sign-on told the batch number to use: read from the ledger
            task = asyncio.get_running_loop().create_task(self._sign_on(message, request, started, reply, fail))
            self._forwarding.add(task)  # kept, and drained before the ledger closes, like the host's exchanges
            task.add_done_callback(self._forwarding.discard)
            return
        ctx = Context(self.clock.now(), self.config.policy, self.config.pan_key, self.profile.response_code)

        self.ledger.submit(request, ctx, _Answer(self, message, request, started, reply, fail))

    async def _sign_on(
        self, message: Message, request: Request, started: float, reply: Callable[..., None],
        fail: Callable[[BaseException], None],
    ) -> None:
        try:
            batch_no = await self.ledger.batch_to_use(
                request.merchant_id, request.terminal_id, self.config.policy, self.clock.now()
            )
        except Exception as exc:
            self._error("ledger.failed", error=type(exc).__name__, detail=str(exc)[:200])
            reply(self._answer(message, request, Reason.SYSTEM_ERROR, started))
            return
        try:
            reply(self._answer(message, request, Reason.APPROVED, started, batch_no=batch_no))
        except Exception as exc:  # a bug past the ledger: the connection pays, never the server
            fail(exc)

    # the acquirer host -----------------------------------------------------------------------------

    def _forward(self, answer: _Answer, result: LedgerResult) -> None:
        """Send a pending record's request to the host (no transaction open meanwhile), then conclude it."""
        assert result.txn_id is not None
        self._awaiting[result.txn_id] = []
        task = asyncio.get_running_loop().create_task(self._exchange(answer, result))
        self._forwarding.add(task)
        task.add_done_callback(self._forwarding.discard)

    async def _exchange(self, answer: _Answer, result: LedgerResult) -> None:
        txn_id, host = result.txn_id, result.host
        assert txn_id is not None and host is not None and self.upstream is not None
        outcome: HostAnswer | NoAnswer
        try:
            exchange = await self.upstream.send(host_message(host, answer.message), stamp=False)
            fields = exchange.answer.fields
            outcome = HostAnswer(fields.get(39) or self.response_code(Reason.UPSTREAM_DECLINED.value), fields.get(38))
        except UpstreamTimeout:
            outcome = NoAnswer(sent=True)
        except UpstreamDown:
            outcome = NoAnswer(sent=False)
        except Exception as exc:  # nothing was written (a message the host's profile cannot carry): a bug
            self._error("upstream.send_failed", error=type(exc).__name__, detail=str(exc)[:200], rrn=host.rrn)
            outcome = NoAnswer(sent=False)
        waiting = self._awaiting.pop(txn_id, [])
        ctx = Context(self.clock.now(), self.config.policy, self.config.pan_key, self.profile.response_code)
        try:
            final = await self.ledger.conclude(txn_id, answer.request, outcome, ctx, self.render)
        except Exception as exc:  # the record stays pending: the next start concludes it (and reverses it)
            for waiter in (answer, *waiting):
                waiter.failed(exc)
            return
        if isinstance(outcome, NoAnswer) and not outcome.sent and final.queued and self.advice_cards is not None:
            card = answer.message.fields
            self.advice_cards[txn_id] = {number: card[number] for number in CARD_FIELDS if number in card}
        answer.committed(final)
        repeat = LedgerResult(final.response_code, final.reason, final.rrn, final.approval_code, True, 0, txn_id)
        for waiter in waiting:
            waiter.committed(repeat)

    def _wait_for_host(self, txn_id: int | None, answer: _Answer) -> bool:
        """A repeat of a request whose host answer is awaited here: it gets that answer when it comes."""
        waiting = self._awaiting.get(txn_id) if txn_id is not None else None
        if waiting is None:
            return False  # awaited by another instance, or concluded meanwhile: 09, the terminal asks again
        waiting.append(answer)
        return True

    async def drain_forwarded(self) -> None:
        """At shutdown, before the ledger closes: every exchange with the host under way ends (each within
        the host timeout) and is recorded."""
        while self._forwarding:
            await asyncio.gather(*list(self._forwarding), return_exceptions=True)

    def _mark_answered(self, txn_id: int) -> None:
        self._answered.append(txn_id)
        if self._answered_flush is None:
            self._answered_flush = asyncio.get_running_loop().call_later(self._answered_flush_s, self._flush_soon)

    def _flush_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.flush_answered())
        self._marking.add(task)
        task.add_done_callback(self._marking.discard)

    async def flush_answered(self) -> None:
        """Mark the records answered since the last flush (also at shutdown). A failure only leaves
        them listed as unanswered, which an operator can check: nothing is answered twice."""
        if self._answered_flush is not None:
            self._answered_flush.cancel()
            self._answered_flush = None
        ids, self._answered = self._answered, []
        if ids:
            try:
                await self.ledger.mark_answered(ids)
            except Exception as exc:
                self._warn("ledger.mark_answered_failed", error=type(exc).__name__, records=len(ids))

    async def drain_answered(self) -> None:
        """At shutdown, before the ledger closes: every mark made so far is written."""
        await self.flush_answered()
        for task in list(self._marking):
            with contextlib.suppress(Exception):
                await task

    def _format_error(self, exc: DecodeError, started: float) -> bytes:
        if exc.mti is None or self.dialect.response_mti(exc.mti) is None:
            self._warn("frame.rejected", field=exc.field, position=exc.position, detail=exc.reason)
            raise FrameRejectedError(str(exc)) from None
        partial = exc.partial or Message(exc.mti, {})
        return self._answer(
            partial, None, Reason.FORMAT_ERROR, started, field=exc.field, position=exc.position, detail=exc.reason
        )

    def _answer(
        self,
        message: Message,
        request: Request | None,
        reason: Reason,
        started: float,
        *,
        batch_no: str | None = None,
        **extra: Any,
    ) -> bytes:
        """The answer for a request the ledger did not decide (format errors, network messages,
        refused terminals, ledger failures), with its metrics and log line."""
        code = self.response_code(reason.value)
        data = self._encode(self.dialect.build_response(message, code, facts=self.facts(reason.value, batch_no)))
        self._account(message, request, code, reason.value, started, extra=extra)
        return data

    def _encode(self, response: Message) -> bytes:
        try:
            # echoed fields passed the content checks when the request was decoded; the gateway made the rest
            return self.codec.encode(response, checked=True)
        except EncodeError as exc:
            # an echoed field we cannot re-encode: answer with the bare minimum rather than nothing
            self._warn("response.encode_failed", detail=str(exc))
            return self.codec.encode(Message(response.mti, {k: v for k, v in response.fields.items() if k in (11, 39)}))

    def _account(
        self,
        message: Message,
        request: Request | None,
        code: str,
        reason_text: str,
        started: float,
        *,
        rrn: str | None = None,
        replayed: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """The request's metrics and ``message.processed`` line, once its answer is final."""
        elapsed = time.perf_counter() - started
        kind = str(request.kind) if request is not None else "unknown"  # a StrEnum: str() is its value
        if self.recorder is not None:
            self.recorder.request_done(message.mti, kind, code, elapsed)
        if self.log is None:
            return
        fields = message.fields
        terminal, merchant = fields.get(41), fields.get(42)
        if request is None and reason_text == Reason.FORMAT_ERROR:
            # a frame that could not be read may have card data where its ids should be (a shifted
            # bitmap reads DE2 or DE35, length digits first, as DE41 and DE42): long digit runs are hidden
            terminal, merchant = _hide_digit_runs(terminal), _hide_digit_runs(merchant)
        # neighbouring values are read together for split card numbers (gateway.logs): the wire's text
        # (DE41 then DE42, as on the wire) is kept apart from the gateway's own numbers (STAN, RRN, codes)
        self.log.info(
            "message.processed",
            mti=message.mti,
            terminal=terminal,
            merchant=merchant,
            kind=kind,
            stan=fields.get(11),
            reason=None if reason_text == "approved" else reason_text,
            rrn=rrn,
            replayed=replayed or None,
            response_code=code,
            latency_ms=round(elapsed * 1000, 3),
            pan=request.masked_pan if request is not None else None,
            **(extra or {}),
        )

    def _warn(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.warning(event, **fields)

    def _error(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.error(event, **fields)


_DIGIT_RUN = re.compile(r"[0-9]{7,}")


def _hide_digit_runs(value: str | None) -> str | None:
    """``value`` with every run of 7 or more digits replaced by as many ``*``."""
    return _DIGIT_RUN.sub(lambda match: "*" * len(match.group()), value) if value else value


class _Answer:
    """One decided request's way back to its terminal: what the ledger tells (a
    :class:`gateway.ports.Completion`) becomes the answer, its metrics and its log line."""

    __slots__ = ("_data", "_fail", "_reply", "_service", "_started", "message", "request")

    def __init__(
        self,
        service: GatewayService,
        message: Message,
        request: Request,
        started: float,
        reply: Callable[..., None],
        fail: Callable[[BaseException], None],
    ) -> None:
        self._service, self.message, self.request, self._started = service, message, request, started
        self._reply, self._fail = reply, fail
        self._data: bytes | None = None

    def render(self, event: CorrectionEvent) -> tuple[str, str, bytes]:
        return self._service.render(event)

    def prepare(self, result: LedgerResult) -> None:
        """Build the answer while the commit is under way (nothing leaves before it is durable)."""
        if result.forward or result.reason == Reason.UPSTREAM_PENDING:
            return  # the host's answer will be the terminal's
        try:
            service = self._service
            facts = service.facts(result.reason)
            response = service.dialect.build_response(self.message, result.response_code, rrn=result.rrn,
                                                      approval_code=result.approval_code, facts=facts)  # fmt: skip
            self._data = service._encode(response)
        except Exception as exc:  # a bug past the ledger: the connection pays, never the server
            self._fail(exc)

    def committed(self, result: LedgerResult) -> None:
        service = self._service
        if result.forward:
            service._forward(self, result)
            return
        if result.reason == Reason.UPSTREAM_PENDING and service._wait_for_host(result.txn_id, self):
            return
        if result.queued and service.on_queued is not None:
            service.on_queued()
        if self._data is None:
            self.prepare(result)
            if self._data is None:
                return
        try:
            service._account(self.message, self.request, result.response_code, result.reason, self._started,
                             rrn=result.rrn, replayed=result.replayed)  # fmt: skip
            txn_id = result.txn_id
            self._reply(self._data, None if txn_id is None else lambda: service._mark_answered(txn_id))
        except Exception as exc:
            self._fail(exc)

    def failed(self, error: Exception) -> None:
        """Nothing was committed: answer 96."""
        service = self._service
        try:
            service._error("ledger.failed", error=type(error).__name__, detail=str(error)[:200])
            self._reply(service._answer(self.message, self.request, Reason.SYSTEM_ERROR, self._started))
        except Exception as exc:
            self._fail(exc)
