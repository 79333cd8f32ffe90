-- A queued account refresh rescores the account; `members` (its traits changed) also
-- re-evaluates every member. Without it only the account is rescored.
ALTER TABLE account_refreshes ADD COLUMN members INTEGER NOT NULL DEFAULT 1;
CREATE INDEX account_refreshes_by_account ON account_refreshes (account_id);
