-- The graph log records unmerges as decisions of their own kind: `split`, with the profile
-- split off (`profile_id`), the profile it had been merged into (`other_profile_id`) and the
-- reason (`detail`). SQLite cannot alter a CHECK constraint: the table is rebuilt, keeping
-- every row and its sequence number.
CREATE TABLE graph_log_new (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT NOT NULL CHECK (kind IN ('create', 'link', 'merge', 'drop', 'split')),
    event_id         TEXT NOT NULL,
    profile_id       TEXT NOT NULL,
    other_profile_id TEXT,
    id_type          TEXT,
    id_value         TEXT,
    rule             TEXT NOT NULL,
    rules_version    INTEGER NOT NULL,
    event_time       INTEGER NOT NULL,
    decided_at       INTEGER NOT NULL,
    detail           TEXT
) STRICT;

INSERT INTO graph_log_new (seq, kind, event_id, profile_id, other_profile_id, id_type, id_value,
                           rule, rules_version, event_time, decided_at, detail)
SELECT seq, kind, event_id, profile_id, other_profile_id, id_type, id_value, rule,
       rules_version, event_time, decided_at, detail
FROM graph_log;

DROP TABLE graph_log;
ALTER TABLE graph_log_new RENAME TO graph_log;
CREATE INDEX graph_log_by_profile ON graph_log (profile_id, seq);
