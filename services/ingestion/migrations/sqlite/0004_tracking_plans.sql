-- Tracking plans: per source, JSON Schemas its events are checked against (the plan document is
-- the JSON form of `plans::Plan`). `version` goes up by one on every put; every version is kept
-- in tracking_plan_versions for history. Times are Unix microseconds.
CREATE TABLE tracking_plans (
    source_id  TEXT    PRIMARY KEY REFERENCES sources (source_id) ON DELETE CASCADE,
    version    INTEGER NOT NULL CHECK (version > 0),
    plan       TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE tracking_plan_versions (
    source_id  TEXT    NOT NULL REFERENCES sources (source_id) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    plan       TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (source_id, version)
);

-- Messages a source's plan blocked (mode `block`), kept as received (a `tessera_core::Event`
-- before clock-skew correction) until they are replayed or deleted.
CREATE TABLE quarantine (
    quarantine_id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id     TEXT    NOT NULL REFERENCES sources (source_id) ON DELETE CASCADE,
    message_id    TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    -- [{"field": ..., "description": ...}], as reported to the client.
    violations    TEXT    NOT NULL,
    plan_version  INTEGER NOT NULL,
    received_at   INTEGER NOT NULL
);

CREATE INDEX quarantine_by_source ON quarantine (source_id, quarantine_id);
