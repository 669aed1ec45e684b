"""The pure half of the upstream link: how requests are stamped and how answers find their caller.

No sockets, no clock, no randomness here (time and random numbers are passed in), so that all of it
is tested in memory and by hypothesis; :mod:`gateway.adapters.upstream` is the I/O around it.

- :func:`mux_key`: the key an answer is matched by, jPOS QMUX's: the answer's MTI class (the first
  three digits of the response MTI: ``021`` for a 0200 or 0201 and its 0210, ``043`` for a 0420 or
  0421 and their 0430), DE11 (STAN) and DE41 (terminal; ``None`` for a network 0800, which has none).
- :class:`StanAllocator`: the link's own STANs, 000001..999999 and round again, never one still in
  flight.
- :class:`PendingTable`: the requests in flight by key, each with the connection it went out on.
- :class:`Backoff`: how long to wait before the next connection attempt.
- :func:`stamped`, :func:`network_request`, :func:`transmission_time`: the messages the link makes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from gateway.protocol.message import Message

__all__ = [
    "ECHO",
    "SIGN_OFF",
    "SIGN_ON",
    "Backoff",
    "DuplicateInFlight",
    "MuxKey",
    "PendingTable",
    "StanAllocator",
    "is_response",
    "mux_key",
    "network_request",
    "response_class",
    "stamped",
    "transmission_time",
]

#: DE70 network management codes the link sends (design section 4)
SIGN_ON, SIGN_OFF, ECHO = "001", "002", "301"
#: the largest STAN (DE11 is n6); the counter goes round to 000001 after it
MAX_STAN = 999_999

#: (answer MTI class, DE11, DE41)
MuxKey = tuple[str, str | None, str | None]

W = TypeVar("W")


class DuplicateInFlight(ValueError):
    """A request with the same MTI class, STAN and terminal is already in flight on this link: its
    answer could not be told from the other's, so nothing was sent."""


def is_response(mti: str) -> bool:
    """An answer (third MTI digit odd: 0110, 0210, 0430, 0810) rather than a request."""
    return len(mti) == 4 and mti.isdigit() and int(mti[2]) % 2 == 1


def response_class(mti: str) -> str:
    """The first three digits of the answer's MTI: ``021`` for 0200, 0201 and 0210; ``043`` for 0420,
    0421 and 0430; ``081`` for 0800 and 0810. Raises ``ValueError`` for anything but 4 digits."""
    if len(mti) != 4 or not mti.isdigit():
        raise ValueError("an MTI is 4 digits")
    third = int(mti[2])
    return f"{mti[:2]}{third if third % 2 else third + 1}"


def mux_key(message: Message) -> MuxKey:
    """The key that pairs a request with its answer (the same for both). DE41 is compared without
    trailing spaces (an ans-8 terminal id is space-padded; some hosts trim it)."""
    terminal = message.fields.get(41)
    return response_class(message.mti), message.fields.get(11), terminal.rstrip(" ") if terminal is not None else None


def transmission_time(moment: datetime) -> str:
    """DE7, transmission date and time: MMDDhhmmss in UTC."""
    if moment.tzinfo is None:
        raise ValueError("the moment must be timezone-aware")
    return moment.astimezone(UTC).strftime("%m%d%H%M%S")


def stamped(message: Message, stan: str, moment: datetime) -> Message:
    """A copy of ``message`` with the link's STAN in DE11 and DE7 = ``moment``; the rest untouched."""
    fields = dict(message.fields)
    fields[7] = transmission_time(moment)
    fields[11] = stan
    return Message(message.mti, fields)


def network_request(code: str, stan: str, moment: datetime) -> Message:
    """An 0800 network management request: DE7, DE11 and DE70 (``SIGN_ON``, ``SIGN_OFF``, ``ECHO``)."""
    return Message("0800", {7: transmission_time(moment), 11: stan, 70: code})


class StanAllocator:
    """The link's STANs: 000001, 000002, ... 999999, then 000001 again, skipping every STAN the
    ``in_flight`` test says is still waiting for its answer."""

    __slots__ = ("_last",)

    def __init__(self, last: int = 0) -> None:
        if not 0 <= last <= MAX_STAN:
            raise ValueError(f"last must be 0..{MAX_STAN}")
        self._last = last

    def next(self, in_flight: Callable[[str], bool]) -> str:
        """The next STAN not in flight; ``RuntimeError`` if all 999,999 are (never in practice)."""
        candidate = self._last
        for _ in range(MAX_STAN):
            candidate = candidate % MAX_STAN + 1
            stan = f"{candidate:06d}"
            if not in_flight(stan):
                self._last = candidate
                return stan
        raise RuntimeError("every STAN is in flight")


@dataclass(slots=True)
class _Entry(Generic[W]):
    waiter: W
    connection: int


class PendingTable(Generic[W]):
    """The requests in flight on a link: a waiter (whatever the caller waits on) per :func:`mux_key`,
    with the index of the connection the request was written to."""

    __slots__ = ("_by_key", "_stans")

    def __init__(self) -> None:
        self._by_key: dict[MuxKey, _Entry[W]] = {}
        self._stans: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._by_key)

    def has_stan(self, stan: str) -> bool:
        """Some request in flight carries this DE11 (whatever its class and terminal)."""
        return stan in self._stans

    def add(self, key: MuxKey, waiter: W, connection: int) -> None:
        """Register a request about to be written; :class:`DuplicateInFlight` if its key is taken."""
        if key in self._by_key:
            raise DuplicateInFlight("a request with this MTI class, STAN and terminal is already in flight")
        self._by_key[key] = _Entry(waiter, connection)
        if key[1] is not None:
            self._stans[key[1]] += 1

    def match(self, key: MuxKey) -> W | None:
        """The waiter of the request this answer's key belongs to, taken out of the table; None when
        nobody waits for it (a late answer, or one for a request never sent)."""
        entry = self._by_key.pop(key, None)
        if entry is None:
            return None
        self._forget_stan(key)
        return entry.waiter

    def discard(self, key: MuxKey, waiter: W) -> None:
        """Forget ``key`` if it is still ``waiter``'s (a caller that stopped waiting)."""
        entry = self._by_key.get(key)
        if entry is not None and entry.waiter is waiter:
            del self._by_key[key]
            self._forget_stan(key)

    def take_connection(self, connection: int) -> list[W]:
        """Every waiter of requests written to ``connection``, taken out of the table (it dropped)."""
        keys = [key for key, entry in self._by_key.items() if entry.connection == connection]
        return [self._take(key) for key in keys]

    def take_all(self) -> list[W]:
        """Every waiter, taken out of the table (the link stops)."""
        return [self._take(key) for key in list(self._by_key)]

    def count(self, connection: int) -> int:
        """Requests in flight on ``connection``."""
        return sum(1 for entry in self._by_key.values() if entry.connection == connection)

    def keys(self) -> Iterator[MuxKey]:
        return iter(list(self._by_key))

    def _take(self, key: MuxKey) -> W:
        entry = self._by_key.pop(key)
        self._forget_stan(key)
        return entry.waiter

    def _forget_stan(self, key: MuxKey) -> None:
        stan = key[1]
        if stan is None:
            return
        self._stans[stan] -= 1
        if self._stans[stan] <= 0:
            del self._stans[stan]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: ``initial_s`` doubled per failed attempt up to ``max_s``, then each delay
    drawn between half of it and all of it ("equal jitter"), so that many gateways cut off together
    do not come back in step, and none retries in a tight loop."""

    initial_s: float
    max_s: float

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")

    def ceiling(self, attempt: int) -> float:
        """The delay before jitter after ``attempt`` failures in a row (0: the first failure)."""
        if attempt >= 64:  # 2**64 times any initial delay is past any cap
            return self.max_s
        return min(self.max_s, self.initial_s * (1 << max(0, attempt)))

    def delay(self, attempt: int, unit: float) -> float:
        """The delay after ``attempt`` failures; ``unit`` is a random number in [0, 1)."""
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + ceiling / 2 * unit
