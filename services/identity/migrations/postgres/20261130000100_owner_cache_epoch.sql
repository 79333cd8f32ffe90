-- The generation of the Redis cache of identifier owners (see services/identity/README.md,
-- "Owner cache"). Cache keys carry it; a writer that changes owners it cannot evict one by one
-- (a rewrite, a forget, a replay) or that could not reach Redis adds one, which retires every
-- entry at once. One row. It starts at a random point of the bigint range, so a database created
-- again (or another one sharing the Redis and the key prefix, as tests do) never meets the
-- entries of another. After restoring a backup, set it to a new random value
-- (docs/operations.md): entries written since the backup was taken carry epochs the restored
-- value would count up to.
CREATE TABLE owner_cache_epoch (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    epoch bigint NOT NULL
);
INSERT INTO owner_cache_epoch (one, epoch)
    VALUES (true, (random() * 4e18)::bigint);
