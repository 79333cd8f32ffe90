-- Pairs of profiles an unmerge split apart: resolution never merges their components again
-- (an event carrying identifiers of both sides drops its lowest-priority identifier, rule
-- `split`). Written by an unmerge; read on every resolution whose candidates' components hold
-- either side.
CREATE TABLE splits (
    profile_a  uuid NOT NULL REFERENCES profiles (profile_id),
    profile_b  uuid NOT NULL REFERENCES profiles (profile_id),
    reason     text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (profile_a, profile_b)
);

CREATE INDEX splits_by_b ON splits (profile_b);
