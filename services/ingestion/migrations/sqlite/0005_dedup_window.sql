-- Deduplication over a window: the latest accepted event of each (source, message id). A message
-- whose id was last accepted longer ago than the dedup window is accepted again (the window is a
-- setting, applied when inserting); rows older than the window are pruned in the background.
-- Kept apart from the log so the log itself needs no unique key. Times are Unix microseconds.
CREATE TABLE message_ids (
    source_id    TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    received_at  INTEGER NOT NULL,
    PRIMARY KEY (source_id, message_id)
) WITHOUT ROWID;

CREATE INDEX message_ids_by_age ON message_ids (received_at);

INSERT INTO message_ids (source_id, message_id, event_id, received_at)
SELECT source_id, message_id, event_id, received_at FROM events;

-- SQLite cannot drop a table constraint: rebuild the log without UNIQUE (source_id, message_id).
CREATE TABLE events_rebuilt (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL UNIQUE,
    source_id    TEXT    NOT NULL,
    message_id   TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    payload      TEXT    NOT NULL,
    received_at  INTEGER NOT NULL
);

INSERT INTO events_rebuilt (seq, event_id, source_id, message_id, partition, payload, received_at)
SELECT seq, event_id, source_id, message_id, partition, payload, received_at FROM events;

-- Keep the log's sequence where it was, so no seq is ever handed out twice.
UPDATE sqlite_sequence SET seq = (SELECT seq FROM sqlite_sequence WHERE name = 'events')
WHERE name = 'events_rebuilt';

DROP TABLE events;
ALTER TABLE events_rebuilt RENAME TO events;

CREATE INDEX events_delivery_order ON events (partition, seq);
CREATE INDEX events_by_source ON events (source_id, seq);
