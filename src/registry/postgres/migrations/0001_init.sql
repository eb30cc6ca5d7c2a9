-- Runs and their status history, as the SQLite registry keeps them. Times
-- are nanoseconds since the Unix epoch (UTC); JSON values are stored as
-- text, exactly as written. Run ids compare byte by byte ("C"), so that
-- listings page the same way on every server whatever its locale.
CREATE TABLE runs (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            TEXT COLLATE "C" NOT NULL UNIQUE,
    module_id         TEXT COLLATE "C" NOT NULL,
    module_name       TEXT NOT NULL,
    status            TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    completed_at      BIGINT,
    parameters        TEXT NOT NULL,
    exit_code         INTEGER,
    error_message     TEXT,
    output            TEXT,
    progress_fraction DOUBLE PRECISION,
    progress_message  TEXT,
    module_version    TEXT,
    log               TEXT,
    -- How many entries run_history holds for this run: the next entry's seq.
    history_len       INTEGER NOT NULL
);

CREATE INDEX runs_by_created ON runs (created_at, run_id);
CREATE INDEX runs_by_module ON runs (module_id, created_at, run_id);
CREATE INDEX runs_active ON runs (created_at, run_id) WHERE status IN ('queued', 'running');

CREATE TABLE run_history (
    run     BIGINT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    status  TEXT NOT NULL,
    at      BIGINT NOT NULL,
    message TEXT,
    PRIMARY KEY (run, seq)
);
