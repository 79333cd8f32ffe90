-- Queued re-evaluations of an account's members after its traits changed: another member's
-- group call changed what the members' audiences (their copies of the account traits) and
-- scores read. Rows are only inserted and deleted, so queuing never waits for a lock; a
-- refresh takes its rows FOR UPDATE SKIP LOCKED, so replicas share the queue.
CREATE TABLE account_refreshes (
    position     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   text NOT NULL,
    requested_at timestamptz NOT NULL
);
