"""Three reads done once for a group of requests decided in one transaction (SQLite's group commit).

Nearly every request asks the ledger for its duplicate (:class:`FindDuplicate`), for a tombstone that
names it (:class:`FindTombstone`) and for its terminal's open batch (:class:`CurrentBatch`), and
nearly always the first two find nothing. :func:`read_ahead` asks each of the three once for every
terminal of the group, at the start of its transaction; :class:`Lookahead` then answers those
queries from what it read, as the database would have answered them one by one. Where the group
itself wrote what an answer depends on (a record under that retransmission key, a tombstone of that
terminal, a change to the record found, batches closed), it answers ``UNKNOWN`` and the query goes
to the database as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final, Protocol

from gateway.core.model import Batch, Request, Txn, TxnStatus
from gateway.core.queries import Context, CurrentBatch, FindDuplicate, FindTombstone, Query

__all__ = ["UNKNOWN", "Lookahead", "read_ahead"]

#: the lookahead cannot tell: ask the database
UNKNOWN: Final = object()
#: lookups per statement (padded to a power of two, so that few statement shapes are cached)
_CHUNK = 32

Terminal = tuple[str, str]  #: merchant id, terminal id
Key = tuple[str, str, str, str]  #: a retransmission key: merchant, terminal, STAN, MTI class


class _Db(Protocol):
    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...


class Lookahead:
    """What :func:`read_ahead` found, kept up to date with what the group wrote since (see the module
    docstring): a record written makes its retransmission key ask the database (and its terminal's
    tombstones, if it is one); a record changed makes a lookup that finds it ask the database; a batch
    the database opened is remembered; batches closed make every batch lookup ask the database."""

    def __init__(self, terminals: set[Terminal], since: datetime, duplicates: dict[Key, list[Txn]],
                 tombstones: set[Terminal], batches: dict[Terminal, Batch]) -> None:  # fmt: skip
        self._terminals = terminals  #: read for these terminals, for windows starting at ``since`` or later
        self._since = since
        self._duplicates = duplicates  #: by retransmission key: the records in the window
        self._tombstones = tombstones  #: terminals that may have an unmatched record in the window
        self._batches = batches  #: open batches by terminal
        self._written: set[Key] = set()  #: retransmission keys of the records the group wrote
        self._changed: set[int] = set()  #: records the group changed
        self._batches_closed = self._unmatched_changed = False

    def answer(self, query: Query) -> Any:
        """The database's answer to ``query`` as it stands now, or ``UNKNOWN``."""
        if not isinstance(query, FindDuplicate | FindTombstone | CurrentBatch) or (
            (query.merchant_id, query.terminal_id) not in self._terminals
        ):
            return UNKNOWN
        if isinstance(query, FindDuplicate) and query.since >= self._since:
            key = (query.merchant_id, query.terminal_id, query.stan, query.mti_class)
            if key in self._written:
                return UNKNOWN
            found = [txn for txn in self._duplicates.get(key, ()) if txn.created_at >= query.since]
            latest = max(found, key=lambda txn: txn.id, default=None)
            return UNKNOWN if latest is not None and latest.id in self._changed else latest
        if isinstance(query, FindTombstone) and query.since >= self._since and not self._unmatched_changed:
            return UNKNOWN if (query.merchant_id, query.terminal_id) in self._tombstones else None
        if isinstance(query, CurrentBatch) and not self._batches_closed:
            batch = self._batches.get((query.merchant_id, query.terminal_id))
            return UNKNOWN if batch is None and query.create else batch
        return UNKNOWN

    def recorded(self, record: Txn) -> None:
        """The group wrote this record."""
        self._written.add((record.merchant_id, record.terminal_id, record.stan, record.mti[:3]))
        if record.status is TxnStatus.UNMATCHED:
            self._tombstones.add((record.merchant_id, record.terminal_id))

    def changed(self, txn_id: int, status: TxnStatus | None) -> None:
        """The group changed this record (to ``status``, when it set one)."""
        self._changed.add(txn_id)
        self._unmatched_changed |= status is TxnStatus.UNMATCHED

    def batch_found(self, query: CurrentBatch, batch: Batch | None) -> None:
        """The database's answer to ``query`` (which may have opened the batch)."""
        if batch is not None:
            self._batches[(query.merchant_id, query.terminal_id)] = batch

    def batches_closed(self) -> None:
        """The group closed batches (a settlement, the cut-off)."""
        self._batches_closed = True


@functools.lru_cache(maxsize=32)
def _wanted(columns: str, count: int, first: int) -> str:
    """``WITH wanted(columns) AS (VALUES ($first, ...), ...)`` for ``count`` rows."""
    width = len(columns.split(", "))
    rows = ", ".join(
        "(" + ", ".join(f"${first + row * width + n}" for n in range(width)) + ")" for row in range(count)
    )
    return f"WITH wanted({columns}) AS (VALUES {rows}) "


_DUPLICATES = (
    "SELECT txns.* FROM wanted JOIN txns ON txns.merchant_id = wanted.m AND txns.stan = wanted.s "
    "AND txns.mti_class = wanted.c AND txns.terminal_id = wanted.t WHERE txns.created_at >= $1"
)
_TOMBSTONES = (
    "SELECT DISTINCT txns.merchant_id, txns.terminal_id FROM wanted JOIN txns ON txns.merchant_id = wanted.m "
    "AND txns.terminal_id = wanted.t WHERE txns.status = 'unmatched' AND txns.created_at >= $1"
)
_BATCHES = (
    "SELECT batches.* FROM wanted JOIN batches ON batches.merchant_id = wanted.m "
    "AND batches.terminal_id = wanted.t WHERE batches.state = 'open'"
)


def _padded(rows: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """``rows`` and the last of them again up to a power of two."""
    return [*rows, *[rows[-1]] * ((1 << (len(rows) - 1).bit_length()) - len(rows))]


async def read_ahead(db: _Db, requests: Sequence[tuple[Request, Context]], stored: Callable[[datetime], Any],
                     txn: Callable[[Any], Txn], batch: Callable[[Any], Batch]) -> Lookahead:  # fmt: skip
    """The three reads for the terminals of ``requests``, in the open transaction: ``stored`` is how
    the database stores a moment, ``txn`` and ``batch`` read a row."""
    since = min(ctx.now - ctx.policy.duplicate_ttl for _, ctx in requests)
    keys = sorted({(r.merchant_id, r.stan, r.mti_class, r.terminal_id) for r, _ in requests})
    terminals = sorted({(r.merchant_id, r.terminal_id) for r, _ in requests})
    duplicates: dict[Key, list[Txn]] = {}
    tombstones: set[Terminal] = set()
    batches: dict[Terminal, Batch] = {}
    for start in range(0, len(keys), _CHUNK):
        chunk = _padded(keys[start:start + _CHUNK])
        sql = _wanted("m, s, c, t", len(chunk), 2) + _DUPLICATES
        rows = {row["id"]: row for row in await db.fetch(sql, stored(since), *(v for key in chunk for v in key))}
        for row in rows.values():  # a padded lookup finds its rows twice
            key = (row["merchant_id"], row["terminal_id"], row["stan"], row["mti_class"])
            duplicates.setdefault(key, []).append(txn(row))
    for start in range(0, len(terminals), _CHUNK):
        chunk = _padded(terminals[start:start + _CHUNK])
        values = [v for terminal in chunk for v in terminal]
        sql = _wanted("m, t", len(chunk), 2) + _TOMBSTONES
        tombstones.update((row[0], row[1]) for row in await db.fetch(sql, stored(since), *values))
        for row in await db.fetch(_wanted("m, t", len(chunk), 1) + _BATCHES, *values):
            batches[(row["merchant_id"], row["terminal_id"])] = batch(row)
    return Lookahead(set(terminals), since, duplicates, tombstones, batches)
