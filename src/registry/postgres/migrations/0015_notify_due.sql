-- Runs queued for later start when they are due, not at a claimer's next
-- poll (up to a second late). A statement that queues runs with a
-- not-before time still to come announces the earliest of them (`due`,
-- nanoseconds), so every node's claimer wakes at that time; and each
-- claimer asks for the next such time with an index of only those runs.
-- Nodes that do not know `due` ignore it: they read the statuses as
-- before, and take those runs at their poll.
CREATE INDEX runs_delayed ON runs (not_before)
    WHERE status = 'queued' AND node IS NULL AND not_before IS NOT NULL;

-- As in 0011, with `due`; the function's settings (0014) are restated, as
-- a function replaced keeps none of its own.
CREATE OR REPLACE FUNCTION notify_statuses() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off
    SET enable_hashjoin = off
    SET enable_mergejoin = off
AS $$
DECLARE
    changes json[];
    due bigint;
    payload text;
BEGIN
    SELECT array_agg(json_build_array(
               r.run_id,
               r.module_id,
               n.status,
               n.at,
               left(n.message, 1000),
               n.status = 'queued' AND r.status = 'queued' AND r.node IS NULL
                   AND (r.not_before IS NULL OR r.not_before <= n.at)
           ) ORDER BY n.run, n.seq),
           min(r.not_before) FILTER (WHERE n.status = 'queued' AND r.status = 'queued'
               AND r.node IS NULL AND r.not_before > n.at)
    INTO changes, due
    FROM new_rows n JOIN runs r ON r.id = n.run;
    IF changes IS NULL THEN
        RETURN NULL;
    END IF;
    payload := json_build_object(
        'node', current_setting('modrun.node', true),
        'statuses', array_to_json(changes),
        'due', due
    )::text;
    IF octet_length(payload) < 8000 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', payload);
        RETURN NULL;
    END IF;
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', g.payload)
    FROM (SELECT json_build_object(
                     'node', current_setting('modrun.node', true),
                     'statuses', json_agg(c.change ORDER BY c.ord),
                     'due', due
                 )::text AS payload,
                 min(c.ord) AS first
          FROM (SELECT s.change, s.ord,
                       CASE WHEN s.bytes < 3500
                           THEN (sum(CASE WHEN s.bytes < 3500 THEN s.bytes ELSE 0 END)
                                     OVER (ORDER BY s.ord) - s.bytes) / 4000
                           ELSE -s.ord
                       END AS chunk
                FROM (SELECT u.change, u.ord, octet_length(u.change::text) + 2 AS bytes
                      FROM unnest(changes) WITH ORDINALITY AS u(change, ord)) s
                WHERE s.bytes < 7800) c
          GROUP BY c.chunk
          ORDER BY first) g
    WHERE octet_length(g.payload) < 8000;
    RETURN NULL;
END
$$;
