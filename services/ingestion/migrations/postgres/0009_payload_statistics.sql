-- No planner statistics for the event payload: no statement filters on the whole document, and
-- sampling it made each ANALYZE of the log (autovacuum's, as the log grows) about 3x longer.
ALTER TABLE events ALTER COLUMN payload SET STATISTICS 0;
