-- Webhook destinations of the change stream (`[[profile.webhooks]]`), one row per configured
-- webhook: its position in the change stream (it has delivered, dead-lettered or skipped every
-- change up to the cursor), which replica delivers it (a lease: one replica at a time, so each
-- change goes out once and in order), and the retry state of the changes at its head.
CREATE TABLE webhooks (
    name            text PRIMARY KEY,
    cursor_xid      xid8 NOT NULL,
    cursor_seq      bigint NOT NULL,
    owner           text,
    lease_until     timestamptz,
    -- While the head is being retried: the last change of the batch that failed (a retry sends
    -- the same changes), the attempts so far, when the first failed, when to try again, and why
    -- the last one failed.
    head_xid        xid8,
    head_seq        bigint,
    attempts        integer NOT NULL DEFAULT 0,
    first_failed_at timestamptz,
    next_attempt_at timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL
);

-- Changes a webhook could not deliver (refused, or failing past the retry budget): the payload
-- as sent (ids only, no personal data), until replayed (`replay_at` set: queued, with its own
-- retry schedule) or pruned. Deleting a person deletes their dead letters (but `deleted` ones).
CREATE TABLE webhook_dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook         text NOT NULL,
    cursor          text NOT NULL,
    profile_id      text NOT NULL,
    kind            text NOT NULL,
    changed_at      timestamptz NOT NULL,
    payload         jsonb NOT NULL,
    attempts        integer NOT NULL,
    last_error      text NOT NULL,
    dead_at         timestamptz NOT NULL,
    replay_at       timestamptz,
    replay_attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz
);
CREATE INDEX webhook_dead_letters_by_webhook ON webhook_dead_letters (webhook, id);
CREATE INDEX webhook_dead_letters_replays ON webhook_dead_letters (webhook, next_attempt_at)
    WHERE replay_at IS NOT NULL;
CREATE INDEX webhook_dead_letters_by_profile ON webhook_dead_letters (profile_id);
