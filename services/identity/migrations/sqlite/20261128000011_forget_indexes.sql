-- Indexes that let ForgetProfile (and EraseIdentifier) find a person's rows without scanning
-- whole tables (the Postgres migration of the same name explains each). SQLite has no index on
-- JSON contents that helps here: the dropped identifiers of other events are still scanned.
CREATE INDEX graph_log_by_identifier ON graph_log (id_type, id_value) WHERE id_value IS NOT NULL;
CREATE INDEX sightings_by_profile ON sightings (profile_id);
CREATE INDEX merges_by_survivor ON merges (surviving_profile_id);
CREATE INDEX match_suggestions_by_b ON match_suggestions (profile_b);
CREATE INDEX merge_outbox_by_survivor ON merge_outbox (surviving_profile_id);
CREATE INDEX merge_outbox_by_merged ON merge_outbox (merged_profile_id);
CREATE INDEX graph_log_by_other_profile ON graph_log (other_profile_id, seq) WHERE other_profile_id IS NOT NULL;
