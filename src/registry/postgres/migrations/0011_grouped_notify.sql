-- Status announcements grouped: one NOTIFY carries the status changes of
-- one statement rather than one NOTIFY per change. Each NOTIFY costs the
-- server a queue entry and a message to every listening node, and each
-- node a message to read. Every change is still announced when its
-- transaction commits, each run's in the order of its history; a
-- statement that records none announces nothing.
--
-- A NOTIFY holds at most 8,000 bytes. The changes of a statement usually
-- fit in one; when they do not, they go in groups of about 7,500 bytes at
-- most, in order. A change over 3,500 bytes (a long message) goes alone;
-- one over 7,800 bytes is not announced, as before.
CREATE OR REPLACE FUNCTION notify_statuses() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changes json[];
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
           ) ORDER BY n.run, n.seq)
    INTO changes
    FROM new_rows n JOIN runs r ON r.id = n.run;
    IF changes IS NULL THEN
        RETURN NULL;
    END IF;
    payload := json_build_object(
        'node', current_setting('modrun.node', true),
        'statuses', array_to_json(changes)
    )::text;
    IF octet_length(payload) < 8000 THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', payload);
        RETURN NULL;
    END IF;
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_events', g.payload)
    FROM (SELECT json_build_object(
                     'node', current_setting('modrun.node', true),
                     'statuses', json_agg(c.change ORDER BY c.ord)
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
