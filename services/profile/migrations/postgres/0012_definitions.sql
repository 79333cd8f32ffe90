-- Computed traits and audiences declared through DefinitionService (beside those of config):
-- the definition in its config form as JSON, a version bumped on every update, and audit
-- times. Names are unique per kind.
CREATE TABLE definitions (
    kind       text NOT NULL CHECK (kind IN ('computed_trait', 'audience')),
    name       text NOT NULL,
    spec       text NOT NULL,
    version    bigint NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (kind, name)
);

-- The store-wide definitions revision, bumped in the transaction of every change to
-- `definitions`: replicas poll it (and the write path reads it) to know their definitions are
-- current. One row.
CREATE TABLE definitions_revision (
    id         integer PRIMARY KEY CHECK (id = 1),
    revision   bigint NOT NULL,
    updated_at timestamptz NOT NULL
);
INSERT INTO definitions_revision (id, revision, updated_at) VALUES (1, 0, now());
