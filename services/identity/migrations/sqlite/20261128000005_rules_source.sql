-- Where each rules version came from: the service's config at start, or an UpdateRules call.
-- A replica starting with config rules adds a version only when they differ from the rules
-- last registered from config, so an API update survives restarts with an unchanged config.
ALTER TABLE rules_versions
    ADD COLUMN source text NOT NULL DEFAULT 'config' CHECK (source IN ('config', 'api'));
