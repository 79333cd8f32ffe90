-- The profile's timeline: when each applied event happened, so a profile's events (from all its
-- merged identities) can be listed newest first and paged by (occurred_at, event_id). NULL for
-- events applied before contents were kept (they are not on the timeline).
ALTER TABLE applied_events ADD COLUMN occurred_at timestamptz;
UPDATE applied_events SET occurred_at = (content ->> 'timestamp')::timestamptz
 WHERE content IS NOT NULL;

CREATE INDEX applied_events_timeline ON applied_events (profile_id, occurred_at DESC, event_id DESC);
