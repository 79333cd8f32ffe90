-- The graph log records unmerges as decisions of their own kind: `split`, with the profile
-- split off (`profile_id`), the profile it had been merged into (`other_profile_id`) and the
-- reason (`detail`).
ALTER TABLE graph_log DROP CONSTRAINT graph_log_kind_check;
ALTER TABLE graph_log ADD CONSTRAINT graph_log_kind_check
    CHECK (kind IN ('create', 'link', 'merge', 'drop', 'split'));
