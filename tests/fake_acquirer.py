"""A scriptable acquirer host on raw sockets, for the upstream link's failure tests.

It frames with a 2-byte big-endian length and encodes with pyiso8583's own built-in ``default`` spec
(the ``iso87-binary`` layout), never with the gateway's codec. Each request goes to ``behaviour``
(an async callable) with the connection it came on; the default answers every request at once with
MTI + 10, the request's fields echoed (less the card data) and DE39 ``00``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import iso8583
import iso8583.specs

SPEC = iso8583.specs.default
#: fields an answer never echoes (card data)
CARD_FIELDS = frozenset({2, 14, 35, 52, 55})


def encode(mti: str, fields: dict[int, str]) -> bytes:
    raw, _ = iso8583.encode({"t": mti, **{str(k): v for k, v in fields.items()}}, SPEC)
    return struct.pack(">H", len(raw)) + bytes(raw)


def answer_to(
    mti: str, fields: dict[int, str], code: str = "00", *, echo_card: bool = False
) -> tuple[str, dict[int, str]]:
    """The default answer: MTI + 10 (0421 -> 0430), every field but card data echoed, DE39 = ``code``."""
    answer_mti = f"{mti[:2]}{int(mti[2]) + 1}0"
    echoed = {k: v for k, v in fields.items() if echo_card or k not in CARD_FIELDS}
    return answer_mti, {**echoed, 39: code}


@dataclass(eq=False)
class HostConnection:
    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: list[tuple[str, dict[int, str]]] = field(default_factory=list)

    def send(self, mti: str, fields: dict[int, str]) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(mti, fields))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def answer(self, mti: str, fields: dict[int, str], code: str = "00", *, echo_card: bool = False) -> None:
        self.send(*answer_to(mti, fields, code, echo_card=echo_card))

    def close(self) -> None:
        self.writer.close()


Behaviour = Callable[[HostConnection, str, dict[int, str]], Awaitable[None]]


async def answer_everything(conn: HostConnection, mti: str, fields: dict[int, str]) -> None:
    conn.answer(mti, fields)


class FakeAcquirer:
    """``async with FakeAcquirer(behaviour) as host``: listening on 127.0.0.1, a free port."""

    def __init__(self, behaviour: Behaviour = answer_everything) -> None:
        self.behaviour = behaviour
        self.connections: list[HostConnection] = []
        self.requests: list[tuple[HostConnection, str, dict[int, str]]] = []
        self._server: asyncio.Server | None = None
        self._numbers = itertools.count(1)
        self._arrived = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> FakeAcquirer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.connections:
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def of(self, mti: str, code: str | None = None) -> list[tuple[HostConnection, str, dict[int, str]]]:
        """Requests received with this MTI (and DE70 ``code`` for network messages)."""
        return [r for r in self.requests if r[1] == mti and (code is None or r[2].get(70) == code)]

    async def wait_for(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self._arrived.clear()
                await self._arrived.wait()

    def later(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` in the background (answers sent after a delay, out of order)."""

        async def run() -> None:
            await coro

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = HostConnection(next(self._numbers), reader, writer)
        self.connections.append(conn)
        self._arrived.set()
        try:
            while True:
                size = struct.unpack(">H", await reader.readexactly(2))[0]
                doc, _ = iso8583.decode(await reader.readexactly(size), SPEC)
                fields = {int(k): v for k, v in doc.items() if k not in ("t", "p", "1", "h")}
                conn.received.append((doc["t"], fields))
                self.requests.append((conn, doc["t"], fields))
                self._arrived.set()
                await self.behaviour(conn, doc["t"], fields)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._arrived.set()
