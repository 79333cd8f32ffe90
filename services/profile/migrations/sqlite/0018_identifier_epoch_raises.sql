-- Raises of the identifier cache's epoch (`identifiers:epoch` in the cache) owed after a split
-- or a deletion moved identifiers, until the cache took one: recorded before the write,
-- `written_at` set once it ended (committed or not). While a row exists no replica trusts a
-- cached identifier lookup; every replica retries the raise and deletes the rows it covered.
-- A row whose writer never came back (a crash) is retried once it is old enough.
CREATE TABLE identifier_epoch_raises (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at TEXT NOT NULL,
    written_at  TEXT
);

-- The highest epoch a raise reached the cache with: a cached lookup tagged with a lower epoch
-- is never trusted. One row.
CREATE TABLE identifier_epoch_floor (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL
);
INSERT INTO identifier_epoch_floor (id, epoch) VALUES (1, 0);
