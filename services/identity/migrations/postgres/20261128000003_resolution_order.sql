-- The order events were resolved in, so a component of the graph can be replayed (unmerge) in
-- the same order. SQLite uses its rowid.
ALTER TABLE resolutions ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;
CREATE UNIQUE INDEX resolutions_by_seq ON resolutions (seq);
CREATE INDEX resolutions_by_profile ON resolutions (profile_id);
