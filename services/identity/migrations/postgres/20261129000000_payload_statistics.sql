-- No planner statistics for per-event JSON documents: no statement filters on a whole
-- document (the `detail -> 'dropped'` filter has its own expression index), and sampling them
-- made each ANALYZE of these growing tables (autovacuum's) several times longer.
ALTER TABLE resolutions ALTER COLUMN merges SET STATISTICS 0;
ALTER TABLE resolutions ALTER COLUMN detail SET STATISTICS 0;
ALTER TABLE graph_log ALTER COLUMN detail SET STATISTICS 0;
ALTER TABLE merge_outbox ALTER COLUMN payload SET STATISTICS 0;
