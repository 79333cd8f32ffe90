-- The event log's payload as `json` (the text as accepted) rather than `jsonb`: every accepted
-- message is taken in once and printed once by delivery (`payload::text`), and only the rare
-- operator paths (GDPR forget, the debugger's filters) look inside it, which `json`'s
-- operators serve as well. On the bench's own payloads (about 630 bytes each), per 100
-- messages: taking them in 1.31 -> 0.69 ms, printing them 0.87 -> 0.34 ms
-- (docs/benchmarks.md, eighteenth session). A message holding a NUL character (`\u0000`) is
-- still refused before it reaches the log: the log's readers downstream keep jsonb. Rewrites
-- the table under an exclusive lock: on a large deployment run it in a maintenance window
-- (docs/operations.md).
ALTER TABLE events ALTER COLUMN payload TYPE json USING payload::json;
