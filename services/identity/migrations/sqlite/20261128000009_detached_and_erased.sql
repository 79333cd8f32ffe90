-- Identifiers split off their profile (DetachIdentifier): such an identifier links only when an
-- event carries nothing else; an event that carries it with others drops it (rule `detached`).
CREATE TABLE detached_identifiers (
    type       TEXT NOT NULL,
    value      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (type, value)
) STRICT;

-- Identifiers erased (EraseIdentifier, a GDPR request): never linked again. Only a SHA-256
-- digest of the type and value is kept.
CREATE TABLE erased_identifiers (
    type       TEXT NOT NULL,
    digest     TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (type, digest)
) STRICT;
