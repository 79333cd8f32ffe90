-- The identity graph. Identifiers are never rewritten: a merged profile points at its survivor
-- through merged_into, and readers follow the chain to the canonical profile.
-- Ids are TEXT (hyphenated lower-case UUIDs); times are INTEGER microseconds since the Unix
-- epoch, UTC; JSON is TEXT.

CREATE TABLE profiles (
    profile_id  TEXT PRIMARY KEY NOT NULL,
    created_at  INTEGER NOT NULL,
    merged_into TEXT REFERENCES profiles (profile_id),
    merged_at   INTEGER,
    CHECK ((merged_into IS NULL) = (merged_at IS NULL)),
    CHECK (merged_into <> profile_id)
) STRICT;

CREATE TABLE identifiers (
    type       TEXT NOT NULL,
    value      TEXT NOT NULL,
    profile_id TEXT NOT NULL REFERENCES profiles (profile_id),
    -- The event that first carried the identifier.
    event_id   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (type, value)
) STRICT, WITHOUT ROWID;

-- Append-only. A profile is merged at most once: after that it is no longer canonical.
CREATE TABLE merges (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    surviving_profile_id TEXT NOT NULL REFERENCES profiles (profile_id),
    merged_profile_id    TEXT NOT NULL UNIQUE REFERENCES profiles (profile_id),
    cause_event_id       TEXT NOT NULL,
    merged_at            INTEGER NOT NULL
) STRICT;

-- One row per resolved event, so resolving it again changes nothing and answers the same.
CREATE TABLE resolutions (
    event_id    TEXT PRIMARY KEY NOT NULL,
    -- The event's profile when it was resolved; readers follow merged_into from it.
    profile_id  TEXT NOT NULL REFERENCES profiles (profile_id),
    -- The merges the event caused (a JSON array), oldest merged profile first.
    merges      TEXT NOT NULL,
    resolved_at INTEGER NOT NULL
) STRICT;
