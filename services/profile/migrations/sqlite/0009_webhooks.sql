-- Webhook destinations of the change stream (`[[profile.webhooks]]`), one row per configured
-- webhook: its position in the change stream (SQLite writes one transaction at a time, so the
-- cursor is a sequence number alone), which replica delivers it (a lease), and the retry state
-- of the changes at its head. Times are unix microseconds.
CREATE TABLE webhooks (
    name            TEXT PRIMARY KEY,
    cursor_seq      INTEGER NOT NULL,
    owner           TEXT,
    lease_until     INTEGER,
    head_seq        INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    first_failed_at INTEGER,
    next_attempt_at INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL
);

-- Changes a webhook could not deliver, until replayed or pruned (see the Postgres migration).
CREATE TABLE webhook_dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook         TEXT NOT NULL,
    cursor          TEXT NOT NULL,
    profile_id      TEXT NOT NULL,
    kind            TEXT NOT NULL,
    changed_at      INTEGER NOT NULL,
    payload         TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    last_error      TEXT NOT NULL,
    dead_at         INTEGER NOT NULL,
    replay_at       INTEGER,
    replay_attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER
);
CREATE INDEX webhook_dead_letters_by_webhook ON webhook_dead_letters (webhook, id);
CREATE INDEX webhook_dead_letters_replays ON webhook_dead_letters (webhook, next_attempt_at)
    WHERE replay_at IS NOT NULL;
CREATE INDEX webhook_dead_letters_by_profile ON webhook_dead_letters (profile_id);
