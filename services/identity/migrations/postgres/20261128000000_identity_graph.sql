-- The identity graph. Identifiers are never rewritten: a merged profile points at its survivor
-- through merged_into, and readers follow the chain to the canonical profile.

CREATE TABLE profiles (
    profile_id  uuid PRIMARY KEY,
    created_at  timestamptz NOT NULL,
    merged_into uuid REFERENCES profiles (profile_id),
    merged_at   timestamptz,
    CHECK ((merged_into IS NULL) = (merged_at IS NULL)),
    CHECK (merged_into <> profile_id)
);

CREATE TABLE identifiers (
    type       text NOT NULL,
    value      text NOT NULL,
    profile_id uuid NOT NULL REFERENCES profiles (profile_id),
    -- The event that first carried the identifier.
    event_id   text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (type, value)
);

-- Append-only. A profile is merged at most once: after that it is no longer canonical.
CREATE TABLE merges (
    seq                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    surviving_profile_id uuid NOT NULL REFERENCES profiles (profile_id),
    merged_profile_id    uuid NOT NULL UNIQUE REFERENCES profiles (profile_id),
    cause_event_id       text NOT NULL,
    merged_at            timestamptz NOT NULL
);

-- One row per resolved event, so resolving it again changes nothing and answers the same.
CREATE TABLE resolutions (
    event_id    text PRIMARY KEY,
    -- The event's profile when it was resolved; readers follow merged_into from it.
    profile_id  uuid NOT NULL REFERENCES profiles (profile_id),
    -- The merges the event caused, oldest merged profile first.
    merges      jsonb NOT NULL,
    resolved_at timestamptz NOT NULL
);
