-- Recomputing every profile from its events after the definitions that fold them changed
-- (computed traits, audiences' hidden counts, the trait catalog, the built-in derivations):
-- the fingerprint of the definitions the profiles were last folded with, and how far the
-- recompute has come (the last live profile id done; NULL when none is running). One row.
CREATE TABLE recompute_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    fingerprint TEXT NOT NULL,
    cursor      TEXT,
    started_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
