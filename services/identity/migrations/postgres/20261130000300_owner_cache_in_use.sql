-- Until when entries of the owner cache may be alive (services/identity/README.md, "Owner
-- cache"). A replica with the cache keeps it at least one entry TTL (plus a margin) ahead of
-- its fills; a replica without the cache (no REDIS_URL, or a TTL of 0) that merges profiles
-- while it is in the future cannot delete the merged profiles' entries, so it advances the
-- epoch instead, retiring them all. A stale owner could otherwise send a later run of a cached
-- replica to a merged profile until the entry expired.
ALTER TABLE owner_cache_epoch ADD COLUMN cached_until timestamptz NOT NULL DEFAULT '-infinity';
