-- Every version of every profile as it was written, for GetProfile(as_of).
CREATE TABLE profile_versions (
    profile_id  TEXT NOT NULL,
    version     INTEGER NOT NULL,
    recorded_at TEXT NOT NULL,
    merged_into TEXT,
    body        BLOB,
    PRIMARY KEY (profile_id, version)
);
CREATE INDEX profile_versions_recorded ON profile_versions (recorded_at);
