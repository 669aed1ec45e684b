"""What the ledger's SQL runs on, written once for SQLite and PostgreSQL.

:class:`Db` is one connection inside a transaction, with ``$1``-style placeholders; :class:`Dialect`
is what differs between the two databases (row locks, how a moment is stored, where RRNs come from).
:func:`_marks` makes the placeholders for a list of values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol


class Db(Protocol):
    """One connection inside a transaction, as the core needs it (``$1``-style placeholders)."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Any | None: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> None: ...

    async def insert(self, sql: str, *args: Any) -> int:
        """Run an INSERT of one row into a table with an ``id`` key; the new row's id."""
        ...


class Dialect(Protocol):
    """What differs between the databases, for the queries written once."""

    def lock(self, mode: str) -> str:
        """The suffix that locks the rows a SELECT reads (``"UPDATE"`` or ``"SHARE"``), or nothing."""
        ...

    def store(self, moment: datetime) -> Any:
        """A moment as the database stores it."""
        ...

    def moment(self, stored: Any) -> datetime:
        """A stored moment back as a UTC datetime."""
        ...

    async def next_rrn(self, db: Db) -> str:
        """A new unique 12-digit retrieval reference number."""
        ...


@functools.lru_cache(maxsize=64)
def _marks(start: int, count: int) -> str:
    """``$start, $start+1, ...``: placeholders for a list of values."""
    return ", ".join(f"${n}" for n in range(start, start + count))
