-- Unified profiles, SQLite edition (`tessera dev`): JSON as TEXT, times as RFC 3339 TEXT.

CREATE TABLE profiles (
    profile_id          TEXT PRIMARY KEY NOT NULL,
    merged_into         TEXT,
    traits              TEXT NOT NULL DEFAULT '{}',
    event_count         INTEGER NOT NULL DEFAULT 0,
    first_seen          TEXT,
    last_seen           TEXT,
    activity_log2       REAL,
    scores              TEXT NOT NULL DEFAULT '{}',
    -- A JSON array of profile ids.
    merged_profile_ids  TEXT NOT NULL DEFAULT '[]',
    version             INTEGER NOT NULL DEFAULT 0,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
) STRICT;

CREATE INDEX profiles_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE profile_identifiers (
    type        TEXT NOT NULL,
    value       TEXT NOT NULL,
    profile_id  TEXT NOT NULL,
    PRIMARY KEY (type, value)
) STRICT;

CREATE INDEX profile_identifiers_profile ON profile_identifiers (profile_id);

CREATE TABLE applied_events (
    event_id    TEXT PRIMARY KEY NOT NULL,
    profile_id  TEXT NOT NULL,
    applied_at  TEXT NOT NULL
) STRICT;
