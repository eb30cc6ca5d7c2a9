-- The idempotency key a run was started with: a start retried with the
-- same key finds the run the first one recorded instead of adding another.
-- Only keyed runs are in the index.
ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
