-- A run's priority (higher starts first) and the earliest time it may
-- start (nanoseconds; NULL: as soon as there is room). Queued runs are
-- claimed by priority, then by when they became due, then in the order
-- they were queued.
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN not_before INTEGER;
DROP INDEX runs_claimable;
CREATE INDEX runs_claimable ON runs
    (module_id, module_version, priority DESC, coalesce(not_before, created_at), id)
    WHERE claimable = 1 AND status = 'queued';
