-- Every change of a profile, in commit order (one writer at a time): the change stream.
CREATE TABLE profile_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    profile_id TEXT NOT NULL,
    kind       TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '{}',
    at         TEXT NOT NULL
);

INSERT INTO profile_changes (profile_id, kind, detail, at)
SELECT profile_id, 'audience_' || change, json_object('audience', audience), at
  FROM audience_changes ORDER BY seq;
DROP TABLE audience_changes;
