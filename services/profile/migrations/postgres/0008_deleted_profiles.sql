-- Profiles deleted by a GDPR request (DeleteProfile): nothing else about them is kept. A batch
-- that still names one (an event resolved before the deletion, delivered after it) skips it, so
-- a deleted profile is never brought back.
CREATE TABLE deleted_profiles (
    profile_id text PRIMARY KEY,
    reason     text NOT NULL,
    deleted_at timestamptz NOT NULL
);
