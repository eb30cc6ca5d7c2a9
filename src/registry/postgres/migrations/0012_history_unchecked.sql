-- A run's history rows no longer check, each, that their run exists: the
-- foreign key cost the server an after-row trigger and a lookup of the
-- run per history row (three per run), about a fifth of the server's
-- work for a short run. Only modrun writes history, always in the
-- statement that writes its run (from the run's own RETURNING), and run
-- ids are never reused, so the check caught nothing. What the key's
-- ON DELETE CASCADE did, the statements that remove runs now do
-- themselves: they remove the runs' history in the same statement.
ALTER TABLE run_history DROP CONSTRAINT run_history_run_fkey;
