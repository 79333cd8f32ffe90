-- Until when an account's windowed account computed traits hold (the time the oldest counted
-- event leaves its window), as of its last rescore: the sweeper queues a rescore of the account
-- when it passes, so account scores follow time without new events. NULL: nothing to expire
-- (no windowed trait, or not rescored since; the next rescore sets it).
ALTER TABLE accounts ADD COLUMN computed_valid_until timestamptz;
CREATE INDEX accounts_computed_valid_until ON accounts (computed_valid_until)
    WHERE computed_valid_until IS NOT NULL;

-- A refresh of an account's members runs a chunk of members per transaction: a row with
-- `after_profile_id` resumes after that member (profile id order; NULL: from the first), and
-- `rescore` says whether the account itself is still to be rescored (done with the first chunk).
ALTER TABLE account_refreshes ADD COLUMN after_profile_id text;
ALTER TABLE account_refreshes ADD COLUMN rescore boolean NOT NULL DEFAULT true;
