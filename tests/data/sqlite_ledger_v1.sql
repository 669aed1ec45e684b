-- The SQLite ledger as the first gateways created it (schema version 1, wave 1), kept to test upgrades.
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    batch_no TEXT NOT NULL,
    state TEXT NOT NULL,
    opened_at INTEGER NOT NULL,
    closed_at INTEGER,
    result TEXT,
    terminal_totals TEXT,
    ledger_totals TEXT
);
CREATE UNIQUE INDEX batches_one_open ON batches(merchant_id, terminal_id) WHERE state = 'open';
CREATE INDEX batches_terminal ON batches(merchant_id, terminal_id, id);
CREATE TABLE txns (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    mti TEXT NOT NULL,
    mti_class TEXT NOT NULL,
    processing_code TEXT NOT NULL,
    merchant_id TEXT NOT NULL,
    terminal_id TEXT NOT NULL,
    stan TEXT NOT NULL,
    transmission_time TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL,
    pan_masked TEXT,
    pan_hmac TEXT,
    rrn TEXT UNIQUE,
    approval_code TEXT,
    response_code TEXT NOT NULL,
    reason TEXT,
    status TEXT NOT NULL,
    effective_amount INTEGER NOT NULL,
    refunded_amount INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    original_id INTEGER REFERENCES txns(id),
    batch_id INTEGER REFERENCES batches(id),
    created_at INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    ref_rrn TEXT,
    ref_mti TEXT,
    ref_stan TEXT,
    ref_time TEXT,
    ref_approval TEXT,
    ref_same_stan INTEGER NOT NULL DEFAULT 0,
    reversed_after_settlement INTEGER NOT NULL DEFAULT 0,
    CHECK (amount >= 0 AND effective_amount >= 0 AND refunded_amount >= 0)
);
CREATE INDEX txns_key ON txns(merchant_id, stan, transmission_time, mti_class, terminal_id);
CREATE INDEX txns_batch ON txns(batch_id);
CREATE INDEX txns_approval ON txns(merchant_id, approval_code) WHERE kind = 'preauth';
CREATE INDEX txns_refunds_day ON txns(merchant_id, created_at) WHERE kind = 'refund';
CREATE INDEX txns_tombstones ON txns(merchant_id, terminal_id, status) WHERE status = 'unmatched';
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    ordering_key TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    sent_at INTEGER
);
CREATE INDEX outbox_pending ON outbox(id) WHERE sent_at IS NULL;
CREATE INDEX outbox_sent ON outbox(sent_at) WHERE sent_at IS NOT NULL;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta(key, value) VALUES ('rrn_next', '1');
