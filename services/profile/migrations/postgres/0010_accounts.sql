-- Account (B2B group) profiles: the account traits that group calls set, each with its
-- provenance ({name: {value, observed_at, event_id}}, the latest event winning), folded as the
-- events are applied. Who belongs is derived from the applied group events (indexed below), so
-- memberships follow merges, unmerges and deletions of people without being written twice.
CREATE TABLE accounts (
    account_id text PRIMARY KEY,
    traits     jsonb NOT NULL DEFAULT '{}',
    version    bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE INDEX applied_events_by_group ON applied_events ((content -> 'details' ->> 'group_id'))
    WHERE content -> 'details' ->> 'group_id' IS NOT NULL;
