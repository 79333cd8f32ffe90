-- Account-level scores ({name: Score}, as profiles' `scores`): one per account-level scoring
-- plan, recomputed whenever a group call naming the account is applied or its members merge.
ALTER TABLE accounts ADD COLUMN scores jsonb NOT NULL DEFAULT '{}';
