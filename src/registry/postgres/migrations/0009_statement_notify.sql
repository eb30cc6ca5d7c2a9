-- Status announcements per statement, not per history row: one trigger
-- call builds every row's announcement in one query (a row trigger cost
-- a PL/pgSQL call and a lookup of its run for each row). Still one
-- NOTIFY per status change, each run's in the order of its history.
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
          )::text AS payload
          FROM new_rows n JOIN runs r ON r.id = n.run
          ORDER BY n.run, n.seq) a
    WHERE octet_length(a.payload) < 7900;
    RETURN NULL;
END
$$;

DROP TRIGGER run_history_notify ON run_history;
CREATE TRIGGER run_history_notify AFTER INSERT ON run_history
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_statuses();
DROP FUNCTION notify_status();
