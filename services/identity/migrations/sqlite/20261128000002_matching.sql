-- Probabilistic matching: each canonical profile's person attributes (normalized, as the
-- matcher compares them) and blocking keys, the fitted models, the suggestions awaiting review,
-- and the merges to tell the profile service about.

ALTER TABLE graph_log ADD COLUMN detail TEXT;

CREATE TABLE match_attributes (
    profile_id TEXT PRIMARY KEY NOT NULL REFERENCES profiles (profile_id),
    attributes TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

CREATE TABLE match_keys (
    key        TEXT NOT NULL,
    profile_id TEXT NOT NULL REFERENCES profiles (profile_id),
    PRIMARY KEY (key, profile_id)
) STRICT, WITHOUT ROWID;

CREATE INDEX match_keys_by_profile ON match_keys (profile_id);

CREATE TABLE match_models (
    version    INTEGER PRIMARY KEY CHECK (version > 0),
    params     TEXT NOT NULL,
    report     TEXT NOT NULL,
    trained_at INTEGER NOT NULL
) STRICT;

CREATE TABLE match_suggestions (
    suggestion_id INTEGER PRIMARY KEY AUTOINCREMENT,
    profile_a     TEXT NOT NULL REFERENCES profiles (profile_id),
    profile_b     TEXT NOT NULL REFERENCES profiles (profile_id),
    explanation   TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('open', 'accepted', 'rejected')),
    created_at    INTEGER NOT NULL,
    decided_at    INTEGER,
    CHECK (profile_a < profile_b),
    UNIQUE (profile_a, profile_b)
) STRICT;

CREATE INDEX match_suggestions_by_status ON match_suggestions (status, suggestion_id);

CREATE TABLE merge_outbox (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    surviving_profile_id TEXT NOT NULL,
    merged_profile_id    TEXT NOT NULL,
    cause                TEXT NOT NULL,
    rule                 TEXT NOT NULL,
    merged_at            INTEGER NOT NULL,
    delivered_at         INTEGER
);

CREATE INDEX merge_outbox_pending ON merge_outbox (seq) WHERE delivered_at IS NULL;
