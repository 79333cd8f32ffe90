-- The event log: every acknowledged message, once per (source, message id). Times are Unix
-- microseconds. SQLite has one writer at a time, so seq order is commit order.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL UNIQUE,
    source_id    TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    payload      TEXT    NOT NULL,
    received_at  INTEGER NOT NULL,
    UNIQUE (source_id, message_id)
);

CREATE INDEX events_delivery_order ON events (partition, seq);

CREATE TABLE delivery_partitions (
    partition    INTEGER PRIMARY KEY,
    cursor_seq   INTEGER NOT NULL DEFAULT 0,
    owner        TEXT,
    lease_until  INTEGER
);

CREATE TABLE dispatchers (
    dispatcher_id TEXT PRIMARY KEY,
    heartbeat_at  INTEGER NOT NULL
);
