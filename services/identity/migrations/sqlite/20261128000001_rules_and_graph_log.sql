-- Identity rules: when each identifier was linked (event time, for windowed limits), which
-- profiles an identifier was seen with (for the shared rule), the versions of the rules, and the
-- append-only graph log of every decision with its cause. `identifiers`, `profiles.merged_into`
-- and `merges` are the current membership derived from that log, kept in the same transaction.

ALTER TABLE identifiers ADD COLUMN linked_at INTEGER NOT NULL DEFAULT 0;
UPDATE identifiers SET linked_at = created_at;

CREATE INDEX identifiers_by_profile ON identifiers (profile_id);
CREATE INDEX profiles_by_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;

ALTER TABLE merges ADD COLUMN rule TEXT NOT NULL DEFAULT 'seen_together';

-- JSON: what the event linked and what it did not; NULL for events resolved before rules.
ALTER TABLE resolutions ADD COLUMN detail TEXT;

CREATE TABLE sightings (
    type       TEXT NOT NULL,
    value      TEXT NOT NULL,
    profile_id TEXT NOT NULL REFERENCES profiles (profile_id),
    event_id   TEXT NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (type, value, profile_id)
) STRICT, WITHOUT ROWID;

CREATE TABLE rules_versions (
    version    INTEGER PRIMARY KEY CHECK (version > 0),
    rules      TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE graph_log (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT NOT NULL CHECK (kind IN ('create', 'link', 'merge', 'drop')),
    event_id         TEXT NOT NULL,
    profile_id       TEXT NOT NULL,
    other_profile_id TEXT,
    id_type          TEXT,
    id_value         TEXT,
    rule             TEXT NOT NULL,
    rules_version    INTEGER NOT NULL,
    event_time       INTEGER NOT NULL,
    decided_at       INTEGER NOT NULL
) STRICT;

CREATE INDEX graph_log_by_profile ON graph_log (profile_id, seq);

INSERT INTO graph_log (kind, event_id, profile_id, rule, rules_version, event_time, decided_at)
SELECT 'create',
       COALESCE((SELECT i.event_id FROM identifiers i WHERE i.profile_id = p.profile_id
                 ORDER BY i.created_at LIMIT 1), ''),
       p.profile_id, 'seen_together', 0, p.created_at, p.created_at
FROM profiles p ORDER BY p.created_at;
INSERT INTO graph_log (kind, event_id, profile_id, id_type, id_value, rule, rules_version,
                       event_time, decided_at)
SELECT 'link', event_id, profile_id, type, value, 'seen_together', 0, created_at, created_at
FROM identifiers ORDER BY created_at;
INSERT INTO graph_log (kind, event_id, profile_id, other_profile_id, rule, rules_version,
                       event_time, decided_at)
SELECT 'merge', cause_event_id, merged_profile_id, surviving_profile_id, rule, 0, merged_at,
       merged_at
FROM merges ORDER BY seq;
