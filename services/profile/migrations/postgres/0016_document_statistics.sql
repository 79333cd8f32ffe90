-- No planner statistics for the JSON documents written on every event: no statement filters on
-- a whole document (expression indexes keep their own statistics), and sampling them made each
-- ANALYZE of these growing tables (autovacuum's) about 3x longer.
ALTER TABLE applied_events ALTER COLUMN content SET STATISTICS 0;
ALTER TABLE profiles ALTER COLUMN traits SET STATISTICS 0;
ALTER TABLE profiles ALTER COLUMN computed SET STATISTICS 0;
ALTER TABLE profiles ALTER COLUMN scores SET STATISTICS 0;
ALTER TABLE profile_changes ALTER COLUMN detail SET STATISTICS 0;
ALTER TABLE profile_versions ALTER COLUMN body SET STATISTICS 0;
