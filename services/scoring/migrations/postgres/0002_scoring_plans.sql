-- Scoring plans declared through the API (CreatePlan, UpdatePlan, DeletePlan), beside the
-- configured ones. The plans in effect are config's, then these in creation order (`seq`).

-- One row per plan: `plan` is the config form as JSON; `version` starts at 1 and grows with
-- every update (UpdatePlan's expected_version); `seq` is the revision that created it, so
-- ordering by it is creation order.
CREATE TABLE scoring_plans (
    name       text PRIMARY KEY,
    seq        bigint NOT NULL UNIQUE,
    version    bigint NOT NULL CHECK (version >= 1),
    plan       jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

-- The store-wide revision: every change bumps it in its own transaction (which also takes
-- this row's lock, so changes validate one at a time); every replica polls it.
CREATE TABLE scoring_plans_revision (
    id       smallint PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL
);

INSERT INTO scoring_plans_revision (id, revision) VALUES (1, 0);
