-- Forgetting a whole person (ForgetProfile, a GDPR deletion). The person's identifiers are
-- remembered among the erased ones (only their digests), marked as forgotten with a person;
-- user ids, emails, phones and custom types also suppress every later event that carries them,
-- while anonymous, device and group ids, which may be shared, are only erased. Booleans are
-- INTEGER 0 or 1.
ALTER TABLE erased_identifiers
    ADD COLUMN with_person INTEGER NOT NULL DEFAULT 0 CHECK (with_person IN (0, 1));
ALTER TABLE erased_identifiers
    ADD COLUMN suppresses INTEGER NOT NULL DEFAULT 0
        CHECK (suppresses IN (0, 1) AND (with_person = 1 OR suppresses = 0));

-- Every profile of a forgotten component, so forgetting it again answers the same. The root's
-- row keeps the answer (JSON).
CREATE TABLE forgotten_profiles (
    profile_id   TEXT PRIMARY KEY NOT NULL,
    root         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    forgotten_at INTEGER NOT NULL,
    answer       TEXT,
    CHECK ((profile_id = root) = (answer IS NOT NULL))
) STRICT;
