-- The finished runs' index by status, on the same statuses, stated as
-- comparisons: SQLite checks a partial index's condition on every insert
-- and every update of a run, and it checks a list of three or more values
-- (`status IN (...)`) by building a temporary table each time, which cost
-- a run's writes more than the rows themselves. Queries state the
-- condition in this same form, for the planner to prove the index applies.
DROP INDEX runs_finished_by_status;
CREATE INDEX runs_finished_by_status ON runs (status, created_at, run_id)
    WHERE status = 'completed' OR status = 'failed' OR status = 'cancelled';
