-- Identity rules: when each identifier was linked (event time, for windowed limits), which
-- profiles an identifier was seen with (for the shared rule), the versions of the rules, and the
-- append-only graph log of every decision with its cause. `identifiers`, `profiles.merged_into`
-- and `merges` are the current membership derived from that log, kept in the same transaction.

ALTER TABLE identifiers ADD COLUMN linked_at timestamptz;
UPDATE identifiers SET linked_at = created_at;
ALTER TABLE identifiers ALTER COLUMN linked_at SET NOT NULL;

-- A canonical profile's identifiers are those of every profile merged into it.
CREATE INDEX identifiers_by_profile ON identifiers (profile_id);
CREATE INDEX profiles_by_merged_into ON profiles (merged_into) WHERE merged_into IS NOT NULL;

ALTER TABLE merges ADD COLUMN rule text NOT NULL DEFAULT 'seen_together';

-- {"identifiers": [[type, value], ...], "dropped": [{"type", "value", "reason"}, ...]}: what the
-- event linked and what it did not; NULL for events resolved before rules existed.
ALTER TABLE resolutions ADD COLUMN detail jsonb;

-- An identifier seen in an event of a profile other than the one holding it.
CREATE TABLE sightings (
    type       text NOT NULL,
    value      text NOT NULL,
    profile_id uuid NOT NULL REFERENCES profiles (profile_id),
    event_id   text NOT NULL,
    seen_at    timestamptz NOT NULL,
    PRIMARY KEY (type, value, profile_id)
);

-- Every version of the rules the service ran with; version 0 stands for "before versioning".
CREATE TABLE rules_versions (
    version    bigint PRIMARY KEY CHECK (version > 0),
    rules      jsonb NOT NULL,
    created_at timestamptz NOT NULL
);

-- Append-only: every decision, in order, with the event that caused it and the rule.
CREATE TABLE graph_log (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('create', 'link', 'merge', 'drop')),
    event_id         text NOT NULL,
    profile_id       uuid NOT NULL,
    other_profile_id uuid,
    id_type          text,
    id_value         text,
    rule             text NOT NULL,
    rules_version    bigint NOT NULL,
    event_time       timestamptz NOT NULL,
    decided_at       timestamptz NOT NULL
);

CREATE INDEX graph_log_by_profile ON graph_log (profile_id, seq);
CREATE INDEX graph_log_by_other_profile ON graph_log (other_profile_id, seq)
    WHERE other_profile_id IS NOT NULL;

-- The log of the graph as it stands, for graphs built before the log existed.
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
