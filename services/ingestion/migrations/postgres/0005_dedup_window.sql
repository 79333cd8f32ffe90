-- Deduplication over a window: the latest accepted event of each (source, message id). A message
-- whose id was last accepted longer ago than the dedup window is accepted again (the window is a
-- setting, applied when inserting); rows older than the window are pruned in the background.
-- Kept apart from the log so the log itself needs no unique key.
CREATE TABLE message_ids (
    source_id    TEXT        NOT NULL,
    message_id   TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source_id, message_id)
);

CREATE INDEX message_ids_by_age ON message_ids (received_at);

INSERT INTO message_ids (source_id, message_id, event_id, received_at)
SELECT source_id, message_id, event_id, received_at FROM events;

ALTER TABLE events DROP CONSTRAINT events_source_id_message_id_key;
