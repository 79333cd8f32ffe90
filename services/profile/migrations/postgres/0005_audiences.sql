-- When a live profile's computed values next change without a new event (the oldest event a
-- windowed computed trait or audience condition counts leaves its window); the sweeper
-- re-evaluates profiles past it.
ALTER TABLE profiles ADD COLUMN valid_until timestamptz;
CREATE INDEX profiles_valid_until ON profiles (valid_until)
    WHERE valid_until IS NOT NULL AND merged_into IS NULL;

-- Who is in which audience now.
CREATE TABLE audience_members (
    audience   text NOT NULL,
    profile_id text NOT NULL,
    entered_at timestamptz NOT NULL,
    PRIMARY KEY (audience, profile_id)
);
CREATE INDEX audience_members_by_profile ON audience_members (profile_id);

-- Every entry into and exit from an audience, in order (`seq`): the audience events.
CREATE TABLE audience_changes (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    audience   text NOT NULL,
    profile_id text NOT NULL,
    change     text NOT NULL CHECK (change IN ('entered', 'exited')),
    at         timestamptz NOT NULL
);
CREATE INDEX audience_changes_by_profile ON audience_changes (profile_id);
