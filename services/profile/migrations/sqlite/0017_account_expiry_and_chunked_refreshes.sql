-- Until when an account's windowed account computed traits hold, as of its last rescore: the
-- sweeper queues a rescore of the account when it passes. NULL: nothing to expire.
ALTER TABLE accounts ADD COLUMN computed_valid_until TEXT;
CREATE INDEX accounts_computed_valid_until ON accounts (computed_valid_until)
    WHERE computed_valid_until IS NOT NULL;

-- A refresh of an account's members runs a chunk of members per transaction: a row with
-- `after_profile_id` resumes after that member (NULL: from the first); `rescore` says whether
-- the account itself is still to be rescored (done with the first chunk).
ALTER TABLE account_refreshes ADD COLUMN after_profile_id TEXT;
ALTER TABLE account_refreshes ADD COLUMN rescore INTEGER NOT NULL DEFAULT 1;
