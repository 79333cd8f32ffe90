-- What each applied event contributed (its time, traits and the identifiers it linked), so a
-- profile can be rebuilt from its events when an unmerge moves events between profiles. NULL
-- for events applied before this migration: such profiles cannot be rebuilt.
ALTER TABLE applied_events ADD COLUMN content TEXT;

CREATE INDEX applied_events_profile ON applied_events (profile_id);
