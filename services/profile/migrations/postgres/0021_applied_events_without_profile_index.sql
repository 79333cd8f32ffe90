-- `applied_events_timeline` (profile_id, occurred_at DESC, event_id DESC) answers every lookup
-- by profile that this index did (its leading column), so the index only cost a btree insert
-- per applied event and its space.
DROP INDEX IF EXISTS applied_events_profile;
