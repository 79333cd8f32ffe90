-- Raises of the identifier cache's epoch (`identifiers:epoch` in the cache) owed after a split
-- or a deletion moved identifiers, until the cache took one: recorded before the write,
-- `written_at` set once it ended (committed or not). While a row exists no replica trusts a
-- cached identifier lookup; every replica retries the raise and deletes the rows it covered.
-- A row whose writer never came back (a crash) is retried once it is old enough.
CREATE TABLE identifier_epoch_raises (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at timestamptz NOT NULL,
    written_at  timestamptz
);

-- The highest epoch a raise reached the cache with: a cached lookup tagged with a lower epoch
-- (a near cache that has not heard of the raise yet, a cache restored from an old snapshot) is
-- never trusted. One row.
CREATE TABLE identifier_epoch_floor (
    id    integer PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL
);
INSERT INTO identifier_epoch_floor (id, epoch) VALUES (1, 0);
