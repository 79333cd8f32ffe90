-- The model version each profile was last matched with: a profile is matched again when its
-- attributes change (the column is reset) or a newer model is trained.
ALTER TABLE match_attributes ADD COLUMN matched_version bigint;
