-- Queued re-evaluations of an account's members after its traits changed: another member's
-- group call changed what the members' audiences (their copies of the account traits) and
-- scores read.
CREATE TABLE account_refreshes (
    position     INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id   TEXT NOT NULL,
    requested_at TEXT NOT NULL
);
