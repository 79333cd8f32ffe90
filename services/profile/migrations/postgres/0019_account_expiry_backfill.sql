-- Accounts scored before `computed_valid_until` existed (0017), or since with nothing to expire,
-- hold NULL, which the sweeper never takes: each is made due once (the epoch is before any
-- sweep's now), so the next sweeps queue a rescore of every existing account, which stores its
-- real next time (or NULL again: the sweep clears the column as it queues). Accounts created
-- later are rescored by the write that creates them and set it then.
UPDATE accounts SET computed_valid_until = '1970-01-01 00:00:00+00'
    WHERE computed_valid_until IS NULL;
