-- Runs and their status history. Times are nanoseconds since the Unix epoch
-- (UTC); JSON values are stored as text. `runs` keeps its rowid: outputs
-- can be large, which WITHOUT ROWID tables handle badly.
CREATE TABLE runs (
    run_id            TEXT NOT NULL UNIQUE,
    module_id         TEXT NOT NULL,
    module_name       TEXT NOT NULL,
    status            TEXT NOT NULL
                      CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    completed_at      INTEGER,
    parameters        TEXT NOT NULL,
    exit_code         INTEGER,
    error_message     TEXT,
    output            TEXT,
    progress_fraction REAL,
    progress_message  TEXT,
    module_version    TEXT,
    -- How many entries run_history holds for this run: the next entry's seq.
    history_len       INTEGER NOT NULL
);

CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_status ON runs (status, created_at);
CREATE INDEX runs_by_module ON runs (module_id, created_at);

CREATE TABLE run_history (
    run_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    status  TEXT NOT NULL,
    at      INTEGER NOT NULL,
    message TEXT,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
