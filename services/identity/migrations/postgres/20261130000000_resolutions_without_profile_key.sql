-- A resolution row is written per event, the identity service's largest write. Its foreign key
-- to `profiles` ran a trigger per row that looked the profile up and locked it FOR KEY SHARE:
-- about 40 % of the statement (a 500-row insert took 15.7 ms with it, 8.7 ms without). The
-- writers keep it true: a run names only a profile it created or read under its identifiers'
-- advisory locks, and a forget, the only statement that deletes profiles, takes those locks and
-- deletes the profiles' resolutions first. SQLite keeps the key (it has a single writer and no
-- such cost).
ALTER TABLE resolutions DROP CONSTRAINT IF EXISTS resolutions_profile_id_fkey;
