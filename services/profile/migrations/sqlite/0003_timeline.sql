-- The profile's timeline: when each applied event happened (microseconds since the epoch), so a
-- profile's events can be listed newest first and paged by (occurred_at, event_id). NULL for
-- events applied before contents were kept (they are not on the timeline).
ALTER TABLE applied_events ADD COLUMN occurred_at INTEGER;
UPDATE applied_events
   SET occurred_at = CAST(round((julianday(json_extract(content, '$.timestamp')) - 2440587.5)
                                * 86400000000.0) AS INTEGER)
 WHERE content IS NOT NULL;

CREATE INDEX applied_events_timeline ON applied_events (profile_id, occurred_at DESC, event_id DESC);
