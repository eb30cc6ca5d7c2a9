//! The SQLite backend: a registry in one file that survives restarts and
//! crashes, with group commit so that thousands of concurrent status changes
//! share one transaction.
//!
//! # What is durable when
//!
//! Every write goes to one writer thread, which takes everything queued,
//! applies it in one transaction and commits, then answers each caller. So
//! when a [`RunStore`] method returns, its change is committed: an id
//! returned by the task manager was recorded before it was handed out, and a
//! terminal status that anyone could read is in the file. Reads use separate
//! connections and see committed data only.
//!
//! The database runs in WAL mode. With [`Synchronous::Normal`] (the default)
//! a commit survives the process being killed at any point; the last commits
//! before a power loss or kernel crash may be lost. [`Synchronous::Full`]
//! syncs every commit to disk, which survives those too, at the price of an
//! fsync per batch.
//!
//! Opening the file takes an exclusive lock beside it (`<file>.lock`), so two
//! processes never share one registry, then marks every run a previous
//! process left `Queued` or `Running` as `Failed` ("interrupted").

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::oneshot;

use super::{Existing, RunFilter, RunStore};
use crate::error::{Error, Result};
use crate::run::{EXIT_FAILURE, Progress, Run, RunStatus, StatusChange, Transition};

/// The schema, one migration per schema version, applied in order.
const MIGRATIONS: &[&str] = &[include_str!("migrations/0001_init.sql")];

/// The message recorded on runs found unfinished when the registry opens.
pub const INTERRUPTED: &str =
    "interrupted: the modrun process running it stopped before the run finished";

const RUN_COLUMNS: &str = "run_id, module_id, module_name, status, created_at, started_at, \
     completed_at, parameters, exit_code, error_message, output, progress_fraction, \
     progress_message, module_version";

/// How hard SQLite works to keep a commit through a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Commits survive a crash of the process, not always a power loss.
    #[default]
    Normal,
    /// Every commit is synced to disk before callers are answered.
    Full,
}

/// How a [`SqliteStore`] is opened.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Durability of each commit.
    pub synchronous: Synchronous,
    /// The most writes committed in one transaction.
    pub max_batch: usize,
    /// How many read connections are kept open.
    pub readers: usize,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            synchronous: Synchronous::Normal,
            max_batch: 8192,
            readers: 4,
        }
    }
}

/// Runs in a SQLite file. See the [module documentation](self) for what is
/// durable when.
pub struct SqliteStore {
    path: PathBuf,
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<JoinHandle<()>>,
    readers: Mutex<Vec<Connection>>,
    max_readers: usize,
    _lock: File,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Write {
    Insert(Run, Existing, Reply<()>),
    Replace(Run, Option<StatusChange>, Reply<()>),
    Transition(Transition, Reply<Option<String>>),
    Progress(String, Progress, Reply<Option<String>>),
    Cleanup(DateTime<Utc>, Reply<usize>),
    Flush(Reply<()>),
}

impl SqliteStore {
    /// Opens (or creates) the registry at `path`.
    ///
    /// Fails with a clear [`Error::Database`] if the file is not a SQLite
    /// database, is damaged, cannot be written, was written by a newer
    /// modrun, or is in use by another process — never by starting empty.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        let fail = |message: String| Error::Database {
            path: path.clone(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
        let lock = take_lock(&path).map_err(fail)?;

        let mut conn = Connection::open(&path)
            .map_err(|e| fail(format!("cannot open the file: {}", describe(&e))))?;
        prepare_writer(&mut conn, options.synchronous)
            .and_then(|()| migrate(&mut conn))
            .and_then(|()| {
                mark_interrupted(&mut conn).map_err(|e| {
                    format!(
                        "cannot mark unfinished runs as interrupted: {}",
                        describe(&e)
                    )
                })
            })
            .map_err(fail)?;
        if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(true) {
            return Err(fail(
                "the file can only be opened read-only; modrun must be able to write it".into(),
            ));
        }

        let (writes, queue) = mpsc::channel();
        let max_batch = options.max_batch.max(1);
        let thread_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("modrun-registry".into())
            .spawn(move || write_loop(conn, queue, max_batch, &thread_path))
            .map_err(|e| fail(format!("cannot start its writer thread: {e}")))?;

        Ok(SqliteStore {
            path,
            writes: Some(writes),
            writer: Some(writer),
            readers: Mutex::new(Vec::new()),
            max_readers: options.readers.max(1),
            _lock: lock,
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .as_ref()
            .ok_or(Error::RegistryClosed)?
            .send(make(reply))
            .map_err(|_| Error::RegistryClosed)?;
        answer.await.map_err(|_| Error::RegistryClosed)?
    }

    /// Runs `query` on a pooled read connection, off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| self.error(&e))?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = query(&conn);
            (conn, result)
        })
        .await
        .map_err(|_| Error::RegistryClosed)?;
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < self.max_readers {
            pool.push(conn);
        }
        result.map_err(|e| self.error(&e))
    }

    fn error(&self, e: &rusqlite::Error) -> Error {
        storage_error(&self.path, e)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what it
        // holds; waiting for it means the file is complete when we return.
        drop(self.writes.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn insert(&self, run: &Run, existing: Existing) -> Result<()> {
        check_times(run)?;
        self.write(|reply| Write::Insert(run.clone(), existing, reply))
            .await
    }

    async fn replace(&self, run: &Run, change: Option<&StatusChange>) -> Result<()> {
        check_times(run)?;
        if let Some(change) = change {
            check_time(change.at)?;
        }
        self.write(|reply| Write::Replace(run.clone(), change.cloned(), reply))
            .await
    }

    async fn transition(&self, change: &Transition) -> Result<Option<String>> {
        check_time(change.at)?;
        self.write(|reply| Write::Transition(change.clone(), reply))
            .await
    }

    async fn set_progress(&self, run_id: &str, progress: &Progress) -> Result<Option<String>> {
        self.write(|reply| Write::Progress(run_id.to_owned(), progress.clone(), reply))
            .await
    }

    async fn get(&self, run_id: &str) -> Result<Option<Run>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1"))?
                .query_row([run_id], read_run)
                .optional()
        })
        .await
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let filter = filter.clone();
        self.read(move |conn| {
            let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1");
            let mut values: Vec<String> = Vec::new();
            if !filter.statuses.is_empty() {
                let marks = vec!["?"; filter.statuses.len()].join(", ");
                sql.push_str(&format!(" AND status IN ({marks})"));
                values.extend(filter.statuses.iter().map(|s| s.as_str().to_owned()));
            }
            if let Some(module_id) = &filter.module_id {
                sql.push_str(" AND module_id = ?");
                values.push(module_id.clone());
            }
            sql.push_str(" ORDER BY created_at DESC, run_id DESC");
            if let Some(limit) = filter.limit {
                sql.push_str(&format!(
                    " LIMIT {}",
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ));
            }
            let mut statement = conn.prepare_cached(&sql)?;
            let runs = statement
                .query_map(rusqlite::params_from_iter(values), read_run)?
                .collect::<rusqlite::Result<Vec<Run>>>()?;
            Ok(runs)
        })
        .await
    }

    async fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT status, at, message FROM run_history WHERE run_id = ?1 ORDER BY seq",
            )?
            .query_map([run_id], |row| {
                Ok(StatusChange {
                    status: column_status(row, 0)?,
                    at: column_time(row, 1)?,
                    message: row.get(2)?,
                })
            })?
            .collect()
        })
        .await
    }

    async fn cleanup(&self, cutoff: DateTime<Utc>) -> Result<usize> {
        self.write(|reply| Write::Cleanup(cutoff, reply)).await
    }

    async fn flush(&self) -> Result<()> {
        self.write(Write::Flush).await
    }
}

fn take_lock(path: &Path) -> std::result::Result<File, String> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot create its lock file: {e}"))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(
            "it is in use by another modrun process; stop that one or choose another file".into(),
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("cannot lock it: {e}")),
    }
}

fn prepare_writer(conn: &mut Connection, synchronous: Synchronous) -> Result<(), String> {
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| describe(&e))?;
    // Reading the schema is the first thing that fails on a file that is
    // not a database, before anything is written to it.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(|e| describe(&e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(|e| describe(&e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!(
            "cannot switch it to WAL journaling (it stays in {mode} mode)"
        ));
    }
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        },
    )
    .map_err(|e| describe(&e))?;
    conn.pragma_update(None, "cache_size", -65536)
        .map_err(|e| describe(&e))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), String> {
    let known = MIGRATIONS.len() as i64;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| describe(&e))?;
    if version > known {
        return Err(format!(
            "its schema version is {version}, newer than this modrun knows ({known}); \
             use a newer modrun or another file"
        ));
    }
    for (version, migration) in (1..).zip(MIGRATIONS).skip(version as usize) {
        let mut step = || -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        step().map_err(|e| {
            format!(
                "cannot bring its schema to version {version}: {}",
                describe(&e)
            )
        })?;
    }
    Ok(())
}

/// Marks runs that a previous process left unfinished as failed.
fn mark_interrupted(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let unfinished: Vec<String> = tx
        .prepare("SELECT run_id FROM runs WHERE status IN ('queued', 'running')")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for run_id in unfinished {
        let change = Transition::failed(run_id, EXIT_FAILURE, INTERRUPTED);
        apply_transition(&tx, &change)?;
    }
    tx.commit()
}

fn write_loop(mut conn: Connection, queue: mpsc::Receiver<Write>, max_batch: usize, path: &Path) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Ok(first) = queue.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, &mut batch, path);
    }
}

/// Applies a batch in one transaction and answers every write once it is
/// committed. A database error fails the whole batch (nothing of it is kept),
/// and every caller in it is told.
fn commit_batch(conn: &mut Connection, batch: &mut Vec<Write>, path: &Path) {
    let mut outcomes = Vec::with_capacity(batch.len());
    let committed = (|| {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for write in batch.iter() {
            outcomes.push(apply(&tx, write)?);
        }
        tx.commit()
    })();
    if let Err(e) = committed {
        tracing::error!(path = %path.display(), error = %e, "run registry commit failed");
        let message = format!(
            "a write failed, nothing of its batch was kept: {}",
            describe(&e)
        );
        outcomes = (0..batch.len())
            .map(|_| {
                Outcome::Failed(Error::Database {
                    path: path.to_path_buf(),
                    message: message.clone(),
                })
            })
            .collect();
    }
    for (write, outcome) in batch.drain(..).zip(outcomes) {
        answer(write, outcome);
    }
}

/// What one write did, before it is committed.
enum Outcome {
    Done,
    Applied(Option<String>),
    Count(usize),
    Failed(Error),
}

impl Outcome {
    fn into_result<T>(self, expected: impl FnOnce(Outcome) -> Option<T>) -> Result<T> {
        match self {
            Outcome::Failed(e) => Err(e),
            other => Ok(expected(other).expect("each write kind yields its own outcome kind")),
        }
    }
}

fn answer(write: Write, outcome: Outcome) {
    // A caller that gave up waiting dropped its receiver: nothing to tell.
    match write {
        Write::Insert(.., reply) | Write::Replace(.., reply) | Write::Flush(reply) => {
            let _ = reply.send(outcome.into_result(|o| matches!(o, Outcome::Done).then_some(())));
        }
        Write::Transition(_, reply) | Write::Progress(.., reply) => {
            let _ = reply.send(outcome.into_result(|o| match o {
                Outcome::Applied(module) => Some(module),
                _ => None,
            }));
        }
        Write::Cleanup(_, reply) => {
            let _ = reply.send(outcome.into_result(|o| match o {
                Outcome::Count(n) => Some(n),
                _ => None,
            }));
        }
    }
}

/// Applies one write inside the batch's transaction. `Err` is a database
/// failure (it aborts the batch); a refusal by the status rules is
/// `Ok(Outcome::Failed)` and writes nothing.
fn apply(tx: &rusqlite::Transaction<'_>, write: &Write) -> rusqlite::Result<Outcome> {
    Ok(match write {
        Write::Insert(run, existing, _) => insert(tx, run, *existing)?,
        Write::Replace(run, change, _) => replace(tx, run, change.as_ref())?,
        Write::Transition(change, _) => Outcome::Applied(apply_transition(tx, change)?),
        Write::Progress(run_id, progress, _) => Outcome::Applied(
            tx.prepare_cached(
                "UPDATE runs SET progress_fraction = ?2, progress_message = ?3 \
                 WHERE run_id = ?1 AND status IN ('queued', 'running') RETURNING module_id",
            )?
            .query_row(
                params![run_id, progress.fraction, progress.message],
                |row| row.get(0),
            )
            .optional()?,
        ),
        Write::Cleanup(cutoff, _) => {
            // A cutoff before 1677 deletes nothing, one after 2262 everything.
            let cutoff = cutoff
                .timestamp_nanos_opt()
                .unwrap_or(if cutoff.timestamp() < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                });
            tx.execute(
                "DELETE FROM run_history WHERE run_id IN (SELECT run_id FROM runs \
                 WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at < ?1)",
                [cutoff],
            )?;
            Outcome::Count(tx.execute(
                "DELETE FROM runs \
                 WHERE status IN ('completed', 'failed', 'cancelled') AND completed_at < ?1",
                [cutoff],
            )?)
        }
        Write::Flush(_) => Outcome::Done,
    })
}

/// The stored status and history length of a run.
fn current(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
) -> rusqlite::Result<Option<(RunStatus, i64)>> {
    tx.prepare_cached("SELECT status, history_len FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |row| Ok((column_status(row, 0)?, row.get(1)?)))
        .optional()
}

fn insert(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    existing: Existing,
) -> rusqlite::Result<Outcome> {
    let history_len = match current(tx, &run.run_id)? {
        None => 0,
        Some((status, _)) if status.is_terminal() => {
            tx.prepare_cached("DELETE FROM run_history WHERE run_id = ?1")?
                .execute([&run.run_id])?;
            tx.prepare_cached("DELETE FROM runs WHERE run_id = ?1")?
                .execute([&run.run_id])?;
            0
        }
        Some((RunStatus::Queued, len)) if existing == Existing::AdoptQueued => {
            write_run(tx, run, len, false)?;
            return Ok(Outcome::Done);
        }
        Some((status, _)) => {
            return Ok(Outcome::Failed(Error::RunActive {
                run_id: run.run_id.clone(),
                status,
            }));
        }
    };
    write_run(tx, run, history_len + 1, true)?;
    add_history(
        tx,
        &run.run_id,
        history_len,
        &StatusChange {
            status: run.status,
            at: run.created_at,
            message: None,
        },
    )?;
    Ok(Outcome::Done)
}

fn replace(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    change: Option<&StatusChange>,
) -> rusqlite::Result<Outcome> {
    let Some((from, len)) = current(tx, &run.run_id)? else {
        return Ok(Outcome::Failed(Error::RunNotFound(run.run_id.clone())));
    };
    if from.is_terminal() {
        return Ok(Outcome::Failed(Error::RunFinished {
            run_id: run.run_id.clone(),
            status: from,
        }));
    }
    match change {
        Some(change) if !from.can_become(change.status) => {
            return Ok(Outcome::Failed(Error::InvalidTransition {
                run_id: run.run_id.clone(),
                from,
                to: change.status,
            }));
        }
        Some(change) => {
            write_run(tx, run, len + 1, false)?;
            add_history(tx, &run.run_id, len, change)?;
        }
        None => write_run(tx, run, len, false)?,
    }
    Ok(Outcome::Done)
}

fn write_run(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    history_len: i64,
    new: bool,
) -> rusqlite::Result<()> {
    let sql = if new {
        "INSERT INTO runs (run_id, module_id, module_name, status, created_at, started_at, \
         completed_at, parameters, exit_code, error_message, output, progress_fraction, \
         progress_message, module_version, history_len) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    } else {
        "UPDATE runs SET module_id = ?2, module_name = ?3, status = ?4, created_at = ?5, \
         started_at = ?6, completed_at = ?7, parameters = ?8, exit_code = ?9, \
         error_message = ?10, output = ?11, progress_fraction = ?12, progress_message = ?13, \
         module_version = ?14, history_len = ?15 WHERE run_id = ?1"
    };
    tx.prepare_cached(sql)?.execute(params![
        run.run_id,
        run.module_id,
        run.module_name,
        run.status.as_str(),
        nanos(run.created_at)?,
        run.started_at.map(nanos).transpose()?,
        run.completed_at.map(nanos).transpose()?,
        json_text(&run.parameters)?,
        run.exit_code,
        run.error_message,
        run.output.as_ref().map(json_text).transpose()?,
        run.progress.as_ref().map(|p| p.fraction),
        run.progress.as_ref().map(|p| p.message.as_str()),
        run.module_version,
        history_len,
    ])?;
    Ok(())
}

fn add_history(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
    seq: i64,
    change: &StatusChange,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO run_history (run_id, seq, status, at, message) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        run_id,
        seq,
        change.status.as_str(),
        nanos(change.at)?,
        change.message
    ])?;
    Ok(())
}

/// Applies `change` if the status flow allows it; returns the module id.
fn apply_transition(
    tx: &rusqlite::Transaction<'_>,
    change: &Transition,
) -> rusqlite::Result<Option<String>> {
    let Some((from, len)) = current(tx, &change.run_id)? else {
        return Ok(None);
    };
    if !from.can_become(change.to) {
        return Ok(None);
    }
    let at = nanos(change.at)?;
    let module_id: String = if change.to.is_terminal() {
        tx.prepare_cached(
            "UPDATE runs SET status = ?2, completed_at = ?3, exit_code = ?4, error_message = ?5, \
             output = coalesce(?6, output), history_len = ?7 WHERE run_id = ?1 RETURNING module_id",
        )?
        .query_row(
            params![
                change.run_id,
                change.to.as_str(),
                at,
                change.exit_code,
                change.error_message,
                change.output.as_ref().map(json_text).transpose()?,
                len + 1
            ],
            |row| row.get(0),
        )?
    } else {
        tx.prepare_cached(
            "UPDATE runs SET status = ?2, started_at = ?3, history_len = ?4 \
             WHERE run_id = ?1 RETURNING module_id",
        )?
        .query_row(
            params![change.run_id, change.to.as_str(), at, len + 1],
            |row| row.get(0),
        )?
    };
    add_history(tx, &change.run_id, len, &change.status_change())?;
    Ok(Some(module_id))
}

fn read_run(row: &Row<'_>) -> rusqlite::Result<Run> {
    let parameters: String = row.get(7)?;
    let output: Option<String> = row.get(10)?;
    let progress_fraction: Option<f64> = row.get(11)?;
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
        progress: match progress_fraction {
            Some(fraction) => Some(Progress {
                fraction,
                message: row.get::<_, Option<String>>(12)?.unwrap_or_default(),
            }),
            None => None,
        },
        module_version: row.get(13)?,
    })
}

fn column_status(row: &Row<'_>, index: usize) -> rusqlite::Result<RunStatus> {
    let text: String = row.get(index)?;
    text.parse().map_err(|e: Error| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, e.into())
    })
}

fn column_time(row: &Row<'_>, index: usize) -> rusqlite::Result<DateTime<Utc>> {
    Ok(DateTime::from_timestamp_nanos(row.get(index)?))
}

fn column_optional_time(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    Ok(row
        .get::<_, Option<i64>>(index)?
        .map(DateTime::from_timestamp_nanos))
}

fn parse_json<T: serde::de::DeserializeOwned>(index: usize, text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, e.into())
    })
}

fn json_text<T: serde::Serialize>(value: &T) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))
}

/// Checks what [`nanos`] would refuse before a write is queued, so that one
/// caller's bad value fails that caller alone, not the batch it would share.
fn check_times(run: &Run) -> Result<()> {
    [Some(run.created_at), run.started_at, run.completed_at]
        .into_iter()
        .flatten()
        .try_for_each(check_time)
}

fn check_time(at: DateTime<Utc>) -> Result<()> {
    match at.timestamp_nanos_opt() {
        Some(_) => Ok(()),
        None => Err(Error::TimeOutOfRange(at)),
    }
}

fn nanos(at: DateTime<Utc>) -> rusqlite::Result<i64> {
    at.timestamp_nanos_opt().ok_or_else(|| {
        rusqlite::Error::ToSqlConversionFailure(
            format!("time {at} is outside the years 1677 to 2262 that the registry stores").into(),
        )
    })
}

fn storage_error(path: &Path, e: &rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..) => Error::Corrupt(describe(e)),
        _ => Error::Database {
            path: path.to_path_buf(),
            message: describe(e),
        },
    }
}

/// SQLite's words for an error, with what to do where SQLite does not say.
fn describe(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            "the file is not a SQLite database (or is damaged); move it away or choose another \
             file"
                .into()
        }
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => {
            "the database is damaged; restore it from a backup or choose another file".into()
        }
        Some(rusqlite::ErrorCode::ReadOnly) => {
            "the file cannot be written; check its permissions".into()
        }
        Some(rusqlite::ErrorCode::CannotOpen) => {
            format!("{e}; check that the path is a file in a directory you can write")
        }
        _ => e.to_string(),
    }
}
