-- A profile's traits, computed accumulators and scores as `json` (the text as written) rather
-- than `jsonb`: every delivery round rewrites each profile it names and reads it back under
-- lock, and nothing queries inside these columns in SQL, so jsonb's binary form was only cost.
-- On a benchmark round's profiles (about 1.1 KB of JSON each) jsonb took 21 µs to take in and
-- 15 µs to print per profile, json 6 µs and 1 µs (docs/benchmarks.md, eighteenth session).
-- The values read back are the same: jsonb printed numbers its own way, json keeps the text.
-- Rewrites the table under an exclusive lock: on a large deployment run it in a maintenance
-- window (docs/operations.md).
ALTER TABLE profiles
    ALTER COLUMN traits DROP DEFAULT,
    ALTER COLUMN scores DROP DEFAULT,
    ALTER COLUMN computed DROP DEFAULT,
    ALTER COLUMN traits TYPE json USING traits::json,
    ALTER COLUMN scores TYPE json USING scores::json,
    ALTER COLUMN computed TYPE json USING computed::json,
    ALTER COLUMN traits SET DEFAULT '{}',
    ALTER COLUMN scores SET DEFAULT '{}',
    ALTER COLUMN computed SET DEFAULT '{}';
