-- A queued account refresh rescores the account; `members` (its traits changed) also
-- re-evaluates every member. Without it (a member's event counted for an account computed
-- trait, a member was deleted) only the account is rescored.
ALTER TABLE account_refreshes ADD COLUMN members boolean NOT NULL DEFAULT true;
CREATE INDEX account_refreshes_by_account ON account_refreshes (account_id);
