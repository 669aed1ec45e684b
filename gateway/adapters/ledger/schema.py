"""The ledger's tables, written once for SQLite and PostgreSQL (their type names filled in).

A new ledger is created at :data:`VERSION`. Ledgers made by earlier releases are brought up to it by
the upgrade steps of their database (each database counted its versions its own way before they were
written once: SQLite with ``PRAGMA user_version``, PostgreSQL in a ``schema_version`` table).
"""

from __future__ import annotations

from dataclasses import dataclass

#: the schema version a new ledger is created at, on either database
VERSION = 7


@dataclass(frozen=True, slots=True)
class Types:
    """How each database spells the types the schema uses."""

    key: str  #: an auto-numbered primary key
    time: str  #: a moment (SQLite: microseconds since the epoch; PostgreSQL: timestamptz)
    integer: str
    flag: str  #: a boolean
    false: str
    blob: str


SQLITE = Types("INTEGER PRIMARY KEY", "INTEGER", "INTEGER", "INTEGER", "0", "BLOB")
POSTGRES = Types("bigserial PRIMARY KEY", "timestamptz", "bigint", "boolean", "false", "bytea")

_SCHEMA = """
CREATE TABLE batches (
    id {key},
    merchant_id text NOT NULL,
    terminal_id text NOT NULL,
    batch_no text NOT NULL,
    state text NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at {time} NOT NULL,
    closed_at {time},
    closed_by text CHECK (closed_by IN ('settlement', 'cutoff')),
    result text,
    terminal_totals text,
    ledger_totals text
);
CREATE UNIQUE INDEX batches_one_open ON batches (merchant_id, terminal_id) WHERE state = 'open';
CREATE INDEX batches_terminal ON batches (merchant_id, terminal_id, id);
CREATE INDEX batches_open_since ON batches (opened_at) WHERE state = 'open';
CREATE INDEX batches_unreconciled ON batches (merchant_id, terminal_id, id)
    WHERE closed_by = 'cutoff' AND result IS NULL;
CREATE TABLE txns (
    id {key},
    kind text NOT NULL,
    mti text NOT NULL,
    mti_class text NOT NULL,
    processing_code text NOT NULL,
    merchant_id text NOT NULL,
    terminal_id text NOT NULL,
    stan text NOT NULL,
    transmission_time text NOT NULL,
    amount {integer} NOT NULL,
    currency text NOT NULL,
    pan_masked text CHECK (pan_masked IS NULL OR pan_masked LIKE '%*%'),
    pan_hmac text,
    rrn text UNIQUE,
    approval_code text,
    response_code text NOT NULL,
    reason text,
    status text NOT NULL,
    effective_amount {integer} NOT NULL,
    refunded_amount {integer} NOT NULL DEFAULT 0,
    completed {flag} NOT NULL DEFAULT {false},
    original_id {integer} REFERENCES txns (id),
    batch_id {integer} REFERENCES batches (id),
    created_at {time} NOT NULL,
    fingerprint text NOT NULL,
    ref_rrn text,
    ref_mti text,
    ref_stan text,
    ref_time text,
    ref_approval text,
    ref_same_stan {flag} NOT NULL DEFAULT {false},
    reversed_after_settlement {flag} NOT NULL DEFAULT {false},
    answered {flag} NOT NULL DEFAULT {false},
    CHECK (amount >= 0 AND effective_amount >= 0 AND refunded_amount >= 0)
);
CREATE INDEX txns_key ON txns (merchant_id, stan, mti_class, terminal_id, transmission_time);
CREATE INDEX txns_batch ON txns (batch_id);
CREATE INDEX txns_corrections ON txns (original_id) WHERE original_id IS NOT NULL;
CREATE INDEX txns_approval ON txns (merchant_id, approval_code) WHERE kind = 'preauth';
CREATE INDEX txns_refunds_terminal ON txns (merchant_id, terminal_id, created_at) WHERE kind = 'refund';
CREATE INDEX txns_refunds_card ON txns (merchant_id, pan_hmac, created_at) WHERE kind = 'refund';
CREATE INDEX txns_tombstones ON txns (merchant_id, terminal_id) WHERE status = 'unmatched';
CREATE TABLE outbox (
    id {key},
    event_id text NOT NULL UNIQUE,
    topic text NOT NULL,
    payload {blob} NOT NULL,
    ordering_key text NOT NULL,
    created_at {time} NOT NULL,
    sent_at {time}
);
CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
CREATE TABLE exceptions (
    id {key},
    kind text NOT NULL,
    merchant_id text NOT NULL,
    terminal_id text NOT NULL,
    original_rrn text,
    summary text NOT NULL,
    details text NOT NULL,
    created_at {time} NOT NULL,
    resolved_at {time},
    resolved_by text,
    resolution text
);
CREATE INDEX exceptions_open ON exceptions (id) WHERE resolved_at IS NULL;
CREATE TABLE meta (key text PRIMARY KEY, value text);
"""

#: the acquirer host's store-and-forward queue (version 6): reversals of what the host may have approved,
#: advices of what the gateway approved in its place; sent in id order, one at a time
_SAF = """
CREATE TABLE saf (
    id {key},
    txn_id {integer} NOT NULL REFERENCES txns (id),
    action text NOT NULL CHECK (action IN ('reverse', 'advise')),
    amount {integer},
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'acknowledged', 'failed')),
    created_at {time} NOT NULL,
    attempts {integer} NOT NULL DEFAULT 0,
    last_attempt_at {time},
    finished_at {time},
    response_code text,
    last_error text
);
CREATE INDEX saf_queued ON saf (id) WHERE state = 'queued';
CREATE INDEX txns_pending ON txns (id) WHERE status = 'pending'
"""


#: version 7: the batch number the terminal gave (UnionPay DE60.2) on its records, and the lines of batch
#: uploads (UnionPay 0320 after a settlement that did not balance), compared with the ledger at batch end
_TERMINAL_BATCHES = """
ALTER TABLE txns ADD COLUMN terminal_batch text;
CREATE INDEX txns_terminal_batch ON txns (merchant_id, terminal_id, terminal_batch) WHERE terminal_batch IS NOT NULL;
CREATE TABLE batch_uploads (
    id {key},
    merchant_id text NOT NULL,
    terminal_id text NOT NULL,
    terminal_batch text NOT NULL,
    stan text NOT NULL,
    amount {integer} NOT NULL,
    pan_masked text CHECK (pan_masked IS NULL OR pan_masked LIKE '%*%'),
    pan_hmac text,
    created_at {time} NOT NULL,
    CHECK (amount >= 0)
);
CREATE UNIQUE INDEX batch_uploads_line ON batch_uploads (merchant_id, terminal_id, terminal_batch, stan)
"""


def _statements(template: str, types: Types) -> list[str]:
    script = template.format(**{name: getattr(types, name) for name in Types.__slots__})
    return [statement.strip() for statement in script.split(";") if statement.strip()]


def schema(types: Types) -> list[str]:
    """The statements creating an empty ledger at :data:`VERSION`."""
    return _statements(_SCHEMA + ";" + _SAF + ";" + _TERMINAL_BATCHES, types)


def saf_tables(types: Types) -> str:
    """Version 5 -> 6 on either database: the store-and-forward queue."""
    return ";\n".join(_statements(_SAF, types))


def terminal_batches(types: Types) -> str:
    """Version 6 -> 7 on either database: terminal batch numbers and batch uploads."""
    return ";\n".join(_statements(_TERMINAL_BATCHES, types))


#: SQLite ledgers of earlier releases (``PRAGMA user_version``) -> the steps to the next version
SQLITE_UPGRADES: dict[int, str] = {
    1: """
    CREATE INDEX txns_refunds_terminal ON txns(merchant_id, terminal_id, created_at) WHERE kind = 'refund';
    CREATE INDEX txns_refunds_card ON txns(merchant_id, pan_hmac, created_at) WHERE kind = 'refund';
    DROP INDEX txns_refunds_day
    """,
    2: """
    DROP INDEX txns_key;
    CREATE INDEX txns_key ON txns(merchant_id, stan, mti_class, terminal_id, transmission_time);
    CREATE INDEX txns_corrections ON txns(original_id) WHERE original_id IS NOT NULL;
    ALTER TABLE batches ADD COLUMN closed_by TEXT;
    UPDATE batches SET closed_by = 'cutoff', result = NULL WHERE result = 'cutoff';
    UPDATE batches SET closed_by = 'settlement' WHERE result IN ('settled', 'mismatch');
    CREATE INDEX batches_open_since ON batches(opened_at) WHERE state = 'open';
    CREATE INDEX batches_unreconciled ON batches(merchant_id, terminal_id, id)
        WHERE closed_by = 'cutoff' AND result IS NULL;
    CREATE TABLE exceptions (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, merchant_id TEXT NOT NULL,
        terminal_id TEXT NOT NULL, original_rrn TEXT, summary TEXT NOT NULL, details TEXT NOT NULL,
        created_at INTEGER NOT NULL, resolved_at INTEGER, resolved_by TEXT, resolution TEXT);
    CREATE INDEX exceptions_open ON exceptions(id) WHERE resolved_at IS NULL
    """,
    3: """
    ALTER TABLE txns ADD COLUMN answered INTEGER NOT NULL DEFAULT 0;
    UPDATE txns SET answered = 1
    """,
    4: "SELECT 1",  # version 4 is version 5: the versions are counted alike from here on
    5: saf_tables(SQLITE),
    6: terminal_batches(SQLITE),
}

#: PostgreSQL ledgers of earlier releases (``schema_version``) -> the steps to the next version
POSTGRES_UPGRADES: dict[int, str] = {
    1: """
    DROP INDEX txns_key;
    DROP INDEX txns_original_data;
    CREATE INDEX txns_key ON txns (merchant_id, stan, mti_class, terminal_id, transmission_time);
    CREATE INDEX txns_corrections ON txns (original_id) WHERE original_id IS NOT NULL;
    ALTER TABLE batches ADD COLUMN closed_by text CHECK (closed_by IN ('settlement', 'cutoff'));
    UPDATE batches SET closed_by = 'cutoff', result = NULL WHERE result = 'cutoff';
    UPDATE batches SET closed_by = 'settlement' WHERE result IN ('settled', 'mismatch');
    CREATE INDEX batches_unreconciled ON batches (merchant_id, terminal_id, id)
        WHERE closed_by = 'cutoff' AND result IS NULL;
    CREATE TABLE exceptions (id bigserial PRIMARY KEY, kind text NOT NULL, merchant_id text NOT NULL,
        terminal_id text NOT NULL, original_rrn text, summary text NOT NULL, details text NOT NULL,
        created_at timestamptz NOT NULL, resolved_at timestamptz, resolved_by text, resolution text);
    CREATE INDEX exceptions_open ON exceptions (id) WHERE resolved_at IS NULL
    """,
    2: """
    ALTER TABLE txns ADD COLUMN answered boolean NOT NULL DEFAULT false;
    UPDATE txns SET answered = true
    """,
    3: """
    CREATE TABLE meta (key text PRIMARY KEY, value text);
    INSERT INTO meta (key, value)
        SELECT key, value FROM relay_state, LATERAL (VALUES ('last_error', last_error),
            ('last_error_at', to_json(last_error_at) #>> '{}'), ('last_sent_at', to_json(last_sent_at) #>> '{}'))
            AS moved (key, value)
        WHERE value IS NOT NULL;
    DROP TABLE relay_state
    """,
    4: """
    DROP INDEX txns_approval;
    CREATE INDEX txns_approval ON txns (merchant_id, approval_code) WHERE kind = 'preauth'
    """,
    5: saf_tables(POSTGRES),
    6: terminal_batches(POSTGRES),
}
