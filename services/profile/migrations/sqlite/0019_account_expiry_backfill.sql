-- Accounts scored before `computed_valid_until` existed (0017), or since with nothing to expire,
-- hold NULL, which the sweeper never takes: each is made due once (the epoch, as RFC 3339 text
-- like every stored time, sorts before any sweep's now), so the next sweeps queue a rescore of
-- every existing account, which stores its real next time (or NULL again: the sweep clears the
-- column as it queues). Accounts created later are rescored by the write that creates them.
UPDATE accounts SET computed_valid_until = '1970-01-01T00:00:00Z'
    WHERE computed_valid_until IS NULL;
