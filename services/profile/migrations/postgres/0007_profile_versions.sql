-- Every version of every profile as it was written (the encoded `tessera.profile.v1.Profile` of
-- a live profile; the survivor of a merged one), for GetProfile(as_of): the profile exactly as
-- Tessera knew it at a past time. Pruned after `history_retention_days`, keeping per profile the
-- newest version older than the cutoff.
CREATE TABLE profile_versions (
    profile_id  text NOT NULL,
    version     bigint NOT NULL,
    recorded_at timestamptz NOT NULL,
    merged_into text,
    body        bytea,
    PRIMARY KEY (profile_id, version)
);
CREATE INDEX profile_versions_recorded ON profile_versions (recorded_at);
