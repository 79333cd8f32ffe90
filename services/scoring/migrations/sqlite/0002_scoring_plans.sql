-- Scoring plans declared through the API (see the Postgres migration). Times are unix
-- microseconds.

CREATE TABLE scoring_plans (
    name       TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL UNIQUE,
    version    INTEGER NOT NULL CHECK (version >= 1),
    plan       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE scoring_plans_revision (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);

INSERT INTO scoring_plans_revision (id, revision) VALUES (1, 0);
