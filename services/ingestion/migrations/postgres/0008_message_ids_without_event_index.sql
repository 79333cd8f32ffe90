-- Forgetting an event now deletes its dedup key through the key its log row names (the primary
-- key), so the index by event id, one more B-tree written for every accepted message, goes.
DROP INDEX IF EXISTS message_ids_by_event;
