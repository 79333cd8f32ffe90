-- Identifiers split off their profile (DetachIdentifier): such an identifier links only when an
-- event carries nothing else; an event that carries it with others drops it (rule `detached`).
-- Read on every resolution whose records carry one, and by every replay of a component.
CREATE TABLE detached_identifiers (
    type       text NOT NULL,
    value      text NOT NULL,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (type, value)
);

-- Identifiers erased (EraseIdentifier, a GDPR request): never linked again. Only a SHA-256
-- digest of the type and value is kept, so the suppression list does not hold the value it
-- suppresses.
CREATE TABLE erased_identifiers (
    type       text NOT NULL,
    digest     text NOT NULL,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (type, digest)
);
