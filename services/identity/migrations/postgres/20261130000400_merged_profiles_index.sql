-- The merged profiles, by id. Every resolution batch ends by asking which of its profiles were
-- merged away meanwhile (`SURVIVORS_SQL`); almost none were, and without this index each of
-- the batch's few hundred ids was a descent of the primary key and a heap fetch only to read
-- `merged_into IS NULL`. Probing this index, which holds only the merged few, cost a third as
-- much (docs/benchmarks.md, sixteenth session). Maintained only when a profile is merged.
CREATE INDEX profiles_merged ON profiles (profile_id) WHERE merged_into IS NOT NULL;
