-- The accumulators of each profile's computed traits (`ComputedState`), by trait name.
ALTER TABLE profiles ADD COLUMN computed TEXT NOT NULL DEFAULT '{}';
