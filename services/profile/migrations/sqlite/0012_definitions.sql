-- Computed traits and audiences declared through DefinitionService (beside those of config):
-- the definition in its config form as JSON, a version bumped on every update, and audit
-- times. Names are unique per kind.
CREATE TABLE definitions (
    kind       TEXT NOT NULL CHECK (kind IN ('computed_trait', 'audience')),
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);

-- The store-wide definitions revision, bumped in the transaction of every change to
-- `definitions`: the write path reads it to know its definitions are current. One row.
CREATE TABLE definitions_revision (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    revision   INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT INTO definitions_revision (id, revision, updated_at)
VALUES (1, 0, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
