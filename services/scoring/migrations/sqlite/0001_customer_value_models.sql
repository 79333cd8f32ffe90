-- The scoring service's fitted customer-value models (see the Postgres migration). Times are
-- unix microseconds.

CREATE TABLE customer_value_models (
    version          INTEGER PRIMARY KEY AUTOINCREMENT,
    fitted_at        INTEGER NOT NULL,
    as_of            INTEGER NOT NULL,
    trigger          TEXT NOT NULL CHECK (trigger IN ('api', 'schedule')),
    population       INTEGER NOT NULL CHECK (population >= 0),
    unit_days        REAL NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('good', 'rejected')),
    rejection_reason TEXT NOT NULL DEFAULT '',
    model            TEXT NOT NULL
);

CREATE TABLE customer_value_activations (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    version      INTEGER NOT NULL REFERENCES customer_value_models (version),
    activated_at INTEGER NOT NULL,
    cause        TEXT NOT NULL CHECK (cause IN ('fit', 'api'))
);

CREATE TABLE fit_schedule (
    name        TEXT PRIMARY KEY,
    last_run_at INTEGER,
    holder      TEXT,
    lease_until INTEGER
);

INSERT INTO fit_schedule (name) VALUES ('customer_value');
