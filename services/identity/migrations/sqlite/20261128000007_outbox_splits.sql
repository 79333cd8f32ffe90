-- Unmerges travel through the merge outbox too, so the profile service sees merges and splits
-- in the order they were decided. A split row has rule 'split' and its payload: every profile
-- and event of the former component and where each belongs now.
ALTER TABLE merge_outbox ADD COLUMN payload TEXT;
