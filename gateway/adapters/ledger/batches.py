"""The ledger's queries on batches and batch uploads, in SQL written once (see :mod:`.core`).

:class:`BatchQueries` is a part of :class:`~gateway.adapters.ledger.core.LedgerCore`, which inherits
it: the engine's queries for a terminal's open batch, a batch by id, the cut-off (the stale batches,
closing one) and settlement (the batches the cut-off closed and no settlement reconciled yet), the
lines of a batch upload, and the listings of batches with their totals and of a terminal's latest.
"""

from __future__ import annotations

from typing import Any

from gateway.adapters.ledger.db import Db, Dialect
from gateway.adapters.ledger.rows import batch_from_row, summary_from_row
from gateway.core.model import Batch, BatchSummary, UploadedLine, next_batch_no
from gateway.core.queries import CloseBatch, CurrentBatch, GetBatch, StaleBatches, UnreconciledBatches, UploadedLines

_BATCH_TOTALS = (
    "SELECT b.*,"
    " SUM(CASE WHEN t.status = 'approved' AND t.kind IN ('purchase', 'completion') THEN 1 ELSE 0 END) AS dc,"
    " SUM(CASE WHEN t.status = 'approved' AND t.kind IN ('purchase', 'completion') THEN t.effective_amount"
    "     ELSE 0 END) AS da,"
    " SUM(CASE WHEN t.status = 'approved' AND t.kind = 'refund' THEN 1 ELSE 0 END) AS cc,"
    " SUM(CASE WHEN t.status = 'approved' AND t.kind = 'refund' THEN t.effective_amount ELSE 0 END) AS ca,"
    " MAX(t.currency) AS currency"
    " FROM batches b LEFT JOIN txns t ON t.batch_id = b.id"
    " WHERE ($1 = '' OR b.merchant_id = $1) AND ($2 = '' OR b.terminal_id = $2) AND ($3 = 0 OR b.state = 'open')"
    " GROUP BY b.id ORDER BY b.id"
)


class BatchQueries:
    """The handlers of the batch queries and the batch listings, for :class:`LedgerCore`'s dialect."""

    dialect: Dialect

    def _batch(self, row: Any) -> Batch:
        closed = row["closed_at"]
        moment = self.dialect.moment
        return batch_from_row(row, moment(row["opened_at"]), moment(closed) if closed else None)

    async def _get_batch(self, db: Db, query: GetBatch) -> Batch | None:
        # for share: a settlement or the cut-off cannot close it under this transaction
        row = await db.fetchrow("SELECT * FROM batches WHERE id = $1" + self.dialect.lock("SHARE"), query.batch_id)
        return self._batch(row) if row is not None else None

    async def _current_batch(self, db: Db, query: CurrentBatch) -> Batch | None:
        """The terminal's open batch; opened race-free (one open batch per terminal: a unique index)."""
        select = "SELECT * FROM batches WHERE merchant_id = $1 AND terminal_id = $2 AND state = 'open'"
        select += self.dialect.lock("UPDATE" if query.exclusive else "SHARE")
        for _ in range(4):
            row = await db.fetchrow(select, query.merchant_id, query.terminal_id)
            if row is not None or not query.create:
                return self._batch(row) if row is not None else None
            last = await db.fetchrow(
                "SELECT batch_no FROM batches WHERE merchant_id = $1 AND terminal_id = $2 ORDER BY id DESC LIMIT 1",
                query.merchant_id, query.terminal_id,
            )  # fmt: skip
            number = next_batch_no(last[0] if last is not None else None)
            row = await db.fetchrow(
                "INSERT INTO batches (merchant_id, terminal_id, batch_no, state, opened_at) "
                "VALUES ($1, $2, $3, 'open', $4) ON CONFLICT (merchant_id, terminal_id) WHERE state = 'open' "
                "DO NOTHING RETURNING *",
                query.merchant_id, query.terminal_id, number, self.dialect.store(query.now),
            )  # fmt: skip
            if row is not None:
                return self._batch(row)
            # another instance opened it meanwhile: read it on the next turn
        raise RuntimeError("cannot open a batch: it is closed as fast as it is opened")

    async def _close_batch(self, db: Db, query: CloseBatch) -> bool:
        changed = await db.execute(
            "UPDATE batches SET state = 'closed', closed_at = $1, closed_by = 'cutoff' "
            "WHERE id = $2 AND state = 'open'",
            self.dialect.store(query.closed_at), query.batch_id,
        )  # fmt: skip
        return changed == 1

    async def _batches(self, db: Db, sql: str, *args: Any) -> list[Batch]:
        return [self._batch(row) for row in await db.fetch(sql + self.dialect.lock("UPDATE"), *args)]

    async def _stale_batches(self, db: Db, query: StaleBatches) -> list[Batch]:
        sql = "SELECT * FROM batches WHERE state = 'open' AND opened_at < $1 ORDER BY id"
        return await self._batches(db, sql, self.dialect.store(query.opened_before))

    async def _unreconciled_batches(self, db: Db, query: UnreconciledBatches) -> list[Batch]:
        sql = (
            "SELECT * FROM batches WHERE merchant_id = $1 AND terminal_id = $2 AND closed_by = 'cutoff' "
            "AND result IS NULL ORDER BY id"
        )
        return await self._batches(db, sql, query.merchant_id, query.terminal_id)

    async def _uploaded_lines(self, db: Db, query: UploadedLines) -> list[UploadedLine]:
        rows = await db.fetch(
            "SELECT stan, amount, pan_masked, pan_hmac FROM batch_uploads "
            "WHERE merchant_id = $1 AND terminal_id = $2 AND terminal_batch = $3 ORDER BY stan",
            query.merchant_id, query.terminal_id, query.terminal_batch,
        )  # fmt: skip
        return [UploadedLine(row[0], int(row[1]), row[2], row[3]) for row in rows]

    async def list_batches(self, db: Db, merchant: str | None, terminal: str | None, open_only: bool
                           ) -> list[BatchSummary]:  # fmt: skip
        rows = await db.fetch(_BATCH_TOTALS, merchant or "", terminal or "", int(open_only))
        return [summary_from_row(row, self._batch(row)) for row in rows]

    async def latest_batch(self, db: Db, merchant_id: str, terminal_id: str) -> Batch | None:
        row = await db.fetchrow(
            "SELECT * FROM batches WHERE merchant_id = $1 AND terminal_id = $2 ORDER BY id DESC LIMIT 1",
            merchant_id, terminal_id,
        )  # fmt: skip
        return self._batch(row) if row is not None else None
