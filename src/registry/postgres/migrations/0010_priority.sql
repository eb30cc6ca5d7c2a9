-- A run's priority (higher starts first) and the earliest time it may
-- start (nanoseconds; NULL: as soon as there is room). Queued runs are
-- claimed by priority, then by when they became due, then in the order
-- they were queued.
ALTER TABLE runs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN not_before BIGINT;
DROP INDEX runs_claimable;
CREATE INDEX runs_claimable ON runs
    (module_id, priority DESC, (coalesce(not_before, created_at)), id)
    WHERE status = 'queued' AND node IS NULL;

-- A run queued with a not-before time still to come is announced, but not
-- as claimable: no claimer wakes for it, and no node's starts queue behind
-- it. Claimers take it at their poll once it is due.
CREATE OR REPLACE FUNCTION notify_statuses() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', a.payload)
    FROM (SELECT json_build_object(
              'node', current_setting('modrun.node', true),
              'run_id', r.run_id,
              'module_id', r.module_id,
              'status', n.status,
              'at', n.at,
              'message', left(n.message, 1000),
              'claimable', n.status = 'queued' AND r.status = 'queued' AND r.node IS NULL
                  AND (r.not_before IS NULL OR r.not_before <= n.at)
          )::text AS payload
          FROM new_rows n JOIN runs r ON r.id = n.run
          ORDER BY n.run, n.seq) a
    WHERE octet_length(a.payload) < 7900;
    RETURN NULL;
END
$$;
