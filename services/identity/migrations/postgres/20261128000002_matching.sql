-- Probabilistic matching: each canonical profile's person attributes (normalized, as the
-- matcher compares them) and blocking keys, the fitted models, the suggestions awaiting review,
-- and the merges to tell the profile service about. Merges themselves go to `merges` and
-- `graph_log` (rule `probabilistic` or `manual`, the explanation in `graph_log.detail`).

ALTER TABLE graph_log ADD COLUMN detail jsonb;

CREATE TABLE match_attributes (
    profile_id uuid PRIMARY KEY REFERENCES profiles (profile_id),
    attributes jsonb NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE match_keys (
    key        text NOT NULL,
    profile_id uuid NOT NULL REFERENCES profiles (profile_id),
    PRIMARY KEY (key, profile_id)
);

CREATE INDEX match_keys_by_profile ON match_keys (profile_id);

CREATE TABLE match_models (
    version    bigint PRIMARY KEY CHECK (version > 0),
    params     jsonb NOT NULL,
    report     jsonb NOT NULL,
    trained_at timestamptz NOT NULL
);

CREATE TABLE match_suggestions (
    suggestion_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    profile_a     uuid NOT NULL REFERENCES profiles (profile_id),
    profile_b     uuid NOT NULL REFERENCES profiles (profile_id),
    explanation   jsonb NOT NULL,
    status        text NOT NULL CHECK (status IN ('open', 'accepted', 'rejected')),
    created_at    timestamptz NOT NULL,
    decided_at    timestamptz,
    CHECK (profile_a < profile_b),
    UNIQUE (profile_a, profile_b)
);

CREATE INDEX match_suggestions_by_status ON match_suggestions (status, suggestion_id);

-- Merges decided outside the pipeline, until the profile service has applied them.
CREATE TABLE merge_outbox (
    seq                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    surviving_profile_id uuid NOT NULL,
    merged_profile_id    uuid NOT NULL,
    cause                text NOT NULL,
    rule                 text NOT NULL,
    merged_at            timestamptz NOT NULL,
    delivered_at         timestamptz
);

CREATE INDEX merge_outbox_pending ON merge_outbox (seq) WHERE delivered_at IS NULL;
