-- Indexes that let ForgetProfile (and EraseIdentifier) find a person's rows without scanning
-- whole tables inside their transaction: a long scan there holds back every other writer's
-- snapshot horizon and, on a large graph, would take minutes.
--
-- Other profiles' decisions that name an erased identifier (they are pseudonymized).
CREATE INDEX graph_log_by_identifier ON graph_log (id_type, id_value) WHERE id_value IS NOT NULL;
-- Sightings of the forgotten profiles (their own identifiers' sightings go by primary key).
CREATE INDEX sightings_by_profile ON sightings (profile_id);
-- Merges the forgotten profiles survived (merged_profile_id is unique, so already indexed).
CREATE INDEX merges_by_survivor ON merges (surviving_profile_id);
-- Suggestions naming a forgotten profile second (first is covered by the unique pair).
CREATE INDEX match_suggestions_by_b ON match_suggestions (profile_b);
-- Outbox rows of the forgotten profiles; delivered rows are kept, so the table grows.
CREATE INDEX merge_outbox_by_survivor ON merge_outbox (surviving_profile_id);
CREATE INDEX merge_outbox_by_merged ON merge_outbox (merged_profile_id);
-- Other people's events that dropped an erased identifier (a limit or a protection rule kept
-- it out of their profile): their detail stops naming it. Only resolutions that dropped
-- something are indexed, so the pipeline's common insert does not touch this index.
CREATE INDEX resolutions_by_dropped ON resolutions
    USING gin ((detail -> 'dropped') jsonb_path_ops)
    WHERE (detail -> 'dropped') <> '[]'::jsonb;
