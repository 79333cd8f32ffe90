-- Deleted profiles whose cache entry (`profile:{id}`) is owed a tombstone, written in the
-- deletion's transaction: while a row exists no replica trusts a cached copy of the profile
-- (the database answers), and every replica retries the tombstone and deletes the row once the
-- cache took it. So a deletion made while the cache is unreachable, or by a replica that
-- crashed before reaching it, is never served from a cache afterwards.
CREATE TABLE profile_cache_purges (
    profile_id  text PRIMARY KEY,
    recorded_at timestamptz NOT NULL
);
