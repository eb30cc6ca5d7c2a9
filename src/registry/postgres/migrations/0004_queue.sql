-- The store is the queue. A module run is recorded `queued` with no node:
-- any node that has its module at the pinned version claims it (its node
-- set, its attempt counted) in the statement that marks it `running`.
ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_claimable ON runs (module_id, id) WHERE status = 'queued' AND node IS NULL;

-- The module versions each node can run ("<module>@<content hash>"), as
-- its heartbeat last published them; NULL until it has loaded its modules.
-- A queued run that no live node can run is settled rather than left
-- waiting forever.
ALTER TABLE nodes ADD COLUMN versions TEXT[];

-- Status announcements say whether the run waits to be claimed (queued
-- for no node), so that a node's claimer wakes for those and no others.
CREATE OR REPLACE FUNCTION notify_status() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload TEXT;
BEGIN
    SELECT json_build_object(
        'node', current_setting('modrun.node', true),
        'run_id', r.run_id,
        'module_id', r.module_id,
        'status', NEW.status,
        'at', NEW.at,
        'message', left(NEW.message, 1000),
        'claimable', NEW.status = 'queued' AND r.status = 'queued' AND r.node IS NULL)::text
    INTO payload
    FROM runs r WHERE r.id = NEW.run;
    IF payload IS NOT NULL AND octet_length(payload) < 7900 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', payload);
    END IF;
    RETURN NULL;
END
$$;

-- How many attempts a run may take: a run whose node is lost while it
-- runs is queued again while it has had fewer (its module opts in).
ALTER TABLE runs ADD COLUMN max_attempts INTEGER NOT NULL DEFAULT 1;
