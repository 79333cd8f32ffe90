-- Sources: where events come from. Each has a write key, of which only the SHA-256 is stored
-- (the key is shown once, when created or rotated). Times are Unix microseconds.
CREATE TABLE sources (
    source_id             TEXT    PRIMARY KEY,
    name                  TEXT    NOT NULL UNIQUE,
    key_hash              BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    -- The key's first characters, to tell keys apart in listings; far too few to use it.
    key_prefix            TEXT    NOT NULL,
    enabled               INTEGER NOT NULL DEFAULT 1,
    -- Events per second, per ingestion replica; NULL: no limit.
    rate_limit_per_second INTEGER CHECK (rate_limit_per_second > 0),
    plan_mode             TEXT    NOT NULL DEFAULT 'allow'
                                  CHECK (plan_mode IN ('allow', 'warn', 'block')),
    created_at            INTEGER NOT NULL,
    -- When the key was last replaced; NULL while it is the key of the creation.
    key_rotated_at        INTEGER
);
