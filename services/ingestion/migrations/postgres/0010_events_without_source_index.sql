-- The debugger's listing of a source's events reads a bounded range of the log's primary key
-- (`ingestion.debugger_page_scan` positions per page) instead of an index by source: one B-tree
-- less written for every accepted message, about 8 % more acceptance throughput measured.
DROP INDEX IF EXISTS events_by_source;
