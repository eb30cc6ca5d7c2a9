-- Listing by a finished status (`status=failed`) reads the newest runs of
-- that status from this index, however many others there are. Only
-- finished runs are in it, so a run touches it once, when it ends.
CREATE INDEX runs_finished_by_status ON runs (status, created_at, run_id)
    WHERE status IN ('completed', 'failed', 'cancelled');

-- Cleanups remove finished runs oldest-ended first, by this index. Its
-- condition names no column a run's start changes, so a start never
-- touches it.
CREATE INDEX runs_finished_by_completion ON runs (completed_at)
    WHERE completed_at IS NOT NULL;
