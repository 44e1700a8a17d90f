-- Core tables: the intent log (idempotency key and replay source), batches,
-- entities (game state) and dead letters. Everything lives in its own schema
-- so an external database keeps its public schema to itself.
CREATE SCHEMA IF NOT EXISTS batchscheduler;

CREATE TABLE batchscheduler.batches (
    id                bigserial PRIMARY KEY,
    size              integer     NOT NULL CHECK (size > 0),
    cut_reason        text        NOT NULL CHECK (cut_reason IN ('time', 'size', 'drain')),
    first_received_at timestamptz NOT NULL,
    cut_at            timestamptz NOT NULL,
    -- clock_timestamp() as the batch's transaction writes it; the COMMIT
    -- follows in the same round trip.
    committed_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE batchscheduler.intent_log (
    id          bigserial   PRIMARY KEY,   -- apply order: batch order, then ring order
    client_id   text        NOT NULL,
    seq         bigint      NOT NULL,
    entity      text        NOT NULL,
    kind        text        NOT NULL,
    args        jsonb       NOT NULL,
    status      text        NOT NULL CHECK (status IN ('committed', 'dead_lettered')),
    code        text,
    reason      text,
    -- No foreign key to batches: it would add a per-row trigger check to
    -- every batch insert, and both rows are written by the same transaction.
    batch_id    bigint      NOT NULL,
    batch_ord   integer     NOT NULL,
    received_at timestamptz NOT NULL,
    CONSTRAINT intent_log_key UNIQUE (client_id, seq)
);
-- BRIN: batch ids grow with the heap, so this index is nearly free to keep.
CREATE INDEX intent_log_batch_brin ON batchscheduler.intent_log USING brin (batch_id);

CREATE TABLE batchscheduler.entities (
    id            text   PRIMARY KEY,
    state         jsonb  NOT NULL DEFAULT '{}'::jsonb,
    version       bigint NOT NULL DEFAULT 0,
    updated_batch bigint
);

CREATE TABLE batchscheduler.dead_letters (
    id          bigserial   PRIMARY KEY,
    client_id   text        NOT NULL,
    seq         bigint      NOT NULL,
    entity      text        NOT NULL,
    kind        text        NOT NULL,
    args        jsonb       NOT NULL,
    code        text        NOT NULL,
    reason      text        NOT NULL,
    batch_id    bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
