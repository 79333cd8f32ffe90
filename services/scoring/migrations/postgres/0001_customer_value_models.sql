-- The scoring service's fitted customer-value models (BG/NBD, Gamma-Gamma and the RFM quintile
-- boundaries), one row per fit, with which one is active and who runs the scheduled fit.

-- One row per fit, good or rejected. `model` holds the parameters, the fit diagnostics and the
-- RFM boundaries as JSON (non-finite numbers as null); `version` only grows, never reused.
CREATE TABLE customer_value_models (
    version          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fitted_at        timestamptz NOT NULL,
    as_of            timestamptz NOT NULL,
    trigger          text NOT NULL CHECK (trigger IN ('api', 'schedule')),
    population       bigint NOT NULL CHECK (population >= 0),
    unit_days        double precision NOT NULL,
    status           text NOT NULL CHECK (status IN ('good', 'rejected')),
    rejection_reason text NOT NULL DEFAULT '',
    model            jsonb NOT NULL
);

-- Every activation (a good fit, or ActivateCustomerValueModel): the active model is the one
-- of the latest row, which every replica polls.
CREATE TABLE customer_value_activations (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    version      bigint NOT NULL REFERENCES customer_value_models (version),
    activated_at timestamptz NOT NULL,
    cause        text NOT NULL CHECK (cause IN ('fit', 'api'))
);

-- The scheduled fit's lease: the replica that claims it (a conditional update) fits, then
-- records when; the others find it taken or not due.
CREATE TABLE fit_schedule (
    name        text PRIMARY KEY,
    last_run_at timestamptz,
    holder      text,
    lease_until timestamptz
);

INSERT INTO fit_schedule (name) VALUES ('customer_value');
