//! The SQL of the PostgreSQL registry: each write applied inside the
//! writer's transaction, and the queries that read runs back.
//!
//! The status rules are not decided here: a status change is applied only
//! from the statuses [`RunStatus::can_become`] allows, passed to the
//! statement, so that two nodes racing to end one run are ordered by the
//! row lock and exactly one of them changes it.

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::ClientWrapper;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row, Statement, Transaction};

use crate::error::Error;
use crate::registry::retention::nanos_clamped;
use crate::registry::writer::{Outcome, Write};
use crate::registry::{
    Cleanup, Ended, Existing, NodeStatus, RunCursor, RunFilter, RunSummary, SUMMARY_COLUMNS, Taken,
    Tally, Wanted, check_replace, listing_sql, mark_cut, on_taken, run_columns,
};
use crate::run::{
    EXIT_FAILURE, LogEntry, MAX_PARAMETERS_BYTES, Progress, Run, RunStatus, StatusChange,
};
use crate::sync::LockUnpoisoned;

/// A run's columns as this backend reads them: the shared ones, then the
/// node that executes it and its attempt.
const PG_RUN_COLUMNS: &str = concat!(run_columns!(), ", node, attempt");

/// The inserts of new runs come in two forms. Usually an id already taken
/// writes nothing (`ON CONFLICT ... DO NOTHING`), and the caller, seeing
/// fewer rows, takes the way that decides what to do with it. In a batch
/// sent in one trip (BEGIN to COMMIT) nothing can be decided between the
/// statements, so there the strict form fails instead, and the whole
/// batch is rolled back and sent again the longer way.
macro_rules! insert_run {
    ($on_conflict:literal) => {
        concat!(
            "WITH r AS (INSERT INTO runs (run_id, module_id, module_name, status, \
             created_at, started_at, completed_at, parameters, exit_code, error_message, output, \
             progress_fraction, progress_message, module_version, log, history_len, node, \
             max_attempts, priority, not_before) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
             $10, $11, $12, $13, $14, $15, 1, $16, $17, $18, $19) ",
            $on_conflict,
            " RETURNING id) \
             INSERT INTO run_history (run, seq, status, at) SELECT id, 0, $4, $5 FROM r"
        )
    };
}

const INSERT_RUN: &str = insert_run!("ON CONFLICT (run_id) DO NOTHING");
const STRICT_INSERT_RUN: &str = insert_run!("");

const UPDATE_RUN: &str = "UPDATE runs SET module_id = $2, module_name = $3, status = $4, \
     created_at = $5, started_at = $6, completed_at = $7, parameters = $8, exit_code = $9, \
     error_message = $10, output = $11, progress_fraction = $12, progress_message = $13, \
     module_version = $14, log = $15, history_len = $16, priority = $17, not_before = $18 \
     WHERE run_id = $1";

const CURRENT: &str =
    "SELECT id, status, history_len, module_id FROM runs WHERE run_id = $1 FOR UPDATE";

const ADD_HISTORY: &str =
    "INSERT INTO run_history (run, seq, status, at, message) VALUES ($1, $2, $3, $4, $5)";

/// The columns [`INSERT_MANY`] and [`INSERT_CLAIMED`] write: those of
/// [`run_arrays`], in their order, then the history's length and the node.
macro_rules! new_run_columns {
    () => {
        "run_id, module_id, module_name, status, created_at, started_at, completed_at, \
         parameters, exit_code, error_message, output, progress_fraction, progress_message, \
         module_version, log, max_attempts, priority, not_before, history_len, node"
    };
}

/// Many new runs' columns as rows `u`, from one array per column (the
/// parameters `insert_many` binds), in the column order of
/// [`new_run_columns`].
macro_rules! run_arrays {
    () => {
        "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], \
         $7::int8[], $8::text[], $9::int4[], $10::text[], $11::text[], $12::float8[], \
         $13::text[], $14::text[], $15::text[], $17::int4[], $18::int2[], $19::int8[]) AS u "
    };
}

/// Many new runs in one statement, with their first history rows; the
/// caller compares the rows written with the runs sent (an id taken means
/// fewer). Two forms, as [`INSERT_RUN`] has.
macro_rules! insert_many {
    ($on_conflict:literal) => {
        concat!(
            "WITH r AS (INSERT INTO runs (",
            new_run_columns!(),
            ") SELECT u.*, 1, $16 FROM ",
            run_arrays!(),
            $on_conflict,
            " RETURNING id, status, created_at) \
             INSERT INTO run_history (run, seq, status, at) SELECT id, 0, status, created_at FROM r"
        )
    };
}

const INSERT_MANY: &str = insert_many!("ON CONFLICT (run_id) DO NOTHING");
const STRICT_INSERT_MANY: &str = insert_many!("");

/// Many new runs claimed by this node (`$16`) as they are recorded:
/// `Running`, with two history rows each (queued when created, running
/// when started), in one statement. Two forms, as [`INSERT_RUN`] has.
macro_rules! insert_claimed {
    ($on_conflict:literal) => {
        concat!(
            "WITH r AS (INSERT INTO runs (",
            new_run_columns!(),
            ", attempt) SELECT u.*, 2, $16, 1 FROM ",
            run_arrays!(),
            $on_conflict,
            " RETURNING id, created_at, started_at) \
             INSERT INTO run_history (run, seq, status, at) \
             SELECT id, 0, 'queued', created_at FROM r \
             UNION ALL SELECT id, 1, 'running', started_at FROM r"
        )
    };
}

const INSERT_CLAIMED: &str = insert_claimed!("ON CONFLICT (run_id) DO NOTHING");
const STRICT_INSERT_CLAIMED: &str = insert_claimed!("");

/// The form of `sql` that fails on an id already taken, for a batch sent
/// in one trip; `sql` itself for every other statement.
fn strict(sql: &'static str) -> &'static str {
    match sql {
        INSERT_RUN => STRICT_INSERT_RUN,
        INSERT_MANY => STRICT_INSERT_MANY,
        INSERT_CLAIMED => STRICT_INSERT_CLAIMED,
        other => other,
    }
}

/// Runs' changes to one active status `$2`, from the statuses in `$4`, in
/// one statement (for one run as for many); answers the runs changed
/// with their modules. A change with an attempt (`$6`) is fenced: it
/// applies only while the run is that attempt, executed by node `$7`.
const MOVE_MANY: &str = "WITH c AS (SELECT * FROM unnest($1::text[], $3::bigint[], $5::text[], \
     $6::int4[]) AS c(run_id, at, message, attempt)), \
     u AS (UPDATE runs r SET status = $2, started_at = c.at, history_len = r.history_len + 1 \
     FROM c WHERE r.run_id = c.run_id AND r.status = ANY($4) \
     AND (c.attempt IS NULL OR (r.node = $7 AND c.attempt IN (0, r.attempt))) \
     RETURNING r.id, r.history_len, r.run_id, r.module_id, c.at, c.message), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, $2, at, message FROM u) \
     SELECT run_id, module_id FROM u";

/// Announces the progress of the runs of the query `shown` (run id,
/// module id, fraction, message: at most 30) to the other nodes, in the
/// one notification format their listeners read; none if it would not
/// fit a notification. Said once for every statement that announces
/// progress ([`PROGRESS_MANY`], [`END_MANY`]).
macro_rules! notify_progress {
    () => {
        "SELECT pg_notify(current_schema() || '_events', text)::text FROM (SELECT \
         json_build_object('node', current_setting('modrun.node', true), 'progress', \
         json_agg(json_build_array(run_id, module_id, fraction, message)))::text AS text \
         FROM shown HAVING count(*) > 0) p WHERE octet_length(text) < 7900"
    };
}

/// Runs' ends in one terminal status `$2`, from the statuses in `$7`;
/// fenced as [`MOVE_MANY`] is (attempts `$10`, node `$11`). With each,
/// the run's latest progress where the batch took one (`$12`, `$13`; NULL
/// keeps the progress the run has), announced as [`PROGRESS_MANY`]
/// announces progress, before the end is (the status trigger announces
/// at the end of the statement): in the end's statement, not one of its
/// own, which cost a one-at-a-time run about a seventh of its time.
const END_MANY: &str = concat!(
    "WITH c AS (SELECT * FROM unnest($1::text[], $3::bigint[], \
     $4::int4[], $5::text[], $6::text[], $8::text[], $9::text[], $10::int4[], $12::float8[], \
     $13::text[]) \
     AS c(run_id, at, exit_code, error_message, output, log, message, attempt, fraction, \
     progress)), \
     u AS (UPDATE runs r SET status = $2, completed_at = c.at, exit_code = c.exit_code, \
     error_message = c.error_message, output = coalesce(c.output, r.output), \
     log = coalesce(c.log, r.log), history_len = r.history_len + 1, \
     progress_fraction = coalesce(c.fraction, r.progress_fraction), \
     progress_message = CASE WHEN c.fraction IS NULL THEN r.progress_message \
     ELSE c.progress END \
     FROM c WHERE r.run_id = c.run_id AND r.status = ANY($7) \
     AND (c.attempt IS NULL OR (r.node = $11 AND c.attempt IN (0, r.attempt))) \
     RETURNING r.id, r.history_len, r.run_id, r.module_id, c.at, c.message, c.fraction, \
     c.progress), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, $2, at, message FROM u), \
     shown AS (SELECT run_id, module_id, fraction, left(progress, 100) AS message FROM u \
     WHERE fraction IS NOT NULL ORDER BY random() LIMIT 30), \
     told AS (",
    notify_progress!(),
    ") SELECT run_id, module_id FROM u WHERE (SELECT count(*) FROM told) >= 0"
);

const PROGRESS: &str = "UPDATE runs SET progress_fraction = $2, progress_message = $3 \
     WHERE run_id = $1 AND status IN ('queued', 'running') RETURNING module_id";

/// The latest progress of many runs in one statement, announced to the
/// other nodes in one notification: at most 30 runs of the batch (picked
/// at random, so none is always left out; progress is latest-wins), their
/// messages cut, and none if it would not fit a notification. Only runs
/// this node (`$4`) holds: a node that lost a run cannot report for it.
/// The progress of a run the same batch ends is not here: its end writes
/// and announces it ([`END_MANY`]).
///
/// The runs are found by id alone. A run still active is one not ended,
/// not one in `('queued', 'running')`: stated so, the planner may find the
/// node's runs by the partial index of active runs, which keeps an entry
/// for every run the node ended since the table was last vacuumed (a
/// status change is never a HOT update), and read each of them. Found
/// that way, progress cost the writer 2 ms a batch after 100,000 runs,
/// more than the batch's starts and ends together.
const PROGRESS_MANY: &str = concat!(
    "WITH u AS (UPDATE runs r SET progress_fraction = p.fraction, \
     progress_message = p.message \
     FROM unnest($1::text[], $2::float8[], $3::text[]) AS p(run_id, fraction, message) \
     WHERE r.run_id = p.run_id AND r.status NOT IN ('completed', 'failed', 'cancelled') \
     AND r.node = $4 \
     RETURNING r.run_id, r.module_id, p.fraction, left(p.message, 100) AS message), \
     shown AS (SELECT * FROM u ORDER BY random() LIMIT 30) ",
    notify_progress!()
);

/// Renews this node's lease (`$2` milliseconds from now, server time),
/// with the module versions it can run (`$3`, NULL while not known) and
/// the application name of its listening session (`$4`).
const RENEW: &str = "INSERT INTO nodes \
     (node_id, started_at, heartbeat_at, lease_until, versions, listener) \
     VALUES ($1, now(), now(), now() + $2::bigint * interval '1 millisecond', $3, $4) \
     ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = now(), lease_until = excluded.lease_until, \
     versions = excluded.versions, listener = excluded.listener";

/// How the application name of every node's listening session begins
/// (the rest is its own): see [`RESCUE`].
pub(super) const LISTENER_PREFIX: &str = "modrun-listener ";

/// Settles the queued runs no live node can run: their module, at the
/// version they were started with, is loaded nowhere (it changed or was
/// removed after they were queued). Only runs queued for longer than a
/// lease (`$3` ms before `$1`), so that a node that just loaded a version
/// has published it; and only by a node that knows its own versions
/// (`$4` not NULL), so that a cluster starting up fails nothing. A row
/// another transaction holds (a claim) is left for the next heartbeat:
/// a heartbeat never waits on another node's lock. The rows are found by
/// id alone, as [`CLAIM`] finds them.
const STRANDED: &str = "WITH c AS (SELECT r.id FROM runs r \
     WHERE r.status = 'queued' AND r.node IS NULL AND $4::text[] IS NOT NULL \
     AND r.created_at < $1 - $3::bigint * 1000000 AND NOT EXISTS (SELECT 1 FROM nodes n \
     WHERE n.lease_until >= now() \
     AND r.module_id || '@' || coalesce(r.module_version, '') = ANY(n.versions)) \
     FOR UPDATE OF r SKIP LOCKED), \
     s AS (UPDATE runs r SET status = 'failed', completed_at = $1, \
     exit_code = $2, error_message = 'no node can run it: module ' || r.module_id || \
     CASE WHEN r.module_version IS NULL THEN '' ELSE ' at version ' || r.module_version END || \
     ' is loaded on no live node (it changed or was removed after the run was queued); \
     start the run again', history_len = r.history_len + 1 \
     FROM c WHERE r.id = c.id RETURNING r.id, r.history_len, r.error_message), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, 'failed', $1, error_message FROM s) \
     SELECT count(*) FROM s";

/// Claims the due queued runs for node `$5` at `$6`: for each module and
/// version of `$1` and `$2`, at most `$3` runs, and `$4` in all; higher
/// priority first, then the one due first (its not-before time, or its
/// creation), then the one queued first; skipping the rows other nodes
/// are claiming. Marks them `Running` for this node, counts the attempt,
/// writes their history, and answers them.
///
/// A picked run whose parameters are longer than `$7` bytes (no modrun
/// node starts one: the row is another program's, or a hostile node's)
/// is recorded `Failed` instead, with exit code `$8`, and not answered:
/// the node reads no parameters over that bound. (The claimer, answered
/// fewer runs than it asked for, takes the module for drained until the
/// next notice or poll.) Nor does the claim read what an earlier attempt
/// left (output, log, error, progress: the run starts afresh), and it
/// reads at most 1,000 characters of a module name.
///
/// The update finds the picked rows by id alone. They are locked, so they
/// are still queued for no node; restating that would let the planner,
/// with statistics from when the table was small, join by a scan of every
/// queued run for each picked one (a claim of 128 runs among 10,000
/// queued took 250 ms so, and a burst of starts fell to a sixth of its
/// speed).
pub(super) const CLAIM: &str = "WITH w AS \
     (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) AS w(module_id, version, n)), \
     picked AS (SELECT p.id, p.size > $7::int8 AS big, p.size FROM w CROSS JOIN LATERAL \
     (SELECT r.id, r.priority, coalesce(r.not_before, r.created_at) AS due, \
     octet_length(r.parameters) AS size FROM runs r \
     WHERE r.status = 'queued' AND r.node IS NULL AND r.module_id = w.module_id \
     AND r.module_version = w.version AND (r.not_before IS NULL OR r.not_before <= $6) \
     ORDER BY r.priority DESC, coalesce(r.not_before, r.created_at), r.id LIMIT w.n \
     FOR UPDATE SKIP LOCKED) p ORDER BY p.priority DESC, p.due, p.id LIMIT $4), \
     u AS (UPDATE runs r SET status = CASE WHEN big THEN 'failed' ELSE 'running' END, \
     started_at = CASE WHEN big THEN NULL ELSE $6 END, node = $5, \
     attempt = r.attempt + 1, history_len = r.history_len + 1, \
     completed_at = CASE WHEN big THEN $6 ELSE r.completed_at END, \
     exit_code = CASE WHEN big THEN $8::int4 ELSE r.exit_code END, \
     error_message = CASE WHEN big THEN 'its parameters are ' || size \
     || ' bytes of JSON, more than the ' || $7::int8 || ' a run takes: no node reads them' \
     ELSE r.error_message END \
     FROM picked WHERE r.id = picked.id RETURNING r.*), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, status, $6, \
     CASE WHEN status = 'failed' THEN error_message END FROM u) \
     SELECT run_id, module_id, left(module_name, 1000), status, created_at, started_at, \
     completed_at, parameters, exit_code, NULL::text, NULL::text, NULL::float8, NULL::text, \
     module_version, NULL::text, priority, not_before, node, attempt FROM u \
     WHERE status = 'running' \
     ORDER BY priority DESC, coalesce(not_before, created_at), id";

/// Gives runs node `$2` claimed but did not start back to the queue,
/// `Queued` again for any node, with `$4` in their history at `$3`.
/// Answers them with their modules.
pub(super) const RELEASE: &str = "WITH u AS (UPDATE runs r SET status = 'queued', node = NULL, \
     started_at = NULL, history_len = r.history_len + 1 \
     WHERE r.run_id = ANY($1) AND r.node = $2 AND r.status = 'running' \
     RETURNING r.id, r.history_len, r.run_id, r.module_id), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, 'queued', $3, $4 FROM u) \
     SELECT run_id, module_id FROM u";

/// The active runs node `$1` holds.
pub(super) const CLAIMED: &str =
    "SELECT run_id FROM runs WHERE node = $1 AND status IN ('queued', 'running')";

/// The module versions unclaimed queued runs were started on.
pub(super) const QUEUED_VERSIONS: &str = "SELECT DISTINCT \
     left(module_id || '@' || module_version, 1000) \
     FROM runs WHERE status = 'queued' AND node IS NULL AND module_version IS NOT NULL";

/// The earliest not-before time later than `$1` of the runs queued for
/// any node: the first entry of an index of only those runs. (Not
/// `min()`, which the server answers by reading every later one.)
const NEXT_DUE: &str = "SELECT not_before FROM runs \
     WHERE status = 'queued' AND node IS NULL AND not_before IS NOT NULL AND not_before > $1 \
     ORDER BY not_before LIMIT 1";

/// The earliest not-before time later than `after` of the runs queued
/// for any node ([`NEXT_DUE`]).
pub(super) async fn next_due(
    client: &Client,
    after: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, tokio_postgres::Error> {
    let row = client.query_opt(NEXT_DUE, &[&nanos(after)]).await?;
    Ok(row.map(|row| DateTime::from_timestamp_nanos(row.get(0))))
}

/// Names the session's node in the status changes it announces.
pub(super) const SESSION_NODE: &str = "SELECT set_config('modrun.node', $1, false)";

/// Settles the active runs of nodes without a live lease: `Failed`, with
/// the node named; `Cancelled` if a cancel was asked; or, for a running
/// run of a module that opted in with attempts left, `Queued` again for
/// any node (its history says why). The status condition is checked
/// again under the row lock, so a run its node completed meanwhile keeps
/// its end. Node rows whose lease ran out go with it (a node that comes
/// back renews anew).
///
/// Nothing is settled until the server has been up for a lease (`$3` ms):
/// while it was down no node could renew, and every live node gets a
/// lease's time to do so before it counts as lost.
///
/// A row another transaction holds is left for the next heartbeat: a
/// node frozen in the middle of its own heartbeat holds its node row, and
/// every other node's heartbeat (its own renewal with it) would wait on
/// it for as long as it stays frozen.
///
/// The listening session of a node whose row goes is ended: frozen, the
/// node no longer reads its notifications, and the server would keep them
/// all for it until its queue is full and no write can announce a change.
/// Only a session of this database that this role may end, and named as
/// listeners are (`$5`: [`LISTENER_PREFIX`]), whatever a node's row says.
/// A node that comes back listens again, and reads what it missed from
/// the history. The statement's second column is how many were ended.
const RESCUE: &str = "WITH settled AS (SELECT pg_postmaster_start_time() \
     < now() - $3::bigint * interval '1 millisecond' AS up), \
     gone AS (DELETE FROM nodes WHERE node_id IN (SELECT node_id FROM nodes \
     WHERE lease_until < now() AND (SELECT up FROM settled) FOR UPDATE SKIP LOCKED) \
     RETURNING listener), \
     ended AS (SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a \
     JOIN gone g ON a.application_name = g.listener \
     WHERE starts_with(g.listener, $5) AND a.datname = current_database() \
     AND a.pid <> pg_backend_pid() AND pg_has_role(a.usesysid, 'USAGE')), \
     doomed AS (SELECT r.id, coalesce(r.node, 'an unknown node') AS node, r.status, r.attempt, \
     r.max_attempts, r.cancel_requested_at IS NOT NULL AS cancel, \
     r.status = 'running' AND r.cancel_requested_at IS NULL \
     AND r.attempt BETWEEN 1 AND r.max_attempts - 1 \
     AS again FROM runs r \
     WHERE r.status IN ('queued', 'running') AND (SELECT up FROM settled) \
     AND NOT (r.status = 'queued' AND r.node IS NULL) AND NOT EXISTS \
     (SELECT 1 FROM nodes n WHERE n.node_id = r.node AND n.lease_until >= now()) \
     FOR UPDATE OF r SKIP LOCKED), \
     lost AS (UPDATE runs r SET \
     status = CASE WHEN d.again THEN 'queued' WHEN d.cancel THEN 'cancelled' ELSE 'failed' END, \
     node = CASE WHEN d.again THEN NULL ELSE r.node END, \
     started_at = CASE WHEN d.again THEN NULL ELSE r.started_at END, \
     completed_at = CASE WHEN d.again THEN NULL ELSE $1::bigint END, \
     exit_code = CASE WHEN d.again THEN NULL WHEN d.cancel THEN $4::integer \
     ELSE $2::integer END, \
     error_message = CASE WHEN d.again THEN NULL \
     WHEN d.cancel THEN 'cancelled by user (settled for ' || d.node || ', which was lost)' \
     ELSE 'node lost: ' || d.node || ' stopped renewing its lease while the run was ' \
     || d.status END, \
     history_len = r.history_len + 1 \
     FROM doomed d WHERE r.id = d.id \
     RETURNING r.id, r.history_len, r.status, CASE WHEN d.again THEN 'node lost: ' || d.node \
     || ' stopped renewing its lease while the run was running; queued again (attempt ' \
     || (d.attempt + 1) || ' of ' || d.max_attempts || ')' ELSE r.error_message END AS message), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, status, $1, message FROM lost) \
     SELECT (SELECT count(*) FROM lost), (SELECT count(*) FROM ended)";

/// Until [`NAMED`], in this transaction, changes are announced as no
/// node's.
const ANONYMOUS: &str = "SELECT set_config('modrun.node', '', true)";

/// Changes are announced as this node's (`$1`) again.
const NAMED: &str = "SELECT set_config('modrun.node', $1, true)";

/// Cancels a run that is queued for no node yet: no node has claimed it,
/// so none needs telling. Answers how many (0 or 1).
const CANCEL_QUEUED: &str = "WITH q AS (UPDATE runs SET status = 'cancelled', completed_at = $2, \
     exit_code = $3, error_message = $4, history_len = history_len + 1 \
     WHERE run_id = $1 AND status = 'queued' AND node IS NULL RETURNING id, history_len), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, 'cancelled', $2, $4 FROM q) \
     SELECT count(*) FROM q";

/// Records the intent to cancel an active run and tells the node that
/// executes it, in one transaction; answers that node.
const REQUEST_CANCEL: &str = "WITH c AS (UPDATE runs SET cancel_requested_at = $2 \
     WHERE run_id = $1 AND status IN ('queued', 'running') RETURNING run_id, node) \
     SELECT node, pg_notify(current_schema() || '_control', \
     json_build_object('run_id', run_id, 'node', node)::text)::text FROM c";

/// The runs this node executes whose cancel was asked elsewhere: read at
/// each heartbeat, in case a notification was missed, and when the
/// listener (re)connects.
pub(super) const PENDING_CANCELS: &str = "SELECT run_id FROM runs WHERE node = $1 \
     AND status IN ('queued', 'running') AND cancel_requested_at IS NOT NULL";

/// Keeps a module version's bytes (`$3`) by hash, unless kept already.
pub(super) const STORE_MODULE: &str = "INSERT INTO module_versions (hash, module_id, bytes, \
     stored_at) VALUES ($1, $2, $3, $4) ON CONFLICT (hash) DO NOTHING";

pub(super) const HAS_MODULE: &str = "SELECT 1 FROM module_versions WHERE hash = $1";

pub(super) const MODULE_BYTES: &str = "SELECT left(module_id, 1000), \
     CASE WHEN octet_length(bytes) <= $2::int8 THEN bytes END, octet_length(bytes) \
     FROM module_versions WHERE hash = $1";

/// Publishes version `$2` of module `$1`, from a file modified at `$3`, as
/// the one every node runs, unless the version published is the same or
/// comes from a file modified as late or later.
pub(super) const PUBLISH_HEAD: &str = "INSERT INTO module_heads AS h (module_id, hash, \
     modified, node, published_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (module_id) DO \
     UPDATE SET hash = EXCLUDED.hash, modified = EXCLUDED.modified, node = EXCLUDED.node, \
     published_at = EXCLUDED.published_at \
     WHERE h.hash <> EXCLUDED.hash AND h.modified < EXCLUDED.modified";

/// Every module's head. Text another node wrote is read cut (here and in
/// the queries below): a value over the cut is no id, hash or name modrun
/// writes, so it matches none, and a hostile row cannot make a node read
/// more than that.
pub(super) const HEADS: &str = "SELECT left(module_id, 1000), left(hash, 1000), modified, \
     left(node, 1000) FROM module_heads";

/// Announces payloads (`$1`) to the nodes, in order: log lines a node's
/// runs wrote.
pub(super) const ANNOUNCE: &str =
    "SELECT pg_notify(current_schema() || '_events', p) FROM unnest($1::text[]) p";

/// The status changes recorded since `$1` (nanoseconds), oldest first, at
/// most `$2`: what a listener that lost notifications reads again. Only
/// active runs and runs finished since then can have changed (both
/// indexed), and only their history from then on is read. A message is
/// read cut a little over the longest a node records (16 KiB and a mark).
pub(super) const CHANGED_SINCE: &str = "SELECT r.run_id, left(r.module_id, 1000), h.status, \
     h.at, left(h.message, 17000) \
     FROM runs r JOIN run_history h ON h.run = r.id \
     WHERE (r.status IN ('queued', 'running') OR r.completed_at >= $1) AND h.at >= $1 \
     ORDER BY h.at, h.run, h.seq LIMIT $2";

/// At a node's start, settles the runs its previous process (same node
/// name) left active: `Failed`, interrupted; or, for a run of a module
/// that opted in with attempts left, `Queued` again for any node.
pub(super) const RESTARTED: &str = "WITH doomed AS (SELECT id, \
     status = 'running' AND attempt BETWEEN 1 AND max_attempts - 1 AS again FROM runs \
     WHERE node = $4 AND status IN ('queued', 'running') FOR UPDATE), \
     lost AS (UPDATE runs r SET status = CASE WHEN d.again THEN 'queued' ELSE 'failed' END, \
     node = CASE WHEN d.again THEN NULL ELSE r.node END, \
     started_at = CASE WHEN d.again THEN NULL ELSE r.started_at END, \
     completed_at = CASE WHEN d.again THEN NULL ELSE $1::bigint END, \
     exit_code = CASE WHEN d.again THEN NULL ELSE $2::integer END, \
     error_message = CASE WHEN d.again THEN NULL ELSE $3::text END, \
     history_len = r.history_len + 1 FROM doomed d WHERE r.id = d.id \
     RETURNING r.id, r.history_len, r.status, \
     CASE WHEN d.again THEN $3::text || '; queued again' ELSE $3::text END AS message), \
     h AS (INSERT INTO run_history (run, seq, status, at, message) \
     SELECT id, history_len - 1, status, $1, message FROM lost) \
     SELECT count(*) FROM lost";

const SET_LOG: &str = "UPDATE runs SET log = $2 WHERE run_id = $1";

/// A stopped run's own log, saved by the node that executed it: only while
/// that node (`$3`) still holds the run, so that a node that lost the run
/// (another settled or re-ran it) cannot overwrite the log there.
const SAVE_OWN_LOG: &str = "UPDATE runs SET log = $2 WHERE run_id = $1 AND node = $3";

/// The runs (`r`) a cleanup matches: ended before the latest limit `$1`,
/// in the statuses `$2`, of module `$3` (any if NULL), completed before
/// their module's own limit (`$4`..`$6`: module, status or NULL, limit)
/// or else `$7`.
macro_rules! cleanup_condition {
    () => {
        "r.status IN ('completed', 'failed', 'cancelled') AND r.completed_at < $1 \
         AND r.status = ANY($2) AND ($3::text IS NULL OR r.module_id = $3) \
         AND r.completed_at < coalesce((SELECT o.before FROM unnest($4::text[], $5::text[], \
         $6::int8[]) AS o(module, status, before) WHERE o.module = r.module_id \
         AND coalesce(o.status, r.status) = r.status ORDER BY o.status IS NULL LIMIT 1), $7)"
    };
}

/// Removes the runs a cleanup matches, and their history, oldest-ended
/// first, at most `$8`; answers how many runs. One node at a time: a node
/// that finds another removing removes nothing this time.
const REMOVE_FINISHED: &str = concat!(
    "WITH turn AS (SELECT \
     pg_try_advisory_xact_lock(hashtext(current_schema() || ' cleanup')) AS mine), \
     doomed AS (SELECT r.id FROM runs r WHERE (SELECT mine FROM turn) AND ",
    cleanup_condition!(),
    " ORDER BY r.completed_at LIMIT $8 FOR UPDATE SKIP LOCKED), \
     gone AS (DELETE FROM runs WHERE id IN (SELECT id FROM doomed) RETURNING id), \
     h AS (DELETE FROM run_history WHERE run = ANY(ARRAY(SELECT id FROM gone))) \
     SELECT count(*) FROM gone"
);

/// Removes the stored bytes of module versions nothing needs any more:
/// stored before `$1` (nanoseconds), pinned by no queued or running run,
/// loaded by no live node, and published as no module's head. A version stored lately is kept whatever
/// the rest says, so that a node that stored it and is about to queue runs
/// pinned to it, or to publish it, finds it there. One node at a time, as
/// for runs.
const PRUNE_MODULES: &str = "WITH turn AS (SELECT \
     pg_try_advisory_xact_lock(hashtext(current_schema() || ' prune modules')) AS mine) \
     DELETE FROM module_versions m WHERE (SELECT mine FROM turn) AND m.stored_at < $1 \
     AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.module_version = m.hash \
     AND r.status IN ('queued', 'running')) \
     AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.lease_until >= now() \
     AND m.module_id || '@' || m.hash = ANY(n.versions)) \
     AND NOT EXISTS (SELECT 1 FROM module_heads h WHERE h.hash = m.hash)";

/// How long a stored module version is kept before it may be pruned.
pub(super) const MODULE_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

/// How many runs a cleanup matches.
const COUNT_FINISHED: &str = concat!("SELECT count(*) FROM runs r WHERE ", cleanup_condition!());

/// The node a writer records runs for, how long its lease lasts, and
/// where it hands the cancels other nodes asked of it.
pub(super) struct Node {
    pub(super) id: String,
    /// The application name of its listening session.
    pub(super) listener: String,
    pub(super) lease: std::time::Duration,
    pub(super) cancels: std::sync::Arc<CancelSink>,
    /// The module versions it can run, as `<module>@<hash>`; `None` until
    /// its runner says.
    pub(super) versions: std::sync::Arc<std::sync::Mutex<Option<Vec<String>>>>,
    /// When its last renewal that committed began.
    pub(super) renewed: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Node {
    fn versions(&self) -> Option<Vec<String>> {
        self.versions.lock_unpoisoned().clone()
    }
}

/// Where a node's store hands the ids of runs whose cancel another node
/// asked for: to its registry, once connected ([`RunStore::connect_events`]).
#[derive(Default)]
pub(super) struct CancelSink(std::sync::OnceLock<tokio::sync::mpsc::Sender<String>>);

impl CancelSink {
    pub(super) fn connect(&self, cancels: tokio::sync::mpsc::Sender<String>) {
        let _ = self.0.set(cancels);
    }

    /// Hands over a request; a full channel drops it (the next heartbeat
    /// reads it again).
    pub(super) fn send(&self, run_id: String) {
        if let Some(cancels) = self.0.get() {
            let _ = cancels.try_send(run_id);
        }
    }
}

/// Statements prepared on the writer's connection, by their text.
#[derive(Default)]
pub(super) struct Prepared(HashMap<&'static str, Statement>);

impl Prepared {
    async fn get(
        &mut self,
        tx: &impl GenericClient,
        sql: &'static str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = tx.prepare(sql).await?;
        self.0.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// Applies one write inside the batch's transaction, waiting for each
/// answer. `Err` is a database failure (it aborts the batch); a refusal
/// by the status rules is `Ok(Outcome::Failed)` and writes nothing.
pub(super) async fn apply(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    node: &Node,
    write: &Write,
) -> Result<Outcome, tokio_postgres::Error> {
    if let Some(key) = write.key() {
        return apply_keyed(tx, prepared, node, write, key).await;
    }
    apply_unkeyed(tx, prepared, node, write).await
}

/// A new run's write with an idempotency key: applied unless another run
/// (recorded by any node) holds the key, in which case that write alone
/// fails naming it. Two nodes recording the same key at once take turns
/// on a lock for it.
async fn apply_keyed(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    node: &Node,
    write: &Write,
    key: &str,
) -> Result<Outcome, tokio_postgres::Error> {
    let key = clean(key);
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('modrun idempotency ' || $1))",
        &[&key],
    )
    .await?;
    let holder = tx
        .query_opt(
            "SELECT run_id FROM runs WHERE idempotency_key = $1",
            &[&key],
        )
        .await?;
    if let Some(holder) = holder {
        return Ok(Outcome::Failed(Error::IdempotencyKeyReused {
            key: key.into_owned(),
            run_id: holder.get(0),
        }));
    }
    let outcome = apply_unkeyed(tx, prepared, node, write).await?;
    if matches!(outcome, Outcome::Done) {
        let run_id = match write {
            Write::Insert(run, ..) | Write::Enqueue(run, ..) => clean(&run.run_id),
            _ => unreachable!("only a new run's write has a key"),
        };
        tx.execute(
            "UPDATE runs SET idempotency_key = $2 WHERE run_id = $1",
            &[&run_id, &key],
        )
        .await?;
    }
    Ok(outcome)
}

async fn apply_unkeyed(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    node: &Node,
    write: &Write,
) -> Result<Outcome, tokio_postgres::Error> {
    match write {
        Write::Insert(run, existing, ..) => {
            let owner = Owner {
                node: Some(&node.id),
                max_attempts: 1,
            };
            insert(tx, prepared, owner, run, *existing).await
        }
        Write::Enqueue(run, attempts, ..) if run.status != RunStatus::Running => {
            let owner = Owner {
                node: None,
                max_attempts: *attempts,
            };
            insert(tx, prepared, owner, run, Existing::ReplaceFinished).await
        }
        Write::Enqueue(run, attempts, ..) if run.status == RunStatus::Running => {
            claimed_start(tx, prepared, node, run, *attempts).await
        }
        Write::Replace(run, change, _) => replace(tx, prepared, run, change.as_ref()).await,
        Write::Claim(..) | Write::Release(..) => Ok(Outcome::Failed(Error::Database {
            path: std::path::PathBuf::from("(PostgreSQL writer)"),
            message: "claims are made on a pooled connection, not by the writer".into(),
        })),
        other => {
            let sent = Sent::new(other, node).expect("only a replace sends nothing up front");
            let mut statements = HashMap::new();
            for sql in statement_of(&sent) {
                statements.insert(*sql, prepared.get(tx, sql).await?);
            }
            let outcome = send(tx, &|sql| &statements[sql], &sent).await?;
            Ok(outcome.unwrap_or_else(|| {
                // A claimed run whose id is taken: never a fresh run's.
                Outcome::Failed(Error::RunActive {
                    run_id: sent.run_id().unwrap_or_default().to_owned(),
                    status: RunStatus::Running,
                })
            }))
        }
    }
}

/// The attempt a fenced change is for, and the node executing it.
#[derive(Clone, Copy)]
struct Fence<'a> {
    attempt: Option<i32>,
    node: &'a str,
}

/// The values one write sends: owned here, so that every write of a batch
/// can be sent before the first answer comes back.
enum Sent<'a> {
    /// A new run, and the node that executes it (`None`: whichever claims it).
    Insert(RunValues<'a>, Option<&'a str>),
    /// A new run this node claimed as it was started: recorded `Running`.
    Claimed(RunValues<'a>, &'a str),
    End {
        run_id: Cow<'a, str>,
        to: &'static str,
        at: i64,
        exit_code: Option<i32>,
        error_message: Option<Cow<'a, str>>,
        output: Option<String>,
        allowed: Vec<&'static str>,
        log: Option<String>,
        message: Option<String>,
        fence: Fence<'a>,
        /// The run's latest progress, when the batch that ends the run
        /// took a report of it.
        progress: Option<(f64, Cow<'a, str>)>,
    },
    Move {
        run_id: Cow<'a, str>,
        to: &'static str,
        at: i64,
        allowed: Vec<&'static str>,
        message: Option<String>,
        fence: Fence<'a>,
    },
    Progress(Cow<'a, str>, f64, Cow<'a, str>),
    /// The progress the batch took of runs it does not end.
    ManyProgress {
        written: ProgressOf<'a>,
        node: &'a str,
    },
    /// A log, and the node whose stopped run it is (fenced), if it is one.
    Log(Cow<'a, str>, Option<String>, Option<&'a str>),
    Cleanup(CleanupValues, i64),
    Heartbeat {
        node: &'a Node,
        lease: i64,
        at: i64,
        exit_codes: [i32; 2],
        versions: Option<Vec<String>>,
    },
    /// The run, when, and the node asking.
    RequestCancel(Cow<'a, str>, i64, &'a str),
    Nothing,
}

impl<'a> Sent<'a> {
    /// Whether the write is one statement, sent as its job is first
    /// polled.
    fn is_one_statement(&self) -> bool {
        matches!(
            self,
            Sent::Insert(..)
                | Sent::Claimed(..)
                | Sent::End { .. }
                | Sent::Move { .. }
                | Sent::Progress(..)
                | Sent::ManyProgress { .. }
                | Sent::Log(..)
                | Sent::Nothing
        )
    }

    /// The run the write is about, if it is about one.
    fn run_id(&self) -> Option<&str> {
        match self {
            Sent::Insert(values, _) | Sent::Claimed(values, _) => Some(&values.run_id),
            Sent::End { run_id, .. }
            | Sent::Move { run_id, .. }
            | Sent::Progress(run_id, ..)
            | Sent::Log(run_id, ..)
            | Sent::RequestCancel(run_id, ..) => Some(run_id),
            _ => None,
        }
    }

    /// The values of `write`; `None` for a write that needs answers before
    /// it knows what to send (a whole-record replace).
    fn new(write: &'a Write, node: &'a Node) -> Option<Sent<'a>> {
        Some(match write {
            Write::Insert(run, ..) => Sent::Insert(RunValues::new(run, 1), Some(&node.id)),
            Write::Enqueue(run, attempts, ..) if run.status == RunStatus::Running => {
                Sent::Claimed(RunValues::new(run, 2).with_attempts(*attempts), &node.id)
            }
            Write::Enqueue(run, attempts, ..) => {
                Sent::Insert(RunValues::new(run, 1).with_attempts(*attempts), None)
            }
            // Claims go through the pool, never through the writer.
            Write::Replace(..) | Write::Claim(..) | Write::Release(..) => return None,
            Write::Transition(change, ..) => {
                let message = change
                    .status_change()
                    .message
                    .map(|m| clean(&m).into_owned());
                let fence = Fence {
                    attempt: change.attempt.and_then(|n| i32::try_from(n).ok()),
                    node: &node.id,
                };
                if change.to.is_terminal() {
                    Sent::End {
                        run_id: clean(&change.run_id),
                        to: change.to.as_str(),
                        at: nanos(change.at),
                        exit_code: change.exit_code,
                        error_message: change.error_message.as_deref().map(clean),
                        output: change.output.as_ref().map(json_text),
                        allowed: allowed_from(change.to),
                        log: change.log.as_deref().and_then(log_text),
                        message,
                        fence,
                        progress: None,
                    }
                } else {
                    Sent::Move {
                        run_id: clean(&change.run_id),
                        to: change.to.as_str(),
                        at: nanos(change.at),
                        allowed: allowed_from(change.to),
                        message,
                        fence,
                    }
                }
            }
            Write::Progress(run_id, progress, _) => {
                Sent::Progress(clean(run_id), progress.fraction, clean(&progress.message))
            }
            // Wake-ups for reports another write's batch took.
            Write::TakenProgress(reports) if reports.is_empty() => Sent::Nothing,
            Write::TakenProgress(reports) => Sent::ManyProgress {
                written: ProgressOf(
                    reports
                        .iter()
                        .map(|(id, p)| (clean(id), p.fraction, clean(&p.message)))
                        .collect(),
                ),
                node: &node.id,
            },
            // Nobody waits: a stopped run's own log.
            Write::Log(run_id, log, None) => {
                Sent::Log(clean(run_id), log_text(log), Some(&node.id))
            }
            Write::Log(run_id, log, Some(_)) => Sent::Log(clean(run_id), log_text(log), None),
            Write::Cleanup(cleanup, limit, _) => Sent::Cleanup(
                CleanupValues::new(cleanup),
                i64::try_from(*limit).unwrap_or(i64::MAX),
            ),
            Write::Heartbeat => Sent::Heartbeat {
                node,
                lease: i64::try_from(node.lease.as_millis()).unwrap_or(i64::MAX),
                at: nanos(Utc::now()),
                exit_codes: [crate::run::EXIT_FAILURE, crate::run::EXIT_CANCELLED],
                versions: node.versions(),
            },
            Write::RequestCancel(run_id, _) => {
                Sent::RequestCancel(clean(run_id), nanos(Utc::now()), &node.id)
            }
            Write::ReportedProgress | Write::Flush(_) | Write::Check | Write::Checkpoint => {
                Sent::Nothing
            }
        })
    }
}

/// Applies a batch with every write's statement sent at once (pipelined:
/// the server runs them in order, and the batch costs about one round
/// trip, not one per write). `Ok(None)` when a write needs more than its
/// one statement (an id already taken, a whole-record replace): the caller
/// rolls back and applies the batch one write at a time instead.
pub(super) async fn apply_pipelined(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    node: &Node,
    batch: &[Write],
) -> Result<Option<Vec<Outcome>>, tokio_postgres::Error> {
    let Some(sent) = sent_of(batch, node) else {
        return Ok(None);
    };
    let statements = prepare_for(tx, prepared, &sent, false).await?;
    let answered = send_all(tx, &|sql| &statements[sql], &sent).await?;
    Ok(outcomes_of(answered, sent.len()))
}

/// The batch's writes as they are sent; `None` if one needs answers
/// before it knows what to write (a keyed start looks first, a
/// whole-record replace reads the record).
fn sent_of<'a>(batch: &'a [Write], node: &'a Node) -> Option<Vec<Sent<'a>>> {
    if batch.iter().any(|write| write.key().is_some()) {
        return None;
    }
    let mut sent = batch
        .iter()
        .map(|write| Sent::new(write, node))
        .collect::<Option<Vec<_>>>()?;
    fold_progress(&mut sent);
    Some(sent)
}

/// Progress reports of runs: (run id, fraction, message) each.
#[derive(Default)]
struct ProgressOf<'a>(Vec<(Cow<'a, str>, f64, Cow<'a, str>)>);

impl ProgressOf<'_> {
    /// The reports as the statement's three arrays.
    fn columns(&self) -> (Vec<&str>, Vec<f64>, Vec<&str>) {
        let ProgressOf(reports) = self;
        (
            reports.iter().map(|(id, ..)| id.as_ref()).collect(),
            reports.iter().map(|(_, fraction, _)| *fraction).collect(),
            reports
                .iter()
                .map(|(.., message)| message.as_ref())
                .collect(),
        )
    }
}

/// Moves the progress the batch took of a run it also ends into that
/// end, as SQLite does: the run's row is written once, not twice (a
/// progress update costs the server as much as half an end), and the end
/// announces the report before itself. The end is fenced as the progress
/// write was (status, node, attempt), so a report lands exactly when it
/// would have. A batch whose reports all went so sends no progress
/// statement.
fn fold_progress(sent: &mut [Sent<'_>]) {
    let Some(at) = sent
        .iter()
        .position(|one| matches!(one, Sent::ManyProgress { .. }))
    else {
        return;
    };
    let (before, rest) = sent.split_at_mut(at + 1);
    let Some(Sent::ManyProgress { written, .. }) = before.last_mut() else {
        unreachable!("found above")
    };
    // A run's first end in the batch: its report came before that.
    let mut ends: HashMap<&str, &mut Option<(f64, Cow<'_, str>)>> = HashMap::new();
    for one in rest.iter_mut() {
        if let Sent::End {
            run_id, progress, ..
        } = one
        {
            let run_id: &Cow<'_, str> = run_id;
            ends.entry(run_id.as_ref()).or_insert(progress);
        }
    }
    if ends.is_empty() {
        return;
    }
    let (kept, folded): (Vec<_>, Vec<_>) = std::mem::take(&mut written.0)
        .into_iter()
        .partition(|(run_id, ..)| !ends.contains_key(run_id.as_ref()));
    for (run_id, fraction, message) in &folded {
        if let Some(progress) = ends.get_mut(run_id.as_ref()) {
            **progress = Some((*fraction, message.clone()));
        }
    }
    let nothing_left = kept.is_empty();
    written.0 = kept;
    if nothing_left {
        sent[at] = Sent::Nothing;
    }
}

/// Sends every write of `sent` (as jobs: alone, or grouped with writes
/// alike), each request as its job is first polled, so all in order, and
/// answers what each job changed.
async fn send_all<'s>(
    tx: &impl GenericClient,
    statement: &impl Fn(&'static str) -> &'s Statement,
    sent: &[Sent<'_>],
) -> Result<Vec<Vec<(usize, Option<Outcome>)>>, tokio_postgres::Error> {
    let jobs = jobs(sent);
    let sends = jobs.iter().map(|job| async {
        Ok::<_, tokio_postgres::Error>(match job {
            Job::One(index) => vec![(*index, send(tx, statement, &sent[*index]).await?)],
            Job::Many(indexes) => send_many(tx, statement, sent, indexes).await?,
        })
    });
    futures_util::future::try_join_all(sends).await
}

/// Applies a batch in one round trip: `BEGIN`, every write's statement
/// and `COMMIT`, sent at once. Only for a batch whose every write is one
/// statement (new runs, status changes, progress and logs: a run's start
/// and its end are the common cases); `Ok(None)` for any other, which
/// takes the transaction's longer way. A statement that fails aborts the
/// transaction on the server, and the `COMMIT` sent with it then rolls it
/// back: nothing of the batch is kept, as on the longer way. A new run
/// whose id is taken fails so (the strict form of its insert), and the
/// batch goes the longer way (`Ok(None)`), which decides what to do.
pub(super) async fn apply_in_one_trip(
    client: &Client,
    prepared: &mut Prepared,
    node: &Node,
    batch: &[Write],
) -> Result<Option<Vec<Outcome>>, tokio_postgres::Error> {
    let Some(sent) = sent_of(batch, node) else {
        return Ok(None);
    };
    if !sent.iter().all(Sent::is_one_statement) {
        return Ok(None);
    }
    // Prepared (once per connection) before the transaction begins.
    let statements = prepare_for(client, prepared, &sent, true).await?;
    // Each request is sent as its future is first polled, and `join3`
    // polls them in order: BEGIN, the statements, COMMIT, in one trip.
    let (begun, answered, committed) = futures_util::future::join3(
        client.batch_execute("BEGIN"),
        send_all(client, &|sql| &statements[sql], &sent),
        client.batch_execute("COMMIT"),
    )
    .await;
    begun?;
    let answered = match answered {
        // Rolled back by the COMMIT sent with it.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(None),
        answered => answered?,
    };
    committed?;
    // Never `None`: a strict insert writes its rows or fails.
    let outcomes = outcomes_of(answered, sent.len());
    debug_assert!(outcomes.is_some(), "a one-statement write has its outcome");
    Ok(outcomes)
}

/// The outcomes of a batch's jobs, in the batch's order; `None` if a
/// write needs more than its statement.
fn outcomes_of(
    answered: Vec<Vec<(usize, Option<Outcome>)>>,
    writes: usize,
) -> Option<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Option<Outcome>>> = (0..writes).map(|_| None).collect();
    for answered in answered {
        for (index, outcome) in answered {
            outcomes[index] = Some(outcome);
        }
    }
    outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every write belongs to one job"))
        .collect()
}

/// The prepared statements the writes of `sent` use.
///
/// `one_trip`: the strict forms of the inserts, kept under the usual
/// ones' names (see [`INSERT_RUN`]).
async fn prepare_for(
    tx: &impl GenericClient,
    prepared: &mut Prepared,
    sent: &[Sent<'_>],
    one_trip: bool,
) -> Result<HashMap<&'static str, Statement>, tokio_postgres::Error> {
    let form = |sql| if one_trip { strict(sql) } else { sql };
    let mut statements = HashMap::new();
    for sql in [
        INSERT_RUN,
        PROGRESS,
        PROGRESS_MANY,
        SET_LOG,
        SAVE_OWN_LOG,
        REMOVE_FINISHED,
        PRUNE_MODULES,
        RENEW,
        ANONYMOUS,
        RESCUE,
        STRANDED,
        NAMED,
        PENDING_CANCELS,
        CANCEL_QUEUED,
        REQUEST_CANCEL,
    ] {
        let needed = sent.iter().any(|sent| statement_of(sent).contains(&sql));
        if needed {
            statements.insert(sql, prepared.get(tx, form(sql)).await?);
        }
    }
    for sql in [INSERT_MANY, INSERT_CLAIMED, MOVE_MANY, END_MANY] {
        statements.insert(sql, prepared.get(tx, form(sql)).await?);
    }
    Ok(statements)
}

/// How the writes of a batch are sent: one by one, or, for many runs
/// changing to the same status, in one statement.
enum Job {
    One(usize),
    Many(Vec<usize>),
}

/// The batch's writes as jobs, in order. Changes are grouped only when no
/// run appears in two of the batch's writes, so that grouping cannot
/// reorder what one run went through.
fn jobs(sent: &[Sent<'_>]) -> Vec<Job> {
    let mut seen = std::collections::HashSet::new();
    let distinct = sent
        .iter()
        .filter_map(Sent::run_id)
        .all(|run_id| seen.insert(run_id));
    let key = |sent: &Sent<'_>| match sent {
        Sent::Insert(_, Some(_)) => Some(("insert", "")),
        Sent::Insert(_, None) => Some(("enqueue", "")),
        Sent::Claimed(..) => Some(("claimed", "")),
        Sent::Move { to, .. } => Some(("move", *to)),
        Sent::End { to, .. } => Some(("end", *to)),
        _ => None,
    };
    let mut jobs = Vec::new();
    let mut groups: HashMap<(&str, &'static str), usize> = HashMap::new();
    for (index, one) in sent.iter().enumerate() {
        match key(one).filter(|_| distinct) {
            Some(key) => match groups.get(&key) {
                Some(&job) => match &mut jobs[job] {
                    Job::Many(indexes) => indexes.push(index),
                    Job::One(first) => jobs[job] = Job::Many(vec![*first, index]),
                },
                None => {
                    groups.insert(key, jobs.len());
                    jobs.push(Job::One(index));
                }
            },
            None => jobs.push(Job::One(index)),
        }
    }
    jobs
}

/// Sends the changes of runs (one or many) to one status in one statement.
async fn send_many<'s>(
    tx: &impl GenericClient,
    statement: &impl Fn(&'static str) -> &'s Statement,
    sent: &[Sent<'_>],
    indexes: &[usize],
) -> Result<Vec<(usize, Option<Outcome>)>, tokio_postgres::Error> {
    let mut ids: Vec<&str> = Vec::new();
    let mut ats: Vec<i64> = Vec::new();
    let mut messages: Vec<Option<&str>> = Vec::new();
    let mut exit_codes: Vec<Option<i32>> = Vec::new();
    let mut errors: Vec<Option<&str>> = Vec::new();
    let mut outputs: Vec<Option<&str>> = Vec::new();
    let mut logs: Vec<Option<&str>> = Vec::new();
    let mut attempts: Vec<Option<i32>> = Vec::new();
    let mut fractions: Vec<Option<f64>> = Vec::new();
    let mut progress_messages: Vec<Option<&str>> = Vec::new();
    let mut node = "";
    match &sent[indexes[0]] {
        Sent::Insert(_, node) => {
            return insert_many(tx, statement(INSERT_MANY), sent, indexes, *node).await;
        }
        Sent::Claimed(_, node) => {
            return insert_many(tx, statement(INSERT_CLAIMED), sent, indexes, Some(node)).await;
        }
        _ => {}
    }
    let (mut status, mut from, mut ends) = ("", &[][..], false);
    for &index in indexes {
        match &sent[index] {
            Sent::Move {
                run_id,
                to,
                at,
                allowed,
                message,
                fence,
            } => {
                (status, from, node) = (*to, allowed.as_slice(), fence.node);
                ids.push(run_id);
                ats.push(*at);
                messages.push(message.as_deref());
                attempts.push(fence.attempt);
            }
            Sent::End {
                run_id,
                to,
                at,
                exit_code,
                error_message,
                output,
                allowed,
                log,
                message,
                fence,
                progress,
            } => {
                (status, from, ends, node) = (*to, allowed.as_slice(), true, fence.node);
                fractions.push(progress.as_ref().map(|(fraction, _)| *fraction));
                progress_messages.push(progress.as_ref().map(|(_, message)| message.as_ref()));
                attempts.push(fence.attempt);
                ids.push(run_id);
                ats.push(*at);
                messages.push(message.as_deref());
                exit_codes.push(*exit_code);
                errors.push(error_message.as_deref());
                outputs.push(output.as_deref());
                logs.push(log.as_deref());
            }
            _ => unreachable!("only status changes are grouped"),
        }
    }
    let rows = if ends {
        tx.query(
            statement(END_MANY),
            &[
                &ids,
                &status,
                &ats,
                &exit_codes,
                &errors,
                &outputs,
                &from,
                &logs,
                &messages,
                &attempts,
                &node,
                &fractions,
                &progress_messages,
            ],
        )
        .await?
    } else {
        tx.query(
            statement(MOVE_MANY),
            &[&ids, &status, &ats, &from, &messages, &attempts, &node],
        )
        .await?
    };
    let changed: HashMap<&str, String> = rows
        .iter()
        .map(|row| (row.get::<_, &str>(0), row.get::<_, String>(1)))
        .collect();
    Ok(indexes
        .iter()
        .zip(&ids)
        .map(|(&index, run_id)| (index, Some(Outcome::Applied(changed.get(run_id).cloned()))))
        .collect())
}

/// Sends one write's statements; `None` when the write needs more than
/// them (an insert whose id is taken).
async fn send<'s>(
    tx: &impl GenericClient,
    statement: &impl Fn(&'static str) -> &'s Statement,
    sent: &Sent<'_>,
) -> Result<Option<Outcome>, tokio_postgres::Error> {
    Ok(match sent {
        Sent::Insert(values, node) => {
            let params = values.insert_params(node);
            if tx.execute(statement(INSERT_RUN), &params).await? == 1 {
                Some(Outcome::Done)
            } else {
                None
            }
        }
        Sent::Move { .. } | Sent::End { .. } | Sent::Claimed(..) => {
            let mut changed = send_many(tx, statement, std::slice::from_ref(sent), &[0]).await?;
            changed.pop().and_then(|(_, outcome)| outcome)
        }
        Sent::Progress(run_id, fraction, message) => {
            let row = tx
                .query_opt(statement(PROGRESS), &[run_id, fraction, message])
                .await?;
            Some(Outcome::Applied(row.map(|row| row.get(0))))
        }
        Sent::ManyProgress { written, node } => {
            let (ids, fractions, messages) = written.columns();
            tx.query(
                statement(PROGRESS_MANY),
                &[&ids, &fractions, &messages, node],
            )
            .await?;
            Some(Outcome::Done)
        }
        Sent::Log(run_id, log, own) => {
            let changed = match own {
                None => tx.execute(statement(SET_LOG), &[run_id, log]).await?,
                Some(node) => {
                    tx.execute(statement(SAVE_OWN_LOG), &[run_id, log, node])
                        .await?
                }
            };
            Some(Outcome::Count(
                usize::try_from(changed).unwrap_or(usize::MAX),
            ))
        }
        Sent::Cleanup(values, limit) => {
            let mut params = values.params();
            params.push(limit);
            let deleted: i64 = tx
                .query_one(statement(REMOVE_FINISHED), &params)
                .await?
                .get(0);
            // With the runs go the module versions only they needed.
            let grace = i64::try_from(MODULE_GRACE.as_nanos()).unwrap_or(i64::MAX);
            let before = nanos_clamped(Utc::now()).saturating_sub(grace);
            let pruned = tx.execute(statement(PRUNE_MODULES), &[&before]).await?;
            if pruned > 0 {
                tracing::info!(
                    versions = pruned,
                    "removed module versions no run or node needs"
                );
            }
            Some(Outcome::Count(
                usize::try_from(deleted).unwrap_or(usize::MAX),
            ))
        }
        Sent::Heartbeat {
            node,
            lease,
            at,
            exit_codes: [failed, cancelled],
            versions,
        } => {
            // The runs settled are announced as nobody's, so that this
            // node's own listener publishes them too (the store, not the
            // registry, changed them). Prepared statements, sent in order.
            let ((_, _, rescued, stranded), (_, pending)) = futures_util::future::try_join(
                futures_util::future::try_join4(
                    tx.execute(
                        statement(RENEW),
                        &[&node.id, lease, versions, &node.listener],
                    ),
                    tx.execute(statement(ANONYMOUS), &[]),
                    tx.query_one(
                        statement(RESCUE),
                        &[at, failed, lease, cancelled, &LISTENER_PREFIX],
                    ),
                    tx.query_one(statement(STRANDED), &[at, failed, lease, versions]),
                ),
                futures_util::future::try_join(
                    tx.execute(statement(NAMED), &[&node.id]),
                    tx.query(statement(PENDING_CANCELS), &[&node.id]),
                ),
            )
            .await?;
            let stranded: i64 = stranded.get(0);
            if stranded > 0 {
                tracing::warn!(
                    runs = stranded,
                    "failed queued runs whose module version no live node has loaded"
                );
            }
            for row in pending {
                node.cancels.send(row.get(0));
            }
            let (lost, ended): (i64, i64) = (rescued.get(0), rescued.get(1));
            if lost > 0 {
                tracing::warn!(
                    runs = lost,
                    "settled the runs of nodes that stopped renewing their lease"
                );
            }
            if ended > 0 {
                tracing::warn!(
                    sessions = ended,
                    "ended the listening sessions of nodes that stopped renewing their lease"
                );
            }
            Some(Outcome::Done)
        }
        Sent::RequestCancel(run_id, at, node_id) => {
            // A run no node has claimed is cancelled here and now, and
            // announced as nobody's, so that this node's listener publishes
            // it too; a claimed one is its node's to stop.
            let reason = crate::manager::CancelReason::User.to_string();
            let (_, queued, _, row) = futures_util::future::try_join4(
                tx.execute(statement(ANONYMOUS), &[]),
                tx.query_one(
                    statement(CANCEL_QUEUED),
                    &[run_id, at, &crate::run::EXIT_CANCELLED, &reason],
                ),
                tx.execute(statement(NAMED), &[node_id]),
                tx.query_opt(statement(REQUEST_CANCEL), &[run_id, at]),
            )
            .await?;
            if queued.get::<_, i64>(0) == 1 {
                return Ok(Some(Outcome::Applied(Some(String::new()))));
            }
            // An active run recorded by an older modrun has no node.
            let node: Option<Option<String>> = row.map(|row| row.get(0));
            Some(Outcome::Applied(node.map(Option::unwrap_or_default)))
        }
        Sent::Nothing => Some(Outcome::Done),
    })
}

/// Inserts many new runs in one statement. `None` for every one of them
/// if any id was taken: the batch then goes write by write.
async fn insert_many<'a>(
    tx: &impl GenericClient,
    statement: &Statement,
    sent: &'a [Sent<'a>],
    indexes: &[usize],
    node: Option<&str>,
) -> Result<Vec<(usize, Option<Outcome>)>, tokio_postgres::Error> {
    let runs: Vec<&'a RunValues<'a>> = indexes
        .iter()
        .map(|&index| match &sent[index] {
            Sent::Insert(values, _) | Sent::Claimed(values, _) => values,
            _ => unreachable!("only inserts are grouped with inserts"),
        })
        .collect();
    let texts =
        |get: fn(&'a RunValues<'a>) -> &'a str| runs.iter().map(|r| get(r)).collect::<Vec<_>>();
    let optional = |get: fn(&'a RunValues<'a>) -> Option<&'a str>| {
        runs.iter().map(|r| get(r)).collect::<Vec<_>>()
    };
    let written = tx
        .execute(
            statement,
            &[
                &texts(|r| &r.run_id),
                &texts(|r| &r.module_id),
                &texts(|r| &r.module_name),
                &texts(|r| r.status),
                &runs.iter().map(|r| r.created_at).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.started_at).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.completed_at).collect::<Vec<_>>(),
                &texts(|r| &r.parameters),
                &runs.iter().map(|r| r.exit_code).collect::<Vec<_>>(),
                &optional(|r| r.error_message.as_deref()),
                &optional(|r| r.output.as_deref()),
                &runs.iter().map(|r| r.fraction).collect::<Vec<_>>(),
                &optional(|r| r.progress_message.as_deref()),
                &optional(|r| r.module_version.as_deref()),
                &optional(|r| r.log.as_deref()),
                &node,
                &runs.iter().map(|r| r.max_attempts).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.priority).collect::<Vec<_>>(),
                &runs.iter().map(|r| r.not_before).collect::<Vec<_>>(),
            ],
        )
        .await?;
    // The rows written are history rows: one per run, or two if claimed.
    let per_run = if matches!(sent[indexes[0]], Sent::Claimed(..)) {
        2
    } else {
        1
    };
    let all = written == indexes.len() as u64 * per_run;
    Ok(indexes
        .iter()
        .map(|&index| (index, all.then_some(Outcome::Done)))
        .collect())
}

/// The statements a write sends.
fn statement_of(sent: &Sent<'_>) -> &'static [&'static str] {
    match sent {
        Sent::Insert(..) => &[INSERT_RUN],
        Sent::Claimed(..) => &[INSERT_CLAIMED],
        Sent::End { .. } => &[END_MANY],
        Sent::Move { .. } => &[MOVE_MANY],
        Sent::Progress(..) => &[PROGRESS],
        Sent::ManyProgress { .. } => &[PROGRESS_MANY],
        Sent::Log(.., None) => &[SET_LOG],
        Sent::Log(.., Some(_)) => &[SAVE_OWN_LOG],
        Sent::Cleanup(..) => &[REMOVE_FINISHED, PRUNE_MODULES],
        Sent::Heartbeat { .. } => &[RENEW, ANONYMOUS, RESCUE, STRANDED, NAMED, PENDING_CANCELS],
        Sent::RequestCancel(..) => &[ANONYMOUS, CANCEL_QUEUED, NAMED, REQUEST_CANCEL],
        Sent::Nothing => &[],
    }
}

/// Who executes a new run (`None`: whichever node claims it), and how
/// many attempts it may take.
struct Owner<'a> {
    node: Option<&'a str>,
    max_attempts: u32,
}

/// What the write path needs of a stored run.
struct Stored {
    id: i64,
    status: RunStatus,
    history_len: i32,
}

async fn current(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    run_id: &str,
) -> Result<Option<Result<Stored, Error>>, tokio_postgres::Error> {
    let statement = prepared.get(tx, CURRENT).await?;
    let Some(row) = tx.query_opt(&statement, &[&clean(run_id)]).await? else {
        return Ok(None);
    };
    Ok(Some(column_status(&row, 1).map(|status| Stored {
        id: row.get(0),
        status,
        history_len: row.get(2),
    })))
}

async fn insert(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    owner: Owner<'_>,
    run: &Run,
    existing: Existing,
) -> Result<Outcome, tokio_postgres::Error> {
    let Owner { node, max_attempts } = owner;
    let values = RunValues::new(run, 1).with_attempts(max_attempts);
    let params = values.insert_params(&node);
    // The common case, a new id, takes one statement; only a conflict looks further.
    let statement = prepared.get(tx, INSERT_RUN).await?;
    if tx.execute(&statement, &params).await? == 1 {
        return Ok(Outcome::Done);
    }
    let stored = match current(tx, prepared, &run.run_id).await? {
        Some(Ok(stored)) => stored,
        Some(Err(e)) => return Ok(Outcome::Failed(e)),
        // Deleted since the insert met it: a new id after all.
        None => {
            tx.execute(&statement, &params).await?;
            return Ok(Outcome::Done);
        }
    };
    match on_taken(&run.run_id, stored.status, existing) {
        Ok(Taken::Replace) => {
            tx.execute("DELETE FROM run_history WHERE run = $1", &[&stored.id])
                .await?;
            tx.execute("DELETE FROM runs WHERE id = $1", &[&stored.id])
                .await?;
            tx.execute(&statement, &params).await?;
            Ok(Outcome::Done)
        }
        Ok(Taken::Adopt) => {
            // This node executes the run now.
            let values = RunValues::new(run, stored.history_len);
            let update = prepared.get(tx, UPDATE_RUN).await?;
            tx.execute(&update, &values.params()).await?;
            tx.execute(
                "UPDATE runs SET node = $2 WHERE id = $1",
                &[&stored.id, &node],
            )
            .await?;
            Ok(Outcome::Done)
        }
        Err(e) => Ok(Outcome::Failed(e)),
    }
}

/// A run this node claims as it records it (`Running`, attempt 1). An id
/// already taken is treated as [`Existing::on_enqueue`] says (a finished
/// run replaced, a queued one its caller added first adopted), then the
/// run becomes `Running` here, all in the write's transaction.
async fn claimed_start(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    node: &Node,
    run: &Run,
    max_attempts: u32,
) -> Result<Outcome, tokio_postgres::Error> {
    let claimed = Sent::Claimed(RunValues::new(run, 2).with_attempts(max_attempts), &node.id);
    let statement = prepared.get(tx, INSERT_CLAIMED).await?;
    if let Some(outcome) = send(tx, &|_| &statement, &claimed).await? {
        return Ok(outcome);
    }
    let mut queued = run.clone();
    queued.status = RunStatus::Queued;
    queued.started_at = None;
    let owner = Owner {
        node: Some(&node.id),
        max_attempts,
    };
    let outcome = insert(tx, prepared, owner, &queued, Existing::on_enqueue(run)).await?;
    if !matches!(outcome, Outcome::Done) {
        return Ok(outcome);
    }
    let moved = Sent::Move {
        run_id: clean(&run.run_id),
        to: RunStatus::Running.as_str(),
        at: nanos(run.started_at.unwrap_or(run.created_at)),
        allowed: allowed_from(RunStatus::Running),
        message: None,
        fence: Fence {
            attempt: None,
            node: &node.id,
        },
    };
    let statement = prepared.get(tx, MOVE_MANY).await?;
    send(tx, &|_| &statement, &moved).await?;
    tx.execute(
        "UPDATE runs SET attempt = 1 WHERE run_id = $1",
        &[&clean(&run.run_id)],
    )
    .await?;
    Ok(outcome)
}

async fn replace(
    tx: &Transaction<'_>,
    prepared: &mut Prepared,
    run: &Run,
    change: Option<&StatusChange>,
) -> Result<Outcome, tokio_postgres::Error> {
    let stored = match current(tx, prepared, &run.run_id).await? {
        Some(Ok(stored)) => stored,
        Some(Err(e)) => return Ok(Outcome::Failed(e)),
        None => return Ok(Outcome::Failed(Error::RunNotFound(run.run_id.clone()))),
    };
    if let Err(e) = check_replace(&run.run_id, stored.status, change.map(|c| c.status)) {
        return Ok(Outcome::Failed(e));
    }
    let update = prepared.get(tx, UPDATE_RUN).await?;
    match change {
        Some(change) => {
            let values = RunValues::new(run, stored.history_len + 1);
            tx.execute(&update, &values.params()).await?;
            let add = prepared.get(tx, ADD_HISTORY).await?;
            tx.execute(
                &add,
                &[
                    &stored.id,
                    &stored.history_len,
                    &change.status.as_str(),
                    &nanos(change.at),
                    &change.message.as_deref().map(clean),
                ],
            )
            .await?;
        }
        None => {
            let values = RunValues::new(run, stored.history_len);
            tx.execute(&update, &values.params()).await?;
        }
    }
    Ok(Outcome::Done)
}

/// The statuses a run may be in for `to` to apply: the status flow's rule,
/// as the statement's condition.
fn allowed_from(to: RunStatus) -> Vec<&'static str> {
    RunStatus::ALL
        .into_iter()
        .filter(|from| from.can_become(to))
        .map(RunStatus::as_str)
        .collect()
}

/// A run's column values, in `RUN_COLUMNS` order then `history_len`.
struct RunValues<'a> {
    run_id: Cow<'a, str>,
    module_id: Cow<'a, str>,
    module_name: Cow<'a, str>,
    status: &'static str,
    created_at: i64,
    started_at: Option<i64>,
    completed_at: Option<i64>,
    parameters: String,
    exit_code: Option<i32>,
    error_message: Option<Cow<'a, str>>,
    output: Option<String>,
    fraction: Option<f64>,
    progress_message: Option<Cow<'a, str>>,
    module_version: Option<Cow<'a, str>>,
    log: Option<String>,
    history_len: i32,
    priority: i16,
    not_before: Option<i64>,
    /// How many attempts a run of the queue may take (1 for any other).
    max_attempts: i32,
}

impl<'a> RunValues<'a> {
    fn new(run: &'a Run, history_len: i32) -> RunValues<'a> {
        RunValues {
            run_id: clean(&run.run_id),
            module_id: clean(&run.module_id),
            module_name: clean(&run.module_name),
            status: run.status.as_str(),
            created_at: nanos(run.created_at),
            started_at: run.started_at.map(nanos),
            completed_at: run.completed_at.map(nanos),
            parameters: json_text(&run.parameters),
            exit_code: run.exit_code,
            error_message: run.error_message.as_deref().map(clean),
            output: run.output.as_ref().map(json_text),
            fraction: run.progress.as_ref().map(|p| p.fraction),
            progress_message: run.progress.as_ref().map(|p| clean(&p.message)),
            module_version: run.module_version.as_deref().map(clean),
            log: log_text(&run.log),
            history_len,
            priority: run.priority,
            not_before: run.not_before.map(nanos),
            max_attempts: 1,
        }
    }

    fn with_attempts(mut self, max_attempts: u32) -> RunValues<'a> {
        self.max_attempts = i32::try_from(max_attempts).unwrap_or(i32::MAX).max(1);
        self
    }

    /// [`INSERT_RUN`]'s parameters: the first fifteen columns, the node,
    /// then the attempts, the priority and the not-before time.
    fn insert_params<'b>(&'b self, node: &'b (dyn ToSql + Sync)) -> Vec<&'b (dyn ToSql + Sync)> {
        let mut params = self.params()[..15].to_vec();
        params.extend([node, &self.max_attempts, &self.priority, &self.not_before]);
        params
    }

    /// [`UPDATE_RUN`]'s parameters: every column in `RUN_COLUMNS` order,
    /// with the history's length before the priority.
    fn params(&self) -> [&(dyn ToSql + Sync); 18] {
        [
            &self.run_id,
            &self.module_id,
            &self.module_name,
            &self.status,
            &self.created_at,
            &self.started_at,
            &self.completed_at,
            &self.parameters,
            &self.exit_code,
            &self.error_message,
            &self.output,
            &self.fraction,
            &self.progress_message,
            &self.module_version,
            &self.log,
            &self.history_len,
            &self.priority,
            &self.not_before,
        ]
    }
}

/// Claims queued runs for `node` ([`CLAIM`]), on a pooled connection
/// that announces its changes as this node's.
pub(super) async fn claim(
    client: &ClientWrapper,
    node: &str,
    wanted: &[Wanted],
    limit: usize,
) -> Result<Vec<Run>, ReadError> {
    let modules: Vec<Cow<'_, str>> = wanted.iter().map(|w| clean(&w.module_id)).collect();
    let versions: Vec<Cow<'_, str>> = wanted.iter().map(|w| clean(&w.version)).collect();
    let counts: Vec<i64> = wanted
        .iter()
        .map(|w| i64::try_from(w.count).unwrap_or(i64::MAX))
        .collect();
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let (named, claim) = futures_util::future::try_join(
        client.prepare_cached(SESSION_NODE),
        client.prepare_cached(CLAIM),
    )
    .await?;
    let at = nanos(Utc::now());
    let (_, rows) = futures_util::future::try_join(
        client.execute(&named, &[&node]),
        client.query(
            &claim,
            &[
                &modules,
                &versions,
                &counts,
                &limit,
                &node,
                &at,
                &MAX_PARAMETERS,
                &EXIT_FAILURE,
            ],
        ),
    )
    .await?;
    rows.iter()
        .map(read_run)
        .collect::<Result<Vec<Run>, Error>>()
        .map_err(ReadError::Corrupt)
}

/// [`MAX_PARAMETERS_BYTES`] as the claim compares it.
const MAX_PARAMETERS: i64 = MAX_PARAMETERS_BYTES as i64;

/// Gives runs `node` claimed back to the queue ([`RELEASE`]).
pub(super) async fn release(
    client: &ClientWrapper,
    node: &str,
    run_ids: &[String],
    reason: &str,
) -> Result<Vec<(String, String)>, ReadError> {
    let (named, release) = futures_util::future::try_join(
        client.prepare_cached(SESSION_NODE),
        client.prepare_cached(RELEASE),
    )
    .await?;
    let ids: Vec<Cow<'_, str>> = run_ids.iter().map(|id| clean(id)).collect();
    let at = nanos(Utc::now());
    let (_, rows) = futures_util::future::try_join(
        client.execute(&named, &[&node]),
        client.query(&release, &[&ids, &node, &at, &clean(reason)]),
    )
    .await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

/// The values of a cleanup's condition, in [`REMOVE_FINISHED`]'s order.
pub(super) struct CleanupValues {
    latest: i64,
    statuses: Vec<&'static str>,
    module: Option<String>,
    modules: Vec<String>,
    statuses_of: Vec<Option<&'static str>>,
    befores: Vec<i64>,
    before: i64,
}

impl CleanupValues {
    fn new(cleanup: &Cleanup) -> CleanupValues {
        CleanupValues {
            latest: nanos_clamped(cleanup.latest()),
            statuses: cleanup
                .finished_statuses()
                .into_iter()
                .map(RunStatus::as_str)
                .collect(),
            module: cleanup.module_id.as_deref().map(|m| clean(m).into_owned()),
            modules: cleanup
                .overrides
                .iter()
                .map(|o| clean(&o.module_id).into_owned())
                .collect(),
            statuses_of: cleanup
                .overrides
                .iter()
                .map(|o| o.status.map(RunStatus::as_str))
                .collect(),
            befores: cleanup
                .overrides
                .iter()
                .map(|o| nanos_clamped(o.before))
                .collect(),
            before: nanos_clamped(cleanup.before),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.latest,
            &self.statuses,
            &self.module,
            &self.modules,
            &self.statuses_of,
            &self.befores,
            &self.before,
        ]
    }
}

/// How many runs a cleanup would remove.
pub(super) async fn count_finished(
    client: &ClientWrapper,
    cleanup: &Cleanup,
) -> Result<usize, ReadError> {
    let values = CleanupValues::new(cleanup);
    let statement = client.prepare_cached(COUNT_FINISHED).await?;
    let row = client.query_one(&statement, &values.params()).await?;
    Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// The nodes' heartbeat rows, with the runs each executes.
pub(super) async fn nodes(client: &ClientWrapper) -> Result<Vec<NodeStatus>, ReadError> {
    let statement = client
        .prepare_cached(
            "SELECT n.node_id, \
             (extract(epoch FROM n.started_at) * 1000000)::bigint, \
             (extract(epoch FROM n.heartbeat_at) * 1000000)::bigint, \
             (extract(epoch FROM n.lease_until) * 1000000)::bigint, \
             (SELECT count(*) FROM runs r WHERE r.node = n.node_id AND r.status = 'running') \
             FROM nodes n ORDER BY n.node_id",
        )
        .await?;
    client
        .query(&statement, &[])
        .await?
        .iter()
        .map(|row| {
            let time = |index| {
                row.try_get::<_, i64>(index)
                    .map_err(corrupt)
                    .and_then(|micros| {
                        DateTime::from_timestamp_micros(micros)
                            .ok_or_else(|| Error::Corrupt(format!("a node time of {micros} µs")))
                    })
            };
            Ok(NodeStatus {
                node: row.try_get(0).map_err(corrupt)?,
                started_at: time(1)?,
                heartbeat_at: time(2)?,
                lease_until: time(3)?,
                running: u64::try_from(row.try_get::<_, i64>(4).map_err(corrupt)?).unwrap_or(0),
            })
        })
        .collect::<Result<Vec<_>, Error>>()
        .map_err(ReadError::Corrupt)
}

/// Runs per status, and the runs that ended at or after `since`, newest
/// first, by the indexes of finished runs.
pub(super) async fn tally(
    client: &ClientWrapper,
    since: DateTime<Utc>,
    limit: usize,
) -> Result<Tally, ReadError> {
    let counted = client
        .prepare_cached("SELECT status, count(*) FROM runs GROUP BY status")
        .await?;
    let counts = client
        .query(&counted, &[])
        .await?
        .iter()
        .map(|row| {
            let count = row.try_get::<_, i64>(1).map_err(corrupt)?;
            Ok((column_status(row, 0)?, u64::try_from(count).unwrap_or(0)))
        })
        .collect::<Result<Vec<_>, Error>>()
        .map_err(ReadError::Corrupt)?;
    let listed = client
        .prepare_cached(
            "SELECT module_id, status, started_at, completed_at FROM runs \
             WHERE completed_at IS NOT NULL AND completed_at >= $1 \
             ORDER BY completed_at DESC LIMIT $2",
        )
        .await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let ended = client
        .query(&listed, &[&nanos_clamped(since), &limit])
        .await?
        .iter()
        .map(|row| {
            Ok(Ended {
                module_id: row.try_get(0).map_err(corrupt)?,
                status: column_status(row, 1)?,
                started_at: row
                    .try_get::<_, Option<i64>>(2)
                    .map_err(corrupt)?
                    .map(DateTime::from_timestamp_nanos),
                completed_at: DateTime::from_timestamp_nanos(row.try_get(3).map_err(corrupt)?),
            })
        })
        .collect::<Result<Vec<_>, Error>>()
        .map_err(ReadError::Corrupt)?;
    Ok(Tally::new(counts, ended))
}

pub(super) async fn select_run(
    client: &ClientWrapper,
    run_id: &str,
) -> Result<Option<Run>, ReadError> {
    let sql = format!("SELECT {PG_RUN_COLUMNS} FROM runs WHERE run_id = $1");
    let statement = client.prepare_cached(&sql).await?;
    client
        .query_opt(&statement, &[&clean(run_id)])
        .await?
        .map(|row| read_run(&row))
        .transpose()
        .map_err(ReadError::Corrupt)
}

pub(super) async fn select_run_by_key(
    client: &ClientWrapper,
    key: &str,
) -> Result<Option<Run>, ReadError> {
    let sql = format!("SELECT {PG_RUN_COLUMNS} FROM runs WHERE idempotency_key = $1");
    let statement = client.prepare_cached(&sql).await?;
    client
        .query_opt(&statement, &[&clean(key)])
        .await?
        .map(|row| read_run(&row))
        .transpose()
        .map_err(ReadError::Corrupt)
}

pub(super) async fn select_runs(
    client: &ClientWrapper,
    filter: &RunFilter,
) -> Result<Vec<Run>, ReadError> {
    select_where(client, PG_RUN_COLUMNS, filter, read_run).await
}

pub(super) async fn select_summaries(
    client: &ClientWrapper,
    filter: &RunFilter,
) -> Result<Vec<RunSummary>, ReadError> {
    select_where(client, SUMMARY_COLUMNS, filter, read_summary).await
}

/// Rows matching `filter`, newest first, read by `read`.
async fn select_where<T>(
    client: &ClientWrapper,
    columns: &str,
    filter: &RunFilter,
    read: impl Fn(&Row) -> Result<T, Error>,
) -> Result<Vec<T>, ReadError> {
    let sql = listing_sql(columns, filter, '$');
    let module_id = filter.module_id.as_deref().map(clean);
    let cursor = filter
        .after
        .as_ref()
        .map(|RunCursor { created_at, run_id }| (nanos_clamped(*created_at), clean(run_id)));
    let mut values: Vec<&(dyn ToSql + Sync)> = Vec::new();
    if let Some(module_id) = &module_id {
        values.push(module_id);
    }
    if let Some((created_at, run_id)) = &cursor {
        values.push(created_at);
        values.push(run_id);
    }
    let statement = client.prepare_cached(&sql).await?;
    client
        .query(&statement, &values)
        .await?
        .iter()
        .map(read)
        .collect::<Result<Vec<T>, Error>>()
        .map_err(ReadError::Corrupt)
}

pub(super) async fn select_history(
    client: &ClientWrapper,
    run_id: &str,
) -> Result<Vec<StatusChange>, ReadError> {
    let statement = client
        .prepare_cached(
            "SELECT h.status, h.at, h.message FROM run_history h JOIN runs r ON h.run = r.id \
             WHERE r.run_id = $1 ORDER BY h.seq",
        )
        .await?;
    client
        .query(&statement, &[&clean(run_id)])
        .await?
        .iter()
        .map(|row| {
            Ok(StatusChange {
                status: column_status(row, 0)?,
                at: DateTime::from_timestamp_nanos(row.try_get(1).map_err(corrupt)?),
                message: row.try_get(2).map_err(corrupt)?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()
        .map_err(ReadError::Corrupt)
}

/// Why a read failed: the database, or a value it holds that modrun
/// cannot read.
pub(super) enum ReadError {
    Database(tokio_postgres::Error),
    Corrupt(Error),
}

impl From<tokio_postgres::Error> for ReadError {
    fn from(e: tokio_postgres::Error) -> ReadError {
        ReadError::Database(e)
    }
}

fn corrupt(e: tokio_postgres::Error) -> Error {
    Error::Corrupt(e.to_string())
}

fn read_run(row: &Row) -> Result<Run, Error> {
    let get_time = |index| {
        row.try_get::<_, Option<i64>>(index)
            .map(|nanos| nanos.map(DateTime::from_timestamp_nanos))
            .map_err(corrupt)
    };
    Ok(Run {
        run_id: row.try_get(0).map_err(corrupt)?,
        module_id: row.try_get(1).map_err(corrupt)?,
        module_name: row.try_get(2).map_err(corrupt)?,
        status: column_status(row, 3)?,
        created_at: DateTime::from_timestamp_nanos(row.try_get(4).map_err(corrupt)?),
        started_at: get_time(5)?,
        completed_at: get_time(6)?,
        parameters: parse_json(row.try_get(7).map_err(corrupt)?)?,
        exit_code: row.try_get(8).map_err(corrupt)?,
        error_message: row.try_get(9).map_err(corrupt)?,
        output: row
            .try_get::<_, Option<&str>>(10)
            .map_err(corrupt)?
            .map(parse_json)
            .transpose()?,
        progress: column_progress(row, 11)?,
        module_version: row.try_get(13).map_err(corrupt)?,
        log: match row.try_get::<_, Option<&str>>(14).map_err(corrupt)? {
            Some(text) => parse_json(text)?,
            None => Vec::new(),
        },
        priority: row.try_get(15).map_err(corrupt)?,
        not_before: get_time(16)?,
        node: row.try_get(17).map_err(corrupt)?,
        attempt: row
            .try_get::<_, i32>(18)
            .map_err(corrupt)
            .map(|attempt| u32::try_from(attempt).ok().filter(|&n| n > 0))?,
    })
}

fn read_summary(row: &Row) -> Result<RunSummary, Error> {
    let get_time = |index| {
        row.try_get::<_, Option<i64>>(index)
            .map(|nanos| nanos.map(DateTime::from_timestamp_nanos))
            .map_err(corrupt)
    };
    let error_length: Option<i32> = row.try_get(9).map_err(corrupt)?;
    let error_message = row
        .try_get::<_, Option<String>>(8)
        .map_err(corrupt)?
        .map(|message| mark_cut(message, error_length.unwrap_or_default().into()));
    Ok(RunSummary {
        run_id: row.try_get(0).map_err(corrupt)?,
        module_id: row.try_get(1).map_err(corrupt)?,
        module_name: row.try_get(2).map_err(corrupt)?,
        status: column_status(row, 3)?,
        created_at: DateTime::from_timestamp_nanos(row.try_get(4).map_err(corrupt)?),
        started_at: get_time(5)?,
        completed_at: get_time(6)?,
        exit_code: row.try_get(7).map_err(corrupt)?,
        error_message,
        progress: column_progress(row, 10)?,
        module_version: row.try_get(12).map_err(corrupt)?,
        priority: row.try_get(13).map_err(corrupt)?,
        not_before: get_time(14)?,
    })
}

/// The progress stored at `index` (fraction) and `index + 1` (message).
fn column_progress(row: &Row, index: usize) -> Result<Option<Progress>, Error> {
    Ok(
        match row.try_get::<_, Option<f64>>(index).map_err(corrupt)? {
            Some(fraction) => Some(Progress {
                fraction,
                message: row
                    .try_get::<_, Option<String>>(index + 1)
                    .map_err(corrupt)?
                    .unwrap_or_default(),
            }),
            None => None,
        },
    )
}

fn column_status(row: &Row, index: usize) -> Result<RunStatus, Error> {
    row.try_get::<_, &str>(index)
        .map_err(corrupt)?
        .parse()
        .map_err(|e: Error| Error::Corrupt(e.to_string()))
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("a stored JSON value: {e}")))
}

fn log_text(log: &[LogEntry]) -> Option<String> {
    (!log.is_empty()).then(|| json_text(&log))
}

/// JSON text of a value (JSON escapes a NUL, so the text never holds one).
fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("runs, outputs and logs always serialize")
}

/// PostgreSQL text cannot hold a NUL character: a hostile module's name or
/// error message could otherwise make its run's writes fail. Each NUL is
/// stored as U+FFFD (the replacement character).
fn clean(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Nanoseconds since the epoch; the store checks times before queueing.
pub(super) fn nanos(at: DateTime<Utc>) -> i64 {
    at.timestamp_nanos_opt().unwrap_or(i64::MAX)
}
