-- Forgetting a whole person (ForgetProfile, a GDPR deletion). The person's identifiers are
-- remembered among the erased ones (only their digests), marked as forgotten with a person;
-- user ids, emails, phones and custom types also suppress every later event that carries them
-- (it belongs to no profile), while anonymous, device and group ids, which may be shared, are
-- only erased. An identifier erased on its own before is upgraded.
ALTER TABLE erased_identifiers
    ADD COLUMN with_person boolean NOT NULL DEFAULT false,
    ADD COLUMN suppresses  boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT erased_identifiers_suppress_with_person CHECK (with_person OR NOT suppresses);

-- Every profile of a forgotten component (its rows elsewhere are deleted), so forgetting it
-- again answers the same. The root's row keeps the answer: {"root", "profiles", "events",
-- "identifiers"} (sorted profile ids, sorted event ids, how many identifiers).
CREATE TABLE forgotten_profiles (
    profile_id   uuid PRIMARY KEY,
    root         uuid NOT NULL,
    reason       text NOT NULL,
    forgotten_at timestamptz NOT NULL,
    answer       jsonb,
    CHECK ((profile_id = root) = (answer IS NOT NULL))
);
