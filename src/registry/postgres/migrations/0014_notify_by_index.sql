-- The announcement of a statement's status changes finds each change's
-- run by its id, always. The trigger's query is planned once per session
-- and kept; planned while the runs table was small, the server joined by
-- reading the whole table, and kept doing so as the table grew: after
-- 20,000 runs that took half of the trigger's time, and the more runs the
-- table held, the more each status change cost until autovacuum analyzed
-- it (a minute or more later).
ALTER FUNCTION notify_statuses()
    SET enable_seqscan = off
    SET enable_hashjoin = off
    SET enable_mergejoin = off;
