-- Every status change is announced to the nodes sharing the database, in
-- the transaction that records it (a rolled-back change announces
-- nothing): a NOTIFY on "<schema>_events" for each history row, naming the
-- node that wrote it (the session's modrun.node setting), so that each
-- node can show every node's runs. A payload PostgreSQL would refuse
-- (8000 bytes or more: a huge id) is not sent; the message is cut.
CREATE FUNCTION notify_status() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload TEXT;
BEGIN
    SELECT json_build_object(
        'node', current_setting('modrun.node', true),
        'run_id', r.run_id,
        'module_id', r.module_id,
        'status', NEW.status,
        'at', NEW.at,
        'message', left(NEW.message, 1000))::text
    INTO payload
    FROM runs r WHERE r.id = NEW.run;
    IF payload IS NOT NULL AND octet_length(payload) < 7900 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', payload);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER run_history_notify AFTER INSERT ON run_history
    FOR EACH ROW EXECUTE FUNCTION notify_status();

-- A cancel asked of a node that does not execute the run: the intent,
-- for the executing node (told at once by a NOTIFY on "<schema>_control",
-- and at each heartbeat) or, once that node is lost, for the node that
-- settles its runs.
ALTER TABLE runs ADD COLUMN cancel_requested_at BIGINT;
