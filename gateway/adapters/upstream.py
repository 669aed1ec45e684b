"""The persistent link to the acquirer host: N connections kept open and signed on, and a MUX over them.

Each connection slot runs one task: connect (with a deadline), sign on (0800, DE70 ``001``; only an
0810 with DE39 ``00`` lets it carry traffic), then carry requests until it drops, sending an echo
test (DE70 ``301``) whenever nothing has been received for ``echo_interval_s`` (no answer in time:
the host is gone, close). After any failure it waits a growing, jittered delay and starts again.
Requests go round-robin over the signed-on connections; the link stamps its own STAN and DE7
(:meth:`UpstreamLink.stamp`) and matches answers by MTI class + DE11 + DE41
(:mod:`gateway.adapters.upstream_mux`, the pure half). A dropped connection fails its requests in
flight at once; an answer nobody waits for any more is logged and dropped. Log lines carry MTI,
STAN, DE41, DE39 and sizes, never a decoded message (it holds the PAN). docs/upstream.md, "Link".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from gateway import ports
from gateway.adapters.upstream_connection import (
    Connection,
    Slot,
    State,
    TlsFilesError,
    describe_os_error,
    tls_context,
)
from gateway.adapters.upstream_mux import (
    ECHO,
    SIGN_ON,
    Backoff,
    DuplicateInFlight,
    PendingTable,
    StanAllocator,
    is_response,
    mux_key,
    network_request,
    stamped,
)
from gateway.config import UpstreamSettings
from gateway.ports import Clock
from gateway.protocol.codec import Codec, DecodeError
from gateway.protocol.framing import encode_frame
from gateway.protocol.message import Message
from gateway.protocol.profile import Profile, ProfileError, load_profile

__all__ = ["DuplicateInFlight", "Exchange", "State", "UpstreamDown", "UpstreamLink", "UpstreamTimeout"]

#: data elements the link reads or writes: DE7 and DE11 (stamp), DE39 (sign-on), DE41 (MUX), DE70
_NEEDED_FIELDS = (7, 11, 39, 41, 70)


class UpstreamDown(ports.UpstreamDown):
    """No signed-on connection: nothing was sent (the caller may decline or stand in)."""


class UpstreamTimeout(ports.UpstreamTimeout):
    """Sent (or possibly sent: a write failed midway, the connection dropped after the write) and no
    answer in time. ``sent`` is the request as stamped, so the caller can build the reversal;
    ``reason`` is ``timeout``, ``connection_lost``, ``write_failed`` or ``stopped``."""

    def __init__(self, sent: Message, reason: str) -> None:
        super().__init__(f"no answer from the upstream host to {sent.mti} STAN {sent.fields.get(11)}: {reason}")
        self.sent = sent
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Exchange:
    sent: Message  #: the request as it went out (the link's STAN in DE11, DE7 stamped)
    answer: Message  #: the host's answer


class UpstreamRecorder(Protocol):
    """What the link reports to :class:`gateway.metrics.Metrics`."""

    def upstream_connections_up(self, count: int) -> None: ...

    def upstream_request_done(self, outcome: str, latency_s: float | None) -> None: ...

    def upstream_late_answer(self) -> None: ...

    def upstream_undecodable_answer(self) -> None: ...

    def upstream_disconnected(self, reason: str) -> None: ...


class _UtcClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Message]
    sent: Message


class UpstreamLink:
    """``settings.connections`` connections to the host at ``settings.url``, in ``profile``'s framing
    and codec. :meth:`start`, :meth:`send` (or :meth:`stamp` then ``send(stamp=False)``), :meth:`stop`.

    ``logger``: a structlog-style logger (default ``gateway.upstream``); ``recorder``: the metrics;
    ``clock``: for DE7 and status times (:class:`gateway.ports.Clock`); ``rng``: the backoff jitter.
    """

    def __init__(
        self,
        settings: UpstreamSettings,
        profile: Profile,
        *,
        logger: Any = None,
        recorder: UpstreamRecorder | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        endpoint = settings.endpoint()
        if endpoint is None:
            raise ValueError("no upstream url: the link has nowhere to connect")
        if profile.framing.tpdu:
            raise ValueError(f"profile {profile.name!r} frames with a TPDU, which the upstream link does not send")
        missing = [str(number) for number in _NEEDED_FIELDS if number not in profile.fields]
        if missing:
            raise ValueError(f"profile {profile.name!r} does not define DE{', DE'.join(missing)}")
        if logger is None:
            from gateway.logs import get_logger

            logger = get_logger("gateway.upstream")
        scheme, self.host, self.port = endpoint
        self.settings, self.profile = settings, profile
        self.log, self.recorder = logger, recorder
        self.clock: Clock = clock or _UtcClock()
        self._ssl = tls_context(settings) if scheme == "tls" else None
        self._codec = Codec(profile)
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._rng = rng or random.Random()  # jitter, not a secret
        self._pending: PendingTable[_Waiter] = PendingTable()
        self._stans = StanAllocator()
        self._slots = [Slot(index, State.CLOSED, self.clock.now()) for index in range(settings.connections)]
        self._serials = itertools.count(1)
        self._turn = 0
        self._up_count = 0
        self._up_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @classmethod
    def from_settings(
        cls, settings: UpstreamSettings, *, logger: Any = None, recorder: UpstreamRecorder | None = None,
        clock: Clock | None = None,
    ) -> UpstreamLink:  # fmt: skip
        """The link ``GATEWAY_UPSTREAM__*`` describes, its profile loaded by name (or path). Raises
        :class:`gateway.startup.StartupError` naming the variable at fault (a profile that does not
        load or cannot carry the link, TLS files that do not load)."""
        from gateway.startup import StartupError

        if settings.url is None:
            raise StartupError("GATEWAY_UPSTREAM__URL", "is not set: there is no upstream host to link to")
        try:
            profile = load_profile(settings.profile)
            return cls(settings, profile, logger=logger, recorder=recorder, clock=clock)
        except (ProfileError, ValueError) as exc:
            raise StartupError("GATEWAY_UPSTREAM__PROFILE", str(exc)) from None
        except TlsFilesError as exc:
            raise StartupError(exc.setting, exc.detail) from None

    # --- what the caller sees ------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """At least one connection is signed on."""
        return self._up_count > 0

    def status(self) -> list[dict[str, Any]]:
        """Per connection: index, state, since (ISO 8601 UTC), requests in flight, last error."""
        return [
            {
                "index": slot.index,
                "state": str(slot.state),
                "since": slot.since.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "in_flight": self._pending.count(slot.connection.serial) if slot.connection is not None else 0,
                "last_error": slot.last_error,
            }
            for slot in self._slots
        ]

    async def wait_up(self, timeout: float) -> bool:  # noqa: ASYNC109  # the interface asks for it
        """Whether a connection is signed on within ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.up:
                    await self._up_event.wait()
        return self.up

    def stamp(self, message: Message) -> Message:
        """A copy with a fresh link STAN in DE11 (none in flight has it) and DE7 = now (UTC)."""
        return stamped(message, self._stans.next(self._pending.has_stan), self.clock.now())

    async def send(self, message: Message, *, timeout: float | None = None, stamp: bool = True) -> Exchange:  # noqa: ASYNC109
        """Send a request and wait for its answer (``timeout`` default ``settings.timeout_s``).

        ``stamp=False`` sends ``message`` as given (stamped earlier by :meth:`stamp`). Raises
        :class:`UpstreamDown` at once when no connection is signed on (nothing written),
        :class:`UpstreamTimeout` when written (or possibly written) and not answered in time,
        :class:`DuplicateInFlight` when the same MTI class + STAN + terminal is in flight (nothing
        written), and the codec's ``EncodeError`` or ``FramingError`` for a message this profile
        cannot carry (nothing written).
        """
        if stamp:
            message = self.stamp(message)
        frame = encode_frame(self.profile.framing, self._codec.encode(message))
        connection = self._pick()
        if connection is None:
            self._record("down", None)
            raise UpstreamDown("no upstream connection is signed on")
        wait = self.settings.timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            answer = await self._exchange(connection, message, frame, wait)
        except UpstreamTimeout:
            self._record("timeout", None)
            raise
        self._record("answered", loop.time() - started)
        return Exchange(message, answer)

    async def start(self) -> None:
        """Start connecting every slot in the background; returns at once."""
        if self._tasks:
            return
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep(slot), name=f"upstream-{slot.index}") for slot in self._slots]

    async def stop(self) -> None:
        """Close every connection. Requests in flight fail with :class:`UpstreamTimeout` (they were
        written); later sends get :class:`UpstreamDown`."""
        self._stopping = True
        failed = len(self._pending)
        for waiter in self._pending.take_all():
            _fail(waiter, "stopped")
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self._slots:
            if slot.connection is not None:
                slot.connection.close("stopped")
            self._set_state(slot, State.CLOSED)
        self.log.info("upstream.stopped", connections=len(self._slots), in_flight_failed=failed)

    # --- one connection slot ---------------------------------------------------------------------

    async def _keep(self, slot: Slot) -> None:
        """Connect, sign on, carry traffic; after a failure wait (backoff) and start again."""
        failures = 0
        while not self._stopping:
            try:
                reason, detail, signed_on = await self._session(slot)
            except Exception as exc:  # the per-connection boundary: a bug costs this connection, not the link
                reason, detail, signed_on = "internal_error", type(exc).__name__, False
                self.log.error("upstream.crashed", conn=slot.index, error=type(exc).__name__, exc_info=True)
            failures = 0 if signed_on else failures + 1
            delay = self._backoff.delay(failures - 1 if failures else 0, self._rng.random())
            slot.last_error = f"{reason}: {detail}" if detail else reason
            self._set_state(slot, State.BACKOFF)
            if self.recorder is not None:
                self.recorder.upstream_disconnected(reason)
            self.log.warning("upstream.down", conn=slot.index, reason=reason, detail=detail or None,
                             failures=failures, retry_in_s=round(delay, 3))  # fmt: skip
            await asyncio.sleep(delay)

    async def _session(self, slot: Slot) -> tuple[str, str, bool]:
        """One connection from connect to its end: (reason, detail, whether it was signed on)."""
        self._set_state(slot, State.CONNECTING)
        loop = asyncio.get_running_loop()
        serial = next(self._serials)
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(self, self.profile.framing, slot.index, serial),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            return "connect_failed", f"no connection within {self.settings.connect_timeout_s}s", False
        except OSError as exc:  # refused, unreachable, TLS handshake failed (ssl.SSLError is an OSError)
            return "connect_failed", describe_os_error(exc), False
        slot.connection = connection
        try:
            self.log.info("upstream.connected", conn=slot.index, peer=f"{self.host}:{self.port}")
            self._set_state(slot, State.SIGNING_ON)
            answer = await self._network(connection, SIGN_ON)
            if answer is None:
                return _ended(connection, "signon_timeout", f"no 0810 within {self.settings.network_timeout_s}s")
            if answer.fields.get(39) != "00":
                return "signon_refused", f"response code {answer.fields.get(39)}", False
            slot.last_error = None
            self._set_state(slot, State.UP)
            self.log.info("upstream.signed_on", conn=slot.index, peer=f"{self.host}:{self.port}")
            reason, detail = await self._carry(connection)
            return reason, detail, True
        finally:
            slot.connection = None
            connection.close("stopped" if self._stopping else "closed")

    async def _carry(self, connection: Connection) -> tuple[str, str]:
        """Wait for the connection to end; echo-test it whenever nothing came for the echo interval."""
        loop = asyncio.get_running_loop()
        while True:
            quiet = self.settings.echo_interval_s - (loop.time() - connection.last_received)
            if quiet > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(quiet):
                        await connection.closed.wait()
                if connection.lost:
                    return connection.reason, connection.detail
                continue
            answer = await self._network(connection, ECHO)
            if connection.lost:
                return connection.reason, connection.detail
            if answer is None:
                return "echo_timeout", f"no 0810 within {self.settings.network_timeout_s}s"
            if answer.fields.get(39) != "00":
                return "echo_refused", f"response code {answer.fields.get(39)}"

    async def _network(self, connection: Connection, code: str) -> Message | None:
        """An 0800 with DE70 ``code`` on ``connection``: its 0810, or None without one in time."""
        message = network_request(code, self._stans.next(self._pending.has_stan), self.clock.now())
        frame = encode_frame(self.profile.framing, self._codec.encode(message))
        try:
            return await self._exchange(connection, message, frame, self.settings.network_timeout_s)
        except UpstreamTimeout:
            return None

    # --- the MUX ----------------------------------------------------------------------------------

    def _pick(self) -> Connection | None:
        """The next signed-on connection in turn, or None (always while stopping)."""
        if self._stopping:
            return None
        live = [connection for slot in self._slots if (connection := slot.live) is not None]
        if not live:
            return None
        self._turn += 1
        return live[self._turn % len(live)]

    async def _exchange(self, connection: Connection, message: Message, frame: bytes, timeout: float) -> Message:  # noqa: ASYNC109
        key = mux_key(message)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), message)
        self._pending.add(key, waiter, connection.serial)
        try:
            try:
                connection.write(frame)
            except Exception as exc:  # a transport that broke under us: maybe part of it left
                connection.close("write_failed", type(exc).__name__)
                raise UpstreamTimeout(message, "write_failed") from None
            async with asyncio.timeout(timeout):
                return await waiter.future
        except TimeoutError:
            raise UpstreamTimeout(message, "timeout") from None
        finally:
            self._pending.discard(key, waiter)

    def received(self, connection: Connection, payload: bytes) -> None:
        """A frame from the host: the answer someone waits for, a late one, or a host's own request."""
        connection.last_received = asyncio.get_running_loop().time()
        try:
            message = self._codec.decode(payload)
        except DecodeError as exc:  # costs this message only; its text names the field, never a value
            if self.recorder is not None:
                self.recorder.upstream_undecodable_answer()
            self.log.warning("upstream.undecodable", mti=exc.mti, conn=connection.index, field=exc.field,
                             reason=exc.reason, size=len(payload))  # fmt: skip
            return
        if not is_response(message.mti):
            self._host_request(connection, message)
            return
        waiter = self._pending.match(mux_key(message))
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(message)
            return
        if self.recorder is not None:
            self.recorder.upstream_late_answer()
        fields = message.fields
        # neighbouring text values are read together for split card numbers (gateway.logs): ints between
        self.log.warning("upstream.late_answer", mti=message.mti, terminal=fields.get(41), conn=connection.index,
                         stan=fields.get(11), size=len(payload), response_code=fields.get(39))  # fmt: skip

    def _host_request(self, connection: Connection, message: Message) -> None:
        """The host's own 0800 (its echo test) is answered 00; any other request is logged and dropped."""
        if message.mti[:3] != "080":
            self.log.warning("upstream.unexpected_request", mti=message.mti, conn=connection.index)
            return
        fields = {number: message.fields[number] for number in (7, 11, 70) if number in message.fields}
        answer = Message(f"{message.mti[:2]}10", {**fields, 39: "00"})
        if not connection.lost:
            connection.write(encode_frame(self.profile.framing, self._codec.encode(answer)))

    def lost(self, connection: Connection) -> None:
        """A connection ended (either side): its requests in flight fail now, not at their timeout."""
        for waiter in self._pending.take_connection(connection.serial):
            _fail(waiter, "connection_lost")
        self._refresh_up()

    # --- state ------------------------------------------------------------------------------------

    def _set_state(self, slot: Slot, state: State) -> None:
        if slot.state is not state:
            slot.state, slot.since = state, self.clock.now()
        self._refresh_up()

    def _refresh_up(self) -> None:
        count = sum(1 for slot in self._slots if slot.live is not None)
        if count != self._up_count:
            self._up_count = count
            if self.recorder is not None:
                self.recorder.upstream_connections_up(count)
        if count:
            self._up_event.set()
        else:
            self._up_event.clear()

    def _record(self, outcome: str, latency_s: float | None) -> None:
        if self.recorder is not None:
            self.recorder.upstream_request_done(outcome, latency_s)


def _fail(waiter: _Waiter, reason: str) -> None:
    if not waiter.future.done():
        waiter.future.set_exception(UpstreamTimeout(waiter.sent, reason))


def _ended(connection: Connection, reason: str, detail: str) -> tuple[str, str, bool]:
    """Why a connection that was not signed on ended: its own loss if it was lost, else ``reason``."""
    if connection.lost:
        return connection.reason, connection.detail, False
    return reason, detail, False
