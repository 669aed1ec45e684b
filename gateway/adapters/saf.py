"""The acquirer host's store-and-forward queue, sent: reversals of what the host may have approved and
advices of what the gateway approved in its place (design §5, "Upstream host").

The queue lives in the ledger (table ``saf``), written in the same transaction as the decision that
needs it, so it survives restarts and kill -9. One sender per ledger (a lease, like the relay's) takes
the oldest queued entry and sends it until the host answers: the first time as 0420 (an advice: 0220,
0120 for a pre-auth), then as 0421 (0221, 0121) with the same STAN, every ``retry_s``. The next entry
waits: the host gets them in the order they were queued. An attempt is counted before it is sent, so a
gateway killed mid-send repeats it as a repeat. Any answer acknowledges the entry (a reversal's 00, or
25 for a request the host never got, both mean the host will not hold the money); an entry older than
``max_age_s`` is given up (``pos.upstream.reversal_failed``) rather than sent a month late.

Advices carry the card number only while this process holds it in memory (:attr:`card_fields`, filled by
the service when it stands in): the ledger keeps no PAN. An advice sent after a restart has none, and
says so in the log (``upstream.advice_without_card``): docs/upstream.md tells operators what that means.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from gateway.core.host import host_saf_message
from gateway.core.model import SafItem
from gateway.ports import Renderer, Upstream, UpstreamDown, UpstreamTimeout
from gateway.protocol.host import host_message
from gateway.protocol.message import Message

#: how long a sender's lease outlives its last poll (another instance takes over after it)
SAF_LEASE_S = 10.0


class SafLedger(Protocol):
    async def saf_items(self, *, queued_only: bool = True, limit: int = 100) -> list[SafItem]: ...

    async def saf_attempted(self, item_id: int, at: datetime) -> None: ...

    async def saf_finished(self, item: SafItem, state: str, at: datetime, *, response_code: str | None = None,
                           error: str | None = None, render: Renderer) -> None: ...  # fmt: skip

    async def hold_lease(self, name: str, token: str, ttl_s: float) -> bool: ...

    async def release_lease(self, name: str, token: str) -> None: ...


class SafSender:
    """Sends the queue's head until the host answers it, then the next (see the module docstring)."""

    def __init__(
        self,
        ledger: SafLedger,
        upstream: Upstream,
        *,
        render: Renderer,
        retry_s: float = 5.0,
        max_age_s: float = 86_400.0,
        clock: Callable[[], datetime] | None = None,
        logger: Any = None,
    ) -> None:
        self.ledger = ledger
        self.upstream = upstream
        self.render = render
        self.retry_s = retry_s
        self.max_age = timedelta(seconds=max_age_s)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.log = logger
        #: card fields of stand-in approvals, by record id, while this process runs (never stored)
        self.card_fields: dict[int, dict[int, str]] = {}
        self._wake = asyncio.Event()
        self._token = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None
        self.sent = self.acknowledged = self.failed = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="saf-sender")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.ledger.release_lease("saf_lease", self._token)

    def notify(self) -> None:
        """Something was queued: look now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                busy = await self.send_next()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the ledger failed: try again later, never give up the loop
                self._log("warning", "upstream.saf_failed", error=type(exc).__name__, detail=str(exc)[:200])
                busy = False
            if not busy:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry_s):
                        await self._wake.wait()

    async def send_next(self) -> bool:
        """Send the head entry once. True when the next one may follow at once (answered, expired)."""
        if not await self.ledger.hold_lease("saf_lease", self._token, SAF_LEASE_S):
            return False
        head = await self.ledger.saf_items(queued_only=True, limit=1)
        if not head:
            return False
        item = head[0]
        now = self.clock()
        if now - item.created_at > self.max_age:
            error = f"not answered in {int(self.max_age.total_seconds())} s ({item.attempts} attempts)"
            await self.ledger.saf_finished(item, "failed", now, error=error, render=self.render)
            self.failed += 1
            self._log("error", "upstream.saf_expired", **self._fields(item), attempts=item.attempts)
            self.card_fields.pop(item.txn.id, None)
            return True
        message = self._message(item, now)
        await self.ledger.saf_attempted(item.id, now)  # counted first: a repeat after a crash is an xx21
        try:
            exchange = await self.upstream.send(message, stamp=False)
        except (UpstreamDown, UpstreamTimeout) as exc:
            self._log("info", "upstream.saf_unanswered", **self._fields(item), mti=message.mti,
                      why="down" if isinstance(exc, UpstreamDown) else "timeout")  # fmt: skip
            return False
        self.sent += 1
        code = exchange.answer.fields.get(39)
        await self.ledger.saf_finished(item, "acknowledged", self.clock(), response_code=code, render=self.render)
        self.acknowledged += 1
        self.card_fields.pop(item.txn.id, None)
        self._log("info", "upstream.saf_acknowledged", **self._fields(item), mti=message.mti, response_code=code)
        return True

    def _message(self, item: SafItem, now: datetime) -> Message:
        request = host_message(host_saf_message(item, now))
        if item.action != "advise":
            return request
        card = self.card_fields.get(item.txn.id)
        if card is None:
            self._log("warning", "upstream.advice_without_card", **self._fields(item))
            return request
        return Message(request.mti, dict(sorted({**request.fields, **card}.items())))

    @staticmethod
    def _fields(item: SafItem) -> dict[str, Any]:
        return {"action": item.action, "terminal": item.txn.terminal_id, "rrn": item.txn.rrn, "queued": item.id}

    def _log(self, level: str, event: str, **fields: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **fields)
