-- Every change of a profile, in the order it can be read in: the change stream. `xid` is the
-- writing transaction: a reader only reads rows of transactions older than every transaction
-- still running (`pg_snapshot_xmin`), and orders by (xid, seq), so a row committed late never
-- lands before a position a reader already passed.
CREATE TABLE profile_changes (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    profile_id text NOT NULL,
    kind       text NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}',
    at         timestamptz NOT NULL
);
CREATE INDEX profile_changes_order ON profile_changes (xid, seq);

-- Audience entries and exits are changes of the stream.
INSERT INTO profile_changes (profile_id, kind, detail, at)
SELECT profile_id, 'audience_' || change, jsonb_build_object('audience', audience), at
  FROM audience_changes ORDER BY seq;
DROP TABLE audience_changes;
