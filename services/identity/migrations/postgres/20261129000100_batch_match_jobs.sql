-- Batch match jobs (BatchMatchService; RunBatchMatch runs one and waits for it). At most one
-- runs at a time across replicas: the partial unique index admits one `running` row, held by
-- its replica (`owner`) through a lease it renews while the job runs. A running job whose
-- lease expired (its replica died) is marked failed by the next start or read; it is not
-- resumed. The counts are the progress while it runs, the summary once it succeeded.

CREATE TABLE batch_match_jobs (
    job_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state           text NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    owner           text NOT NULL,
    lease_until     timestamptz NOT NULL,
    model_version   bigint NOT NULL DEFAULT 0,
    profiles        bigint NOT NULL DEFAULT 0,
    candidate_pairs bigint NOT NULL DEFAULT 0,
    pairs_done      bigint NOT NULL DEFAULT 0,
    merges          bigint NOT NULL DEFAULT 0,
    suggestions     bigint NOT NULL DEFAULT 0,
    refused         bigint NOT NULL DEFAULT 0,
    error           text NOT NULL DEFAULT '',
    started_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    finished_at     timestamptz
);

CREATE UNIQUE INDEX batch_match_jobs_one_running ON batch_match_jobs (state)
    WHERE state = 'running';
