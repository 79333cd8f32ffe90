-- Batch match jobs (BatchMatchService; RunBatchMatch runs one and waits for it). At most one
-- runs at a time: the partial unique index admits one `running` row, held by its process
-- (`owner`) through a lease it renews while the job runs. A running job whose lease expired
-- (its process died) is marked failed by the next start or read; it is not resumed. Times are
-- microseconds since the epoch.

CREATE TABLE batch_match_jobs (
    job_id          INTEGER PRIMARY KEY AUTOINCREMENT,
    state           TEXT NOT NULL CHECK (state IN ('running', 'succeeded', 'failed')),
    owner           TEXT NOT NULL,
    lease_until     INTEGER NOT NULL,
    model_version   INTEGER NOT NULL DEFAULT 0,
    profiles        INTEGER NOT NULL DEFAULT 0,
    candidate_pairs INTEGER NOT NULL DEFAULT 0,
    pairs_done      INTEGER NOT NULL DEFAULT 0,
    merges          INTEGER NOT NULL DEFAULT 0,
    suggestions     INTEGER NOT NULL DEFAULT 0,
    refused         INTEGER NOT NULL DEFAULT 0,
    error           TEXT NOT NULL DEFAULT '',
    started_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    finished_at     INTEGER
) STRICT;

CREATE UNIQUE INDEX batch_match_jobs_one_running ON batch_match_jobs (state)
    WHERE state = 'running';
