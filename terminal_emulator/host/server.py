"""The acquirer host simulator's asyncio TCP server: a thin shell around :class:`HostEngine`.

Many connections, any number of requests in flight on each: a request whose rule delays its
answer waits in its own task, so later requests on the same connection overtake it (answers come
in any order, as from a real host; the client matches them by MTI class, DE11 and DE41).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl as ssl_module
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..codec import IsoMessage, MessageDecodeError, decode_message, encode_message
from ..framing import FrameDecoder, FramingError, frame
from ..messages import response_mti
from ..profile import ProfileError, WireProfile, load_profile
from .engine import HostEngine, classify
from .journal import JournalFile, Record, describe, record_of
from .rules import Rule, load_rules

__all__ = ["HostSimulator"]

_READ_CHUNK = 65536


@dataclass(eq=False, slots=True)
class _Link:
    """One client connection: its writer and the answers (or hang-ups) waiting for their delay."""

    number: int
    writer: asyncio.StreamWriter
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    closing: bool = False

    def later(self, delay_ms: float, act: Callable[[], None]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay_ms / 1000)
            act()
            if not self.closing:
                with contextlib.suppress(ConnectionError, OSError):
                    await self.writer.drain()

        task = asyncio.create_task(run(), name=f"iso-host-delay-{self.number}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send(self, data: bytes) -> None:
        if not self.closing and not self.writer.is_closing():
            self.writer.write(data)

    def close(self) -> None:
        self.closing = True
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.writer.close()


class HostSimulator:
    """An acquirer host on ``host:port`` (port 0: a free one, see :attr:`port` after :meth:`start`).

    ``rules``: :class:`Rule` objects or the path of a rules file; change them while running with
    :attr:`rules`. :meth:`stop` then :meth:`start` again listens on the same port ("host down, then
    back"). Every request is appended to :attr:`received` (and to ``journal``, a JSON-lines file);
    ``log`` gets one masked line per request and per connection opened or closed.
    """

    def __init__(
        self,
        profile: WireProfile | str = "iso87-binary",
        rules: Sequence[Rule] | str | Path = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        journal: str | Path | None = None,
        ssl: ssl_module.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        if self.profile.dialect != "iso87":
            raise ProfileError(f"profile {self.profile.name!r} uses dialect {self.profile.dialect!r}; "
                               "the host simulator speaks iso87 only")
        self.host = host
        self.received: list[Record] = []
        self._engine = HostEngine(load_rules(rules) if isinstance(rules, str | Path) else rules, clock=clock)
        self._port = port
        self._ssl = ssl
        self._clock = clock
        self._log = log
        self._journal = JournalFile(journal) if journal is not None else None
        self._server: asyncio.Server | None = None
        self._links: dict[int, _Link] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._numbers = itertools.count(1)
        self._arrived = asyncio.Event()

    # --- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._server is not None:
            return
        if self._journal is not None:
            self._journal.open()
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self._port, ssl=self._ssl,
                                                      reuse_address=True)
        except OSError:
            if self._journal is not None:
                self._journal.close()
            raise
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and hang up every connection (answers still waiting are not sent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self.disconnect_all()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)
        if self._journal is not None:
            self._journal.close()

    async def disconnect_all(self) -> None:
        """Hang up every open connection but keep listening (a network cut the client must survive)."""
        for link in list(self._links.values()):
            link.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)

    async def __aenter__(self) -> HostSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- what tests look at ------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the host simulator has not been started")
        return self._port

    @property
    def is_serving(self) -> bool:
        return self._server is not None

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._links)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._engine.rules

    @rules.setter
    def rules(self, rules: Sequence[Rule]) -> None:
        """Takes effect from the next request; ``nth`` and ``times`` count again from zero."""
        self._engine.rules = rules

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Record]:  # noqa: ASYNC109
        """Wait until at least ``count`` requests were received (``TimeoutError`` otherwise)."""
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return list(self.received)

    # --- serving -----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        link = _Link(next(self._numbers), writer)
        self._links[link.number] = link
        peer = writer.get_extra_info("peername")
        self._say(f"conn {link.number} opened from {peer[0]}:{peer[1]}" if peer else f"conn {link.number} opened")
        reason = "closed by the client"
        decoder = FrameDecoder(self.profile.framing)
        try:
            while not link.closing and (chunk := await reader.read(_READ_CHUNK)):
                for body in decoder.feed(chunk):
                    self._receive(link, body)
                    if link.closing:
                        break
                if not link.closing:
                    await writer.drain()
            if link.closing:
                reason = "closed by the host"
        except FramingError as exc:
            reason = f"closed: invalid framing ({exc})"
        except (ConnectionError, OSError) as exc:
            reason = f"closed: {exc.strerror or type(exc).__name__}"
        except Exception as exc:  # the per-connection boundary: one connection lost, never the server
            reason = f"closed after an internal error ({type(exc).__name__})"
        finally:
            del self._links[link.number]
            link.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            self._say(f"conn {link.number} {reason}")

    def _receive(self, link: _Link, body: bytes) -> None:
        now = datetime.fromtimestamp(self._clock(), UTC)
        try:
            request = decode_message(self.profile, body)
        except MessageDecodeError as exc:
            self._undecodable(link, body, str(exc), now)
            return
        outcome = self._engine.handle(request)
        self._record(record_of(outcome, link.number, now))
        if outcome.action == "answer" and outcome.answer is not None:
            data = self._encode(outcome.answer)
            if outcome.delay_ms:
                link.later(outcome.delay_ms, lambda: link.send(data))
            else:
                link.send(data)
        elif outcome.action == "close":
            if outcome.delay_ms:
                link.later(outcome.delay_ms, link.close)
            else:
                link.close()

    def _undecodable(self, link: _Link, body: bytes, error: str, now: datetime) -> None:
        """A readable MTI gets its response MTI with DE39 30 (format error); anything else, a hang-up."""
        ascii_mti_first = self.profile.spec["h"]["max_len"] == 0 and self.profile.spec["t"]["data_enc"] == "ascii"
        mti = body[:4].decode("ascii", "replace") if ascii_mti_first else ""
        if len(mti) == 4 and mti.isdigit() and classify(mti) != "response":
            answer = IsoMessage(mti=response_mti(mti), fields={39: "30"})
            self._record(Record(now, link.number, mti, "answer", classify(mti), response_mti=answer.mti,
                                response_code="30", error=error))
            link.send(self._encode(answer))
        else:
            self._record(Record(now, link.number, None, "close", error=error))
            link.close()

    def _encode(self, message: IsoMessage) -> bytes:
        return frame(encode_message(self.profile, message), self.profile.framing)

    def _record(self, record: Record) -> None:
        self.received.append(record)
        self._arrived.set()
        if self._journal is not None:
            self._journal.write(record)
        self._say(describe(record))

    def _say(self, line: str) -> None:
        if self._log is not None:
            self._log(line)
