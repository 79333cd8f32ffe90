-- The source debugger lists a source's latest events newest first.
CREATE INDEX events_by_source ON events (source_id, seq);
