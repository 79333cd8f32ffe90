-- Forgetting an event (GDPR deletion, suppressed events at delivery) deletes its dedup key by
-- event id. The table holds every key of the dedup window, so this needs its own index.
CREATE INDEX message_ids_by_event ON message_ids (event_id);
