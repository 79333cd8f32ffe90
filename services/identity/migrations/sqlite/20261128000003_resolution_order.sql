-- Events of a profile, for replaying a component of the graph (unmerge); the rowid orders them.
CREATE INDEX resolutions_by_profile ON resolutions (profile_id);
