-- The event log: every acknowledged message, once per (source, message id).
CREATE TABLE events (
    seq          BIGSERIAL PRIMARY KEY,
    event_id     UUID        NOT NULL UNIQUE,
    source_id    TEXT        NOT NULL,
    message_id   TEXT        NOT NULL,
    partition    INTEGER     NOT NULL,
    -- The inserting transaction's id: delivery reads only rows of transactions older than every
    -- running one, so a row committed late behind a higher seq is never skipped.
    txid         XID8        NOT NULL DEFAULT pg_current_xact_id(),
    payload      JSONB       NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (source_id, message_id)
);

CREATE INDEX events_delivery_order ON events (partition, txid, seq);

-- One row per delivery partition: how far delivery got, and which dispatcher holds the lease.
CREATE TABLE delivery_partitions (
    partition    INTEGER     PRIMARY KEY,
    cursor_txid  XID8        NOT NULL DEFAULT '0',
    cursor_seq   BIGINT      NOT NULL DEFAULT 0,
    owner        TEXT,
    lease_until  TIMESTAMPTZ
);

-- Live dispatchers, so each takes a fair share of the partitions.
CREATE TABLE dispatchers (
    dispatcher_id TEXT PRIMARY KEY,
    heartbeat_at  TIMESTAMPTZ NOT NULL
);
