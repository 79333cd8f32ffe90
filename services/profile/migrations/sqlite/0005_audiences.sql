-- When a live profile's computed values next change without a new event; the sweeper
-- re-evaluates profiles past it.
ALTER TABLE profiles ADD COLUMN valid_until TEXT;
CREATE INDEX profiles_valid_until ON profiles (valid_until)
    WHERE valid_until IS NOT NULL AND merged_into IS NULL;

-- Who is in which audience now.
CREATE TABLE audience_members (
    audience   TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    entered_at TEXT NOT NULL,
    PRIMARY KEY (audience, profile_id)
);
CREATE INDEX audience_members_by_profile ON audience_members (profile_id);

-- Every entry into and exit from an audience, in order (`seq`): the audience events.
CREATE TABLE audience_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    audience   TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    change     TEXT NOT NULL CHECK (change IN ('entered', 'exited')),
    at         TEXT NOT NULL
);
CREATE INDEX audience_changes_by_profile ON audience_changes (profile_id);
