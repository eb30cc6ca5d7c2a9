-- Runs and their status history. Times are nanoseconds since the Unix epoch
-- (UTC); JSON values are stored as text. `runs` keeps an integer key (`id`)
-- that the history refers to: short keys keep the history's pages dense.
CREATE TABLE runs (
    id                INTEGER PRIMARY KEY,
    run_id            TEXT NOT NULL ON CONFLICT FAIL UNIQUE,
    module_id         TEXT NOT NULL ON CONFLICT FAIL,
    module_name       TEXT NOT NULL ON CONFLICT FAIL,
    status            TEXT NOT NULL ON CONFLICT FAIL,
    created_at        INTEGER NOT NULL ON CONFLICT FAIL,
    started_at        INTEGER,
    completed_at      INTEGER,
    parameters        TEXT NOT NULL ON CONFLICT FAIL,
    exit_code         INTEGER,
    error_message     TEXT,
    output            TEXT,
    progress_fraction REAL,
    progress_message  TEXT,
    module_version    TEXT,
    -- How many entries run_history holds for this run: the next entry's seq.
    history_len       INTEGER NOT NULL ON CONFLICT FAIL
);

-- Listings are newest first. Finished runs are the bulk and are listed by
-- scanning this index; active runs have their own small partial index, so a
-- status change touches no index but, at the end of a run, that one.
CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_module ON runs (module_id, created_at, run_id);
CREATE INDEX runs_active ON runs (created_at, run_id) WHERE status IN ('queued', 'running');

CREATE TABLE run_history (
    run     INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    status  TEXT NOT NULL,
    at      INTEGER NOT NULL,
    message TEXT,
    PRIMARY KEY (run, seq)
) WITHOUT ROWID;
