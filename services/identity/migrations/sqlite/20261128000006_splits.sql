-- Pairs of profiles an unmerge split apart: resolution never merges their components again
-- (an event carrying identifiers of both sides drops its lowest-priority identifier, rule
-- `split`). Written by an unmerge; read on every resolution whose candidates' components hold
-- either side.
CREATE TABLE splits (
    profile_a  TEXT NOT NULL REFERENCES profiles (profile_id),
    profile_b  TEXT NOT NULL REFERENCES profiles (profile_id),
    reason     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (profile_a, profile_b)
) STRICT;

CREATE INDEX splits_by_b ON splits (profile_b);
