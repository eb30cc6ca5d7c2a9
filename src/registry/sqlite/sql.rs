//! The SQL of the registry: each write applied inside the writer's
//! transaction, and the queries that read runs back.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::error::Error;
use crate::registry::retention::{Cleanup, nanos_clamped};
use crate::registry::writer::Outcome;
use crate::registry::{
    Ended, Existing, FINISHED, RunCursor, RunFilter, RunSummary, SUMMARY_COLUMNS, Taken, Tally,
    Wanted, check_replace, listing_sql, mark_cut, on_taken, run_columns,
};
use crate::run::{LogEntry, Progress, Run, RunStatus, StatusChange, Transition};

/// What the write path needs of a stored run.
pub(super) struct Stored {
    pub(super) id: i64,
    pub(super) status: RunStatus,
    pub(super) history_len: i64,
    pub(super) module_id: String,
}

pub(super) fn current(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
) -> rusqlite::Result<Option<Stored>> {
    tx.prepare_cached("SELECT id, status, history_len, module_id FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |row| {
            Ok(Stored {
                id: row.get(0)?,
                status: column_status(row, 1)?,
                history_len: row.get(2)?,
                module_id: row.get(3)?,
            })
        })
        .optional()
}

/// A run's columns as this backend reads them: the shared ones, then the
/// attempt a claim made.
pub(super) const SQLITE_RUN_COLUMNS: &str = concat!(run_columns!(), ", attempt");

/// Records a run queued for whichever claimer takes it; one claimed as it
/// is queued (`Running`) is recorded queued, then running, attempt 1.
pub(super) fn enqueue(tx: &rusqlite::Transaction<'_>, run: &Run) -> rusqlite::Result<Outcome> {
    let Some(started_at) = run.started_at.filter(|_| run.status == RunStatus::Running) else {
        let outcome = insert(tx, run, Existing::ReplaceFinished)?;
        if matches!(outcome, Outcome::Done) {
            tx.prepare_cached("UPDATE runs SET claimable = 1 WHERE run_id = ?1")?
                .execute([&run.run_id])?;
        }
        return Ok(outcome);
    };
    // The common case, a new id: the run, running, attempt 1, and its two
    // history entries, in three statements.
    if let Some(id) = insert_run(tx, run, 2, Some(1))? {
        let queued = StatusChange {
            status: RunStatus::Queued,
            at: run.created_at,
            message: None,
        };
        add_history(tx, id, 0, &queued)?;
        let running = StatusChange {
            status: RunStatus::Running,
            at: started_at,
            message: None,
        };
        add_history(tx, id, 1, &running)?;
        return Ok(Outcome::Done);
    }
    let queued = queued_part(run);
    let outcome = insert(tx, &queued, Existing::on_enqueue(run))?;
    if matches!(outcome, Outcome::Done) {
        let mut running = Transition::running(&run.run_id);
        running.at = started_at;
        apply_transition(tx, &running)?;
        // Claimed here, as a claim marks it (a run taken over may have
        // been queued for any claimer).
        tx.prepare_cached("UPDATE runs SET attempt = 1, claimable = NULL WHERE run_id = ?1")?
            .execute([&run.run_id])?;
    }
    Ok(outcome)
}

/// `run` as it was before it started: queued.
fn queued_part(run: &Run) -> Run {
    let mut queued = run.clone();
    queued.status = RunStatus::Queued;
    queued.started_at = None;
    queued
}

/// Claims the due queued runs: of each wanted version at most its
/// count, `limit` in all, higher priority first, then the one due first
/// (its not-before time, or its creation), then the one queued first;
/// each becomes `Running`, its attempt counted.
pub(super) fn claim(
    tx: &rusqlite::Transaction<'_>,
    wanted: &[Wanted],
    limit: usize,
) -> rusqlite::Result<Vec<Run>> {
    let now = Utc::now();
    let due = nanos(now)?;
    let mut picked: Vec<(std::cmp::Reverse<i64>, i64, i64, String)> = Vec::new();
    let mut select = tx.prepare_cached(
        "SELECT priority, coalesce(not_before, created_at), id, run_id FROM runs \
         WHERE claimable = 1 AND status = 'queued' AND module_id = ?1 AND module_version = ?2 \
         AND (not_before IS NULL OR not_before <= ?4) \
         ORDER BY priority DESC, coalesce(not_before, created_at), id LIMIT ?3",
    )?;
    for w in wanted {
        let count = i64::try_from(w.count.min(limit)).unwrap_or(i64::MAX);
        let rows = select.query_map(params![w.module_id, w.version, count, due], |row| {
            Ok((
                std::cmp::Reverse(row.get(0)?),
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
            ))
        })?;
        for row in rows {
            picked.push(row?);
        }
    }
    drop(select);
    picked.sort_unstable();
    picked.truncate(limit);
    let mut claimed = Vec::with_capacity(picked.len());
    for (_, _, id, run_id) in picked {
        let mut running = Transition::running(&run_id);
        running.at = now;
        apply_transition(tx, &running)?;
        tx.prepare_cached(
            "UPDATE runs SET claimable = NULL, attempt = coalesce(attempt, 0) + 1 WHERE id = ?1",
        )?
        .execute([id])?;
        if let Some(run) = tx
            .prepare_cached(&format!(
                "SELECT {SQLITE_RUN_COLUMNS} FROM runs WHERE id = ?1"
            ))?
            .query_row([id], read_run)
            .optional()?
        {
            claimed.push(run);
        }
    }
    Ok(claimed)
}

/// Gives claimed runs back to the queue, `Queued` again with `reason` in
/// their history; answers them with their modules.
pub(super) fn release(
    tx: &rusqlite::Transaction<'_>,
    run_ids: &[String],
    reason: &str,
) -> rusqlite::Result<Vec<(String, String)>> {
    let now = StatusChange {
        status: RunStatus::Queued,
        at: Utc::now(),
        message: Some(reason.to_owned()),
    };
    let mut released = Vec::new();
    for run_id in run_ids {
        let row: Option<(i64, i64, String)> = tx
            .prepare_cached(
                "UPDATE runs SET status = 'queued', started_at = NULL, claimable = 1, \
                 history_len = history_len + 1 WHERE run_id = ?1 AND status = 'running' \
                 AND attempt IS NOT NULL RETURNING id, history_len, module_id",
            )?
            .query_row([run_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .optional()?;
        if let Some((id, history_len, module_id)) = row {
            add_history(tx, id, history_len - 1, &now)?;
            released.push((run_id.clone(), module_id));
        }
    }
    Ok(released)
}

/// The active runs this process holds (every one but those queued for a
/// claimer).
pub(super) fn claimed(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare_cached(
        "SELECT run_id FROM runs WHERE status IN ('queued', 'running') \
         AND claimable IS NOT 1",
    )?;
    let rows = statement.query_map([], |row| row.get(0))?;
    rows.collect()
}

/// The earliest not-before time later than `after` of the runs queued
/// for a claimer.
pub(super) fn next_due(
    conn: &Connection,
    after: DateTime<Utc>,
) -> rusqlite::Result<Option<DateTime<Utc>>> {
    let after = nanos(after)?;
    let mut statement = conn.prepare_cached(
        "SELECT min(not_before) FROM runs \
         WHERE claimable = 1 AND status = 'queued' AND not_before > ?1",
    )?;
    let at: Option<i64> = statement.query_row([after], |row| row.get(0))?;
    Ok(at.map(DateTime::from_timestamp_nanos))
}

/// The versions queued runs wait to be claimed on.
pub(super) fn queued_versions(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare_cached(
        "SELECT DISTINCT module_id || '@' || module_version FROM runs \
         WHERE claimable = 1 AND status = 'queued' AND module_version IS NOT NULL",
    )?;
    let rows = statement.query_map([], |row| row.get(0))?;
    rows.collect()
}

/// Applies `insert` of `run` unless another run holds its idempotency
/// `key` (that write alone then fails, naming that run); the run holds the
/// key once inserted.
pub(super) fn insert_keyed(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    key: Option<&str>,
    insert: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<Outcome>,
) -> rusqlite::Result<Outcome> {
    let Some(key) = key else {
        return insert(tx);
    };
    let holder: Option<String> = tx
        .prepare_cached("SELECT run_id FROM runs WHERE idempotency_key = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?;
    if let Some(run_id) = holder {
        return Ok(Outcome::Failed(Error::IdempotencyKeyReused {
            key: key.to_owned(),
            run_id,
        }));
    }
    let outcome = insert(tx)?;
    if matches!(outcome, Outcome::Done) {
        tx.prepare_cached("UPDATE runs SET idempotency_key = ?2 WHERE run_id = ?1")?
            .execute([&run.run_id, key])?;
    }
    Ok(outcome)
}

/// The run started with idempotency `key`, if any.
pub(super) fn select_run_by_key(conn: &Connection, key: &str) -> rusqlite::Result<Option<Run>> {
    conn.prepare_cached(&format!(
        "SELECT {SQLITE_RUN_COLUMNS} FROM runs WHERE idempotency_key = ?1"
    ))?
    .query_row([key], read_run)
    .optional()
}

pub(super) fn insert(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    existing: Existing,
) -> rusqlite::Result<Outcome> {
    // The common case, a new id, takes one statement; only a conflict looks further.
    if let Some(id) = insert_run(tx, run, 1, None)? {
        add_history(tx, id, 0, &first_change(run))?;
        return Ok(Outcome::Done);
    }
    let Some(stored) = current(tx, &run.run_id)? else {
        // The insert met a conflict, so the row exists within this transaction.
        return Err(rusqlite::Error::QueryReturnedNoRows);
    };
    match on_taken(&run.run_id, stored.status, existing) {
        Ok(Taken::Replace) => {
            tx.prepare_cached("DELETE FROM run_history WHERE run = ?1")?
                .execute([stored.id])?;
            tx.prepare_cached("DELETE FROM runs WHERE id = ?1")?
                .execute([stored.id])?;
            let id = insert_run(tx, run, 1, None)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
            add_history(tx, id, 0, &first_change(run))?;
            Ok(Outcome::Done)
        }
        Ok(Taken::Adopt) => {
            update_run(tx, run, stored.history_len)?;
            Ok(Outcome::Done)
        }
        Err(e) => Ok(Outcome::Failed(e)),
    }
}

/// The history entry a run starts with.
pub(super) fn first_change(run: &Run) -> StatusChange {
    StatusChange {
        status: run.status,
        at: run.created_at,
        message: None,
    }
}

pub(super) fn replace(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    change: Option<&StatusChange>,
) -> rusqlite::Result<Outcome> {
    let Some(stored) = current(tx, &run.run_id)? else {
        return Ok(Outcome::Failed(Error::RunNotFound(run.run_id.clone())));
    };
    if let Err(e) = check_replace(&run.run_id, stored.status, change.map(|c| c.status)) {
        return Ok(Outcome::Failed(e));
    }
    match change {
        Some(change) => {
            update_run(tx, run, stored.history_len + 1)?;
            add_history(tx, stored.id, stored.history_len, change)?;
        }
        None => update_run(tx, run, stored.history_len)?,
    }
    Ok(Outcome::Done)
}

/// Inserts a new row with `history_len` history entries to come, and the
/// claim `attempt` it is in (`None`: not claimed); `None` if the id is taken.
///
/// (No `RETURNING` here or below: SQLite builds a temporary table for it on
/// every execution, which costs more than the statement.)
pub(super) fn insert_run(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    history_len: i64,
    attempt: Option<u32>,
) -> rusqlite::Result<Option<i64>> {
    let attempt: Box<dyn rusqlite::ToSql> = Box::new(attempt);
    let values = run_values(run, history_len)?.into_iter().chain([attempt]);
    let inserted = tx
        .prepare_cached(
            "INSERT INTO runs (run_id, module_id, module_name, status, created_at, started_at, \
             completed_at, parameters, exit_code, error_message, output, progress_fraction, \
             progress_message, module_version, log, history_len, priority, not_before, attempt) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
             ?18, ?19) \
             ON CONFLICT (run_id) DO NOTHING",
        )?
        .execute(rusqlite::params_from_iter(values))?;
    Ok((inserted == 1).then(|| tx.last_insert_rowid()))
}

/// Writes the whole record over the stored one.
pub(super) fn update_run(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    history_len: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE runs SET module_id = ?2, module_name = ?3, status = ?4, created_at = ?5, \
         started_at = ?6, completed_at = ?7, parameters = ?8, exit_code = ?9, \
         error_message = ?10, output = ?11, progress_fraction = ?12, progress_message = ?13, \
         module_version = ?14, log = ?15, history_len = ?16, priority = ?17, not_before = ?18 \
         WHERE run_id = ?1",
    )?
    .execute(run_values(run, history_len)?)?;
    Ok(())
}

/// The column values of a record: the first fifteen of `RUN_COLUMNS` in
/// its order, `history_len`, then the priority and the not-before time.
pub(super) fn run_values(
    run: &Run,
    history_len: i64,
) -> rusqlite::Result<[Box<dyn rusqlite::ToSql + '_>; 18]> {
    Ok([
        Box::new(run.run_id.as_str()),
        Box::new(run.module_id.as_str()),
        Box::new(run.module_name.as_str()),
        Box::new(run.status.as_str()),
        Box::new(nanos(run.created_at)?),
        Box::new(run.started_at.map(nanos).transpose()?),
        Box::new(run.completed_at.map(nanos).transpose()?),
        Box::new(json_text(&run.parameters)?),
        Box::new(run.exit_code),
        Box::new(run.error_message.as_deref()),
        Box::new(run.output.as_ref().map(json_text).transpose()?),
        Box::new(run.progress.as_ref().map(|p| p.fraction)),
        Box::new(run.progress.as_ref().map(|p| p.message.as_str())),
        Box::new(run.module_version.as_deref()),
        Box::new(log_text(&run.log)?),
        Box::new(history_len),
        Box::new(run.priority),
        Box::new(run.not_before.map(nanos).transpose()?),
    ])
}

pub(super) fn add_history(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    seq: i64,
    change: &StatusChange,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO run_history (run, seq, status, at, message) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        id,
        seq,
        change.status.as_str(),
        nanos(change.at)?,
        change.message
    ])?;
    Ok(())
}

/// Applies `change` if the status flow allows it; returns the module id.
pub(super) fn apply_transition(
    tx: &rusqlite::Transaction<'_>,
    change: &Transition,
) -> rusqlite::Result<Option<String>> {
    apply_transition_with(tx, change, None)
}

/// [`apply_transition`], with, for a terminal change, the run's latest
/// progress (reported in the same batch) written by the same statement.
pub(super) fn apply_transition_with(
    tx: &rusqlite::Transaction<'_>,
    change: &Transition,
    progress: Option<&Progress>,
) -> rusqlite::Result<Option<String>> {
    let Some(stored) = current(tx, &change.run_id)? else {
        return Ok(None);
    };
    if !stored.status.can_become(change.to) {
        return Ok(None);
    }
    let at = nanos(change.at)?;
    if change.to.is_terminal() {
        tx.prepare_cached(
            "UPDATE runs SET status = ?2, completed_at = ?3, exit_code = ?4, error_message = ?5, \
             output = coalesce(?6, output), log = coalesce(?7, log), history_len = ?8, \
             progress_fraction = coalesce(?9, progress_fraction), \
             progress_message = CASE WHEN ?9 IS NULL THEN progress_message ELSE ?10 END \
             WHERE id = ?1",
        )?
        .execute(params![
            stored.id,
            change.to.as_str(),
            at,
            change.exit_code,
            change.error_message,
            change.output.as_ref().map(json_text).transpose()?,
            change.log.as_deref().map(log_text).transpose()?.flatten(),
            stored.history_len + 1,
            progress.map(|p| p.fraction),
            progress.map(|p| p.message.as_str()),
        ])?;
    } else {
        tx.prepare_cached(
            "UPDATE runs SET status = ?2, started_at = ?3, history_len = ?4 WHERE id = ?1",
        )?
        .execute(params![
            stored.id,
            change.to.as_str(),
            at,
            stored.history_len + 1
        ])?;
    }
    add_history(tx, stored.id, stored.history_len, &change.status_change())?;
    Ok(Some(stored.module_id))
}

pub(super) fn select_run(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<Run>> {
    conn.prepare_cached(&format!(
        "SELECT {SQLITE_RUN_COLUMNS} FROM runs WHERE run_id = ?1"
    ))?
    .query_row([run_id], read_run)
    .optional()
}

pub(super) fn select_runs(conn: &Connection, filter: &RunFilter) -> rusqlite::Result<Vec<Run>> {
    select_where(conn, SQLITE_RUN_COLUMNS, filter, read_run)
}

pub(super) fn select_summaries(
    conn: &Connection,
    filter: &RunFilter,
) -> rusqlite::Result<Vec<RunSummary>> {
    select_where(conn, SUMMARY_COLUMNS, filter, read_summary)
}

/// Rows matching `filter`, newest first, read by `read`.
fn select_where<T>(
    conn: &Connection,
    columns: &str,
    filter: &RunFilter,
    read: impl Fn(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let sql = listing_sql(columns, filter, '?');
    let mut values: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if let Some(module_id) = &filter.module_id {
        values.push(Box::new(module_id.clone()));
    }
    if let Some(RunCursor { created_at, run_id }) = &filter.after {
        values.push(Box::new(
            created_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
        ));
        values.push(Box::new(run_id.clone()));
    }
    let mut statement = conn.prepare_cached(&sql)?;
    let rows = statement
        .query_map(rusqlite::params_from_iter(values), read)?
        .collect::<rusqlite::Result<Vec<T>>>()?;
    Ok(rows)
}

pub(super) fn select_history(
    conn: &Connection,
    run_id: &str,
) -> rusqlite::Result<Vec<StatusChange>> {
    conn.prepare_cached(
        "SELECT h.status, h.at, h.message FROM run_history h JOIN runs r ON h.run = r.id \
         WHERE r.run_id = ?1 ORDER BY h.seq",
    )?
    .query_map([run_id], |row| {
        Ok(StatusChange {
            status: column_status(row, 0)?,
            at: column_time(row, 1)?,
            message: row.get(2)?,
        })
    })?
    .collect()
}

fn read_run(row: &Row<'_>) -> rusqlite::Result<Run> {
    let parameters: String = row.get(7)?;
    let output: Option<String> = row.get(10)?;
    Ok(Run {
        run_id: row.get(0)?,
        module_id: row.get(1)?,
        module_name: row.get(2)?,
        status: column_status(row, 3)?,
        created_at: column_time(row, 4)?,
        started_at: column_optional_time(row, 5)?,
        completed_at: column_optional_time(row, 6)?,
        parameters: parse_json(7, &parameters)?,
        exit_code: row.get(8)?,
        error_message: row.get(9)?,
        output: output
            .as_deref()
            .map(|text| parse_json(10, text))
            .transpose()?,
        progress: column_progress(row, 11)?,
        module_version: row.get(13)?,
        log: match row.get::<_, Option<String>>(14)? {
            Some(text) => parse_json(14, &text)?,
            None => Vec::new(),
        },
        priority: row.get(15)?,
        not_before: column_optional_time(row, 16)?,
        node: None,
        attempt: row
            .get::<_, Option<i64>>(17)?
            .and_then(|n| u32::try_from(n).ok()),
    })
}

fn read_summary(row: &Row<'_>) -> rusqlite::Result<RunSummary> {
    let error_length: Option<i64> = row.get(9)?;
    let error_message = row
        .get::<_, Option<String>>(8)?
        .map(|message| mark_cut(message, error_length.unwrap_or_default()));
    Ok(RunSummary {
        run_id: row.get(0)?,
        module_id: row.get(1)?,
        module_name: row.get(2)?,
        status: column_status(row, 3)?,
        created_at: column_time(row, 4)?,
        started_at: column_optional_time(row, 5)?,
        completed_at: column_optional_time(row, 6)?,
        exit_code: row.get(7)?,
        error_message,
        progress: column_progress(row, 10)?,
        module_version: row.get(12)?,
        priority: row.get(13)?,
        not_before: column_optional_time(row, 14)?,
    })
}

/// The progress stored at `index` (fraction) and `index + 1` (message).
fn column_progress(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<Progress>> {
    Ok(match row.get::<_, Option<f64>>(index)? {
        Some(fraction) => Some(Progress {
            fraction,
            message: row.get::<_, Option<String>>(index + 1)?.unwrap_or_default(),
        }),
        None => None,
    })
}

pub(super) fn column_status(row: &Row<'_>, index: usize) -> rusqlite::Result<RunStatus> {
    let text: String = row.get(index)?;
    text.parse().map_err(|e: Error| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, e.into())
    })
}

pub(super) fn column_time(row: &Row<'_>, index: usize) -> rusqlite::Result<DateTime<Utc>> {
    Ok(DateTime::from_timestamp_nanos(row.get(index)?))
}

pub(super) fn column_optional_time(
    row: &Row<'_>,
    index: usize,
) -> rusqlite::Result<Option<DateTime<Utc>>> {
    Ok(row
        .get::<_, Option<i64>>(index)?
        .map(DateTime::from_timestamp_nanos))
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    index: usize,
    text: &str,
) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, e.into())
    })
}

pub(super) fn log_text(log: &[LogEntry]) -> rusqlite::Result<Option<String>> {
    if log.is_empty() {
        Ok(None)
    } else {
        json_text(&log).map(Some)
    }
}

pub(super) fn json_text<T: serde::Serialize>(value: &T) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))
}

pub(super) fn nanos(at: DateTime<Utc>) -> rusqlite::Result<i64> {
    at.timestamp_nanos_opt().ok_or_else(|| {
        rusqlite::Error::ToSqlConversionFailure(
            format!("time {at} is outside the years 1677 to 2262 that the registry stores").into(),
        )
    })
}

/// The condition a cleanup puts on a run (`?1`: the latest limit, `?2`:
/// the overrides as JSON, `?3`: the limit otherwise, `?4`: the module):
/// the finished runs' index by completion is read up to the latest
/// limit, and each run there checked against its own.
fn cleanup_condition(cleanup: &Cleanup) -> String {
    let statuses: Vec<String> = cleanup
        .finished_statuses()
        .iter()
        .map(|s| format!("'{s}'"))
        .collect();
    format!(
        "completed_at IS NOT NULL AND completed_at < ?1 \
         AND {FINISHED} \
         AND status IN ({}) AND (?4 IS NULL OR module_id = ?4) \
         AND completed_at < coalesce(\
         (SELECT o.value ->> 'before' FROM json_each(?2) o \
         WHERE o.value ->> 'module' = runs.module_id \
         AND coalesce(o.value ->> 'status', runs.status) = runs.status \
         ORDER BY o.value ->> 'status' IS NULL LIMIT 1), ?3)",
        statuses.join(", ")
    )
}

/// The values of [`cleanup_condition`]'s parameters.
fn cleanup_values(cleanup: &Cleanup) -> (i64, String, i64, Option<String>) {
    let overrides: Vec<serde_json::Value> = cleanup
        .overrides
        .iter()
        .map(|o| {
            serde_json::json!({
                "module": o.module_id,
                "status": o.status.map(|s| s.as_str()),
                "before": nanos_clamped(o.before),
            })
        })
        .collect();
    (
        nanos_clamped(cleanup.latest()),
        serde_json::Value::Array(overrides).to_string(),
        nanos_clamped(cleanup.before),
        cleanup.module_id.clone(),
    )
}

/// Removes the oldest `limit` runs `cleanup` matches, with their history;
/// returns how many runs.
pub(super) fn remove_finished(
    tx: &rusqlite::Transaction<'_>,
    cleanup: &Cleanup,
    limit: usize,
) -> rusqlite::Result<usize> {
    let (latest, overrides, before, module) = cleanup_values(cleanup);
    let sql = format!(
        "SELECT id FROM runs INDEXED BY runs_finished_by_completion WHERE {} \
         ORDER BY completed_at LIMIT ?5",
        cleanup_condition(cleanup)
    );
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let ids: Vec<i64> = tx
        .prepare_cached(&sql)?
        .query_map(params![latest, overrides, before, module, limit], |row| {
            row.get(0)
        })?
        .collect::<rusqlite::Result<_>>()?;
    if ids.is_empty() {
        return Ok(0);
    }
    let ids = serde_json::to_string(&ids).expect("numbers serialize");
    tx.prepare_cached("DELETE FROM run_history WHERE run IN (SELECT value FROM json_each(?1))")?
        .execute([&ids])?;
    let removed = tx
        .prepare_cached("DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?1))")?
        .execute([&ids])?;
    // Gives freed pages back to the filesystem (the file is in incremental
    // auto-vacuum mode), a few per batch: about what a batch frees, so the
    // free list does not grow while a cleanup goes on. The pragma frees
    // one page per step: it is stepped to its end.
    let mut vacuum = tx.prepare_cached("PRAGMA incremental_vacuum(16)")?;
    let mut steps = vacuum.query([])?;
    while steps.next()?.is_some() {}
    Ok(removed)
}

/// How many runs `cleanup` would remove.
pub(super) fn count_finished(conn: &Connection, cleanup: &Cleanup) -> rusqlite::Result<usize> {
    let (latest, overrides, before, module) = cleanup_values(cleanup);
    let sql = format!(
        "SELECT count(*) FROM runs INDEXED BY runs_finished_by_completion WHERE {}",
        cleanup_condition(cleanup)
    );
    conn.prepare_cached(&sql)?
        .query_row(params![latest, overrides, before, module], |row| {
            row.get::<_, i64>(0)
        })
        .map(|n| usize::try_from(n).unwrap_or(0))
}

/// Runs per status (each group read from the partial index that holds
/// it), and the runs that ended at or after `since`, newest first.
pub(super) fn tally(
    conn: &Connection,
    since: DateTime<Utc>,
    limit: usize,
) -> rusqlite::Result<Tally> {
    let mut counts = Vec::new();
    let finished = format!(
        "SELECT status, count(*) FROM runs INDEXED BY runs_finished_by_status \
         WHERE {FINISHED} GROUP BY status"
    );
    for sql in [
        finished.as_str(),
        "SELECT status, count(*) FROM runs INDEXED BY runs_active \
         WHERE status IN ('queued', 'running') GROUP BY status",
    ] {
        let mut statement = conn.prepare_cached(sql)?;
        let rows = statement.query_map([], |row| {
            Ok((
                column_status(row, 0)?,
                u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
            ))
        })?;
        for row in rows {
            counts.push(row?);
        }
    }
    let mut statement = conn.prepare_cached(
        "SELECT module_id, status, started_at, completed_at FROM runs \
         INDEXED BY runs_finished_by_completion \
         WHERE completed_at IS NOT NULL AND completed_at >= ?1 \
         ORDER BY completed_at DESC LIMIT ?2",
    )?;
    let ended = statement
        .query_map(
            params![
                nanos_clamped(since),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |row| {
                Ok(Ended {
                    module_id: row.get(0)?,
                    status: column_status(row, 1)?,
                    started_at: column_optional_time(row, 2)?,
                    completed_at: column_time(row, 3)?,
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Tally::new(counts, ended))
}
