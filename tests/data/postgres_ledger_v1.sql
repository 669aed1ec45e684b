-- The PostgreSQL ledger as the first gateways created it (schema version 1, wave 1), kept to test upgrades.
CREATE TABLE batches (
    id bigserial PRIMARY KEY,
    merchant_id text NOT NULL,
    terminal_id text NOT NULL,
    batch_no text NOT NULL,
    state text NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at timestamptz NOT NULL,
    closed_at timestamptz,
    result text,
    terminal_totals text,
    ledger_totals text
);
CREATE UNIQUE INDEX batches_one_open ON batches (merchant_id, terminal_id) WHERE state = 'open';
CREATE INDEX batches_terminal ON batches (merchant_id, terminal_id, id);
CREATE INDEX batches_open_since ON batches (opened_at) WHERE state = 'open';
CREATE TABLE txns (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    mti text NOT NULL,
    mti_class text NOT NULL,
    processing_code text NOT NULL,
    merchant_id text NOT NULL,
    terminal_id text NOT NULL,
    stan text NOT NULL,
    transmission_time text NOT NULL,
    amount bigint NOT NULL,
    currency text NOT NULL,
    pan_masked text CHECK (pan_masked IS NULL OR strpos(pan_masked, '*') > 0),
    pan_hmac text,
    rrn text UNIQUE,
    approval_code text,
    response_code text NOT NULL,
    reason text,
    status text NOT NULL,
    effective_amount bigint NOT NULL,
    refunded_amount bigint NOT NULL DEFAULT 0,
    completed boolean NOT NULL DEFAULT false,
    original_id bigint REFERENCES txns (id),
    batch_id bigint REFERENCES batches (id),
    created_at timestamptz NOT NULL,
    fingerprint text NOT NULL,
    ref_rrn text,
    ref_mti text,
    ref_stan text,
    ref_time text,
    ref_approval text,
    ref_same_stan boolean NOT NULL DEFAULT false,
    reversed_after_settlement boolean NOT NULL DEFAULT false,
    CHECK (amount >= 0 AND effective_amount >= 0 AND refunded_amount >= 0)
);
CREATE INDEX txns_key ON txns (merchant_id, terminal_id, stan, transmission_time, mti_class);
CREATE INDEX txns_original_data ON txns (merchant_id, stan, transmission_time, mti_class);
CREATE INDEX txns_approval ON txns (merchant_id, approval_code) WHERE approval_code IS NOT NULL;
CREATE INDEX txns_batch ON txns (batch_id);
CREATE INDEX txns_refunds_terminal ON txns (merchant_id, terminal_id, created_at) WHERE kind = 'refund';
CREATE INDEX txns_refunds_card ON txns (merchant_id, pan_hmac, created_at) WHERE kind = 'refund';
CREATE INDEX txns_tombstones ON txns (merchant_id, terminal_id) WHERE status = 'unmatched';
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    topic text NOT NULL,
    payload bytea NOT NULL,
    ordering_key text NOT NULL,
    created_at timestamptz NOT NULL,
    sent_at timestamptz
);
CREATE INDEX outbox_pending ON outbox (id) WHERE sent_at IS NULL;
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
CREATE TABLE relay_state (
    id integer PRIMARY KEY CHECK (id = 1),
    last_error text,
    last_error_at timestamptz,
    last_sent_at timestamptz
);
INSERT INTO relay_state (id) VALUES (1);
CREATE SEQUENCE rrn_blocks AS bigint MINVALUE 1 MAXVALUE 999999999 CYCLE;
