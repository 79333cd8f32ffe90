-- Tracking plans: per source, JSON Schemas its events are checked against (the plan document is
-- the JSON form of `plans::Plan`). `version` goes up by one on every put; every version is kept
-- in tracking_plan_versions for history.
CREATE TABLE tracking_plans (
    source_id  UUID        PRIMARY KEY REFERENCES sources (source_id) ON DELETE CASCADE,
    version    BIGINT      NOT NULL CHECK (version > 0),
    plan       JSONB       NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE tracking_plan_versions (
    source_id  UUID        NOT NULL REFERENCES sources (source_id) ON DELETE CASCADE,
    version    BIGINT      NOT NULL,
    plan       JSONB       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source_id, version)
);

-- Messages a source's plan blocked (mode `block`), kept as received (a `tessera_core::Event`
-- before clock-skew correction) until they are replayed or deleted.
CREATE TABLE quarantine (
    quarantine_id BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_id     UUID        NOT NULL REFERENCES sources (source_id) ON DELETE CASCADE,
    message_id    TEXT        NOT NULL,
    payload       JSONB       NOT NULL,
    -- [{"field": ..., "description": ...}], as reported to the client.
    violations    JSONB       NOT NULL,
    plan_version  BIGINT      NOT NULL,
    received_at   TIMESTAMPTZ NOT NULL
);

CREATE INDEX quarantine_by_source ON quarantine (source_id, quarantine_id);
