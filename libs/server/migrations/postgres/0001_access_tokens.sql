-- Access tokens of the external APIs: only the SHA-256 digest of each secret is kept.
CREATE TABLE access_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    -- Space-separated scopes: profiles:read, profiles:write, admin, privacy.
    scopes TEXT NOT NULL,
    digest BYTEA NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL,
    rotated_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);

-- Every call that needs the admin, privacy or profiles:write scope, allowed or refused.
CREATE TABLE audit_log (
    id BIGSERIAL PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL,
    token_id TEXT NOT NULL,
    token_name TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    outcome TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX audit_log_at ON audit_log (at);
