-- Unified profiles. Tables live in the service's own schema (`profile`), set as search_path.

CREATE TABLE profiles (
    profile_id          text PRIMARY KEY,
    -- Set when the profile was merged into another; the row then only redirects.
    merged_into         text,
    -- {name: {value, observed_at, event_id}}: the latest value of each trait with its provenance.
    traits              jsonb NOT NULL DEFAULT '{}',
    event_count         bigint NOT NULL DEFAULT 0,
    first_seen          timestamptz,
    last_seen           timestamptz,
    -- log2 of the decayed activity sum (tessera_core::activity); NULL without events.
    activity_log2       double precision,
    -- {name: {name, value, computed_at, model_version, factors}}
    scores              jsonb NOT NULL DEFAULT '{}',
    merged_profile_ids  text[] NOT NULL DEFAULT '{}',
    -- Increases with every change; orders cache entries.
    version             bigint NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);

-- A merge redirects every profile that pointed at the merged one.
CREATE INDEX profiles_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;

CREATE TABLE profile_identifiers (
    type        text NOT NULL,
    value       text NOT NULL,
    profile_id  text NOT NULL,
    PRIMARY KEY (type, value)
);

CREATE INDEX profile_identifiers_profile ON profile_identifiers (profile_id);

-- One row per event ever applied: makes applying an event idempotent.
CREATE TABLE applied_events (
    event_id    text PRIMARY KEY,
    profile_id  text NOT NULL,
    applied_at  timestamptz NOT NULL
);
