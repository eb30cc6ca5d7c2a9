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
//! connections and see committed data only. The one write nobody waits for
//! is [`RunStore::record_progress`]: it is queued in order with the run's
//! other writes and committed with the next batch, so a crash can lose the
//! last progress report, never a status.
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
use crate::run::{EXIT_FAILURE, LogEntry, Progress, Run, RunStatus, StatusChange, Transition};

/// The schema, one migration per schema version, applied in order.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_run_log.sql"),
];

/// The message recorded on runs found unfinished when the registry opens.
pub const INTERRUPTED: &str =
    "interrupted: the modrun process running it stopped before the run finished";

const RUN_COLUMNS: &str = "run_id, module_id, module_name, status, created_at, started_at, \
     completed_at, parameters, exit_code, error_message, output, progress_fraction, \
     progress_message, module_version, log";

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
    stop_checkpoints: Option<mpsc::Sender<()>>,
    checkpointer: Option<JoinHandle<()>>,
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
    Log(String, Vec<LogEntry>, Reply<bool>),
    Cleanup(DateTime<Utc>, Reply<usize>),
    Flush(Reply<()>),
}

impl SqliteStore {
    /// Opens (or creates) the registry at `path`.
    ///
    /// Fails with a clear [`Error::Database`] if the file is not a SQLite
    /// database, is damaged, cannot be written or was written by a newer
    /// modrun, and with [`Error::RegistryInUse`] if another process holds
    /// it — never by starting empty.
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
        let lock = take_lock(&path)?;

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
        let checkpoints = Connection::open(&path)
            .map_err(|e| fail(format!("cannot open it for checkpoints: {}", describe(&e))))?;
        let (stop_checkpoints, stopped) = mpsc::channel();
        let checkpointer = std::thread::Builder::new()
            .name("modrun-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpoints, &stopped))
            .map_err(|e| fail(format!("cannot start its checkpoint thread: {e}")))?;

        Ok(SqliteStore {
            path,
            writes: Some(writes),
            writer: Some(writer),
            stop_checkpoints: Some(stop_checkpoints),
            checkpointer: Some(checkpointer),
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

    /// Queues a write and waits for its commit.
    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(make(reply))?;
        answer.await.map_err(|_| Error::RegistryClosed)?
    }

    /// Hands a write to the writer thread, in order with all the others.
    fn enqueue(&self, write: Write) -> Result<()> {
        self.writes
            .as_ref()
            .ok_or(Error::RegistryClosed)?
            .send(write)
            .map_err(|_| Error::RegistryClosed)
    }

    /// Runs `query` on a pooled read connection, off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_read_only(&self.path).map_err(|e| self.error(&e))?,
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
        drop(self.stop_checkpoints.take());
        for thread in [self.writer.take(), self.checkpointer.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
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

    fn record_progress(&self, run_id: &str, progress: &Progress) -> Result<()> {
        // Queued like any write, in order; nobody waits for its commit.
        let (reply, _) = oneshot::channel();
        self.enqueue(Write::Progress(run_id.to_owned(), progress.clone(), reply))
    }

    async fn set_log(&self, run_id: &str, log: &[LogEntry]) -> Result<bool> {
        self.write(|reply| Write::Log(run_id.to_owned(), log.to_vec(), reply))
            .await
    }

    async fn get(&self, run_id: &str) -> Result<Option<Run>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| select_run(conn, &run_id)).await
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let filter = filter.clone();
        self.read(move |conn| select_runs(conn, &filter)).await
    }

    async fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| select_history(conn, &run_id)).await
    }

    async fn cleanup(&self, cutoff: DateTime<Utc>) -> Result<usize> {
        self.write(|reply| Write::Cleanup(cutoff, reply)).await
    }

    async fn flush(&self) -> Result<()> {
        self.write(Write::Flush).await
    }
}

/// A read-only view of a registry file that another process (a running
/// `modrun serve`) owns: what `modrun runs` and `modrun show` use while a
/// server holds the file. It takes no lock and changes nothing, not even
/// runs a crashed process left unfinished; WAL mode lets it read beside the
/// owner's writes, and it sees what was committed.
pub struct SqliteReader {
    path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for SqliteReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteReader {
    /// Opens the registry at `path` for reading. Fails with a clear
    /// [`Error::Database`] if it is missing, not a registry, or written by
    /// a newer modrun.
    pub fn open(path: impl AsRef<Path>) -> Result<SqliteReader> {
        let path = path.as_ref().to_path_buf();
        let fail = |message: String| Error::Database {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(fail("no such file".into()));
        }
        let conn = open_read_only(&path)
            .map_err(|e| fail(format!("cannot open the file: {}", describe(&e))))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| fail(describe(&e)))?;
        if schema_version(&conn).map_err(fail)? == 0 {
            return Err(fail("it is not a modrun run registry (no schema)".into()));
        }
        Ok(SqliteReader { path, conn })
    }

    /// One run.
    pub fn get(&self, run_id: &str) -> Result<Option<Run>> {
        select_run(&self.conn, run_id).map_err(|e| storage_error(&self.path, &e))
    }

    /// Runs matching `filter`, newest first.
    pub fn list(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        select_runs(&self.conn, filter).map_err(|e| storage_error(&self.path, &e))
    }

    /// The status changes of a run, oldest first (empty if unknown).
    pub fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        select_history(&self.conn, run_id).map_err(|e| storage_error(&self.path, &e))
    }
}

fn take_lock(path: &Path) -> Result<File> {
    let fail = |message: String| Error::Database {
        path: path.to_path_buf(),
        message,
    };
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| fail(format!("cannot create its lock file: {e}")))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::RegistryInUse {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(fail(format!("cannot lock it: {e}"))),
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
    // A 64 MiB page cache. Checkpoints (copying the log into the database
    // file) are the checkpoint thread's job, not the writer's.
    conn.pragma_update(None, "cache_size", -65536)
        .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", 0))
        .map_err(|e| describe(&e))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// A connection that only reads, for use off the writer thread.
fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// The file's schema version (0 for a file modrun never wrote); refused if
/// a newer modrun wrote it.
fn schema_version(conn: &Connection) -> Result<i64, String> {
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
    Ok(version)
}

fn migrate(conn: &mut Connection) -> Result<(), String> {
    let version = schema_version(conn)?;
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

/// How often the checkpoint thread copies the log into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Checkpoints the log beside the writer, so that commits never wait for
/// one; stops when the store is dropped. A passive checkpoint never blocks
/// the writer or readers: what it cannot copy now it copies next time.
fn checkpoint_loop(conn: &Connection, stop: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "run registry checkpoint failed; retrying later");
        }
    }
}

fn write_loop(mut conn: Connection, queue: mpsc::Receiver<Write>, max_batch: usize, path: &Path) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut busy = false;
    while let Some(first) = next_write(&queue, busy) {
        batch.push(first);
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        busy = batch.len() >= BUSY_BATCH;
        commit_batch(&mut conn, &mut batch, path);
    }
}

/// A batch this large means writes are pouring in: worth lingering for more.
const BUSY_BATCH: usize = 8;

/// How long a busy writer keeps looking for more work before it sleeps.
const WRITER_LINGER: std::time::Duration = std::time::Duration::from_micros(200);

/// The next write, or `None` once every sender is gone.
///
/// Under load (`busy`), writes arrive every few microseconds: the writer
/// lingers a moment, yielding its core, before it blocks, because waking a
/// sleeping thread costs each sender a system call and the writer a context
/// switch, more than the write itself. When writes come one at a time it
/// blocks at once, leaving the core to whoever is producing them.
fn next_write(queue: &mpsc::Receiver<Write>, busy: bool) -> Option<Write> {
    let since = std::time::Instant::now();
    loop {
        match queue.try_recv() {
            Ok(write) => return Some(write),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if busy && since.elapsed() < WRITER_LINGER => {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return queue.recv().ok(),
        }
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
        Write::Log(.., reply) => {
            let _ = reply.send(outcome.into_result(|o| match o {
                Outcome::Count(n) => Some(n == 1),
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
        Write::Progress(run_id, progress, _) => {
            match current(tx, run_id)? {
                Some(stored) if stored.status.is_active() => {
                    tx.prepare_cached(
                    "UPDATE runs SET progress_fraction = ?2, progress_message = ?3 WHERE id = ?1",
                )?
                .execute(params![stored.id, progress.fraction, progress.message])?;
                    Outcome::Applied(Some(stored.module_id))
                }
                _ => Outcome::Applied(None),
            }
        }
        Write::Log(run_id, log, _) => Outcome::Count(
            tx.prepare_cached("UPDATE runs SET log = ?2 WHERE run_id = ?1")?
                .execute(params![run_id, log_text(log)?])?,
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
                "DELETE FROM run_history WHERE run IN (SELECT id FROM runs \
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

/// What the write path needs of a stored run.
struct Stored {
    id: i64,
    status: RunStatus,
    history_len: i64,
    module_id: String,
}

fn current(tx: &rusqlite::Transaction<'_>, run_id: &str) -> rusqlite::Result<Option<Stored>> {
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

fn insert(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    existing: Existing,
) -> rusqlite::Result<Outcome> {
    // The common case, a new id, takes one statement; only a conflict looks further.
    if let Some(id) = insert_run(tx, run)? {
        add_history(tx, id, 0, &first_change(run))?;
        return Ok(Outcome::Done);
    }
    match current(tx, &run.run_id)? {
        Some(stored) if stored.status.is_terminal() => {
            tx.prepare_cached("DELETE FROM run_history WHERE run = ?1")?
                .execute([stored.id])?;
            tx.prepare_cached("DELETE FROM runs WHERE id = ?1")?
                .execute([stored.id])?;
            let id = insert_run(tx, run)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
            add_history(tx, id, 0, &first_change(run))?;
            Ok(Outcome::Done)
        }
        Some(stored) if stored.status == RunStatus::Queued && existing == Existing::AdoptQueued => {
            update_run(tx, run, stored.history_len)?;
            Ok(Outcome::Done)
        }
        Some(stored) => Ok(Outcome::Failed(Error::RunActive {
            run_id: run.run_id.clone(),
            status: stored.status,
        })),
        // The insert met a conflict, so the row exists within this transaction.
        None => Err(rusqlite::Error::QueryReturnedNoRows),
    }
}

/// The history entry a run starts with.
fn first_change(run: &Run) -> StatusChange {
    StatusChange {
        status: run.status,
        at: run.created_at,
        message: None,
    }
}

fn replace(
    tx: &rusqlite::Transaction<'_>,
    run: &Run,
    change: Option<&StatusChange>,
) -> rusqlite::Result<Outcome> {
    let Some(stored) = current(tx, &run.run_id)? else {
        return Ok(Outcome::Failed(Error::RunNotFound(run.run_id.clone())));
    };
    let from = stored.status;
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
            update_run(tx, run, stored.history_len + 1)?;
            add_history(tx, stored.id, stored.history_len, change)?;
        }
        None => update_run(tx, run, stored.history_len)?,
    }
    Ok(Outcome::Done)
}

/// Inserts a new row with a one-entry history length; `None` if the id is taken.
///
/// (No `RETURNING` here or below: SQLite builds a temporary table for it on
/// every execution, which costs more than the statement.)
fn insert_run(tx: &rusqlite::Transaction<'_>, run: &Run) -> rusqlite::Result<Option<i64>> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO runs (run_id, module_id, module_name, status, created_at, started_at, \
             completed_at, parameters, exit_code, error_message, output, progress_fraction, \
             progress_message, module_version, log, history_len) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
             ON CONFLICT (run_id) DO NOTHING",
        )?
        .execute(run_values(run, 1)?)?;
    Ok((inserted == 1).then(|| tx.last_insert_rowid()))
}

/// Writes the whole record over the stored one.
fn update_run(tx: &rusqlite::Transaction<'_>, run: &Run, history_len: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE runs SET module_id = ?2, module_name = ?3, status = ?4, created_at = ?5, \
         started_at = ?6, completed_at = ?7, parameters = ?8, exit_code = ?9, \
         error_message = ?10, output = ?11, progress_fraction = ?12, progress_message = ?13, \
         module_version = ?14, log = ?15, history_len = ?16 WHERE run_id = ?1",
    )?
    .execute(run_values(run, history_len)?)?;
    Ok(())
}

/// The column values of a record, in `RUN_COLUMNS` order then `history_len`.
fn run_values(
    run: &Run,
    history_len: i64,
) -> rusqlite::Result<[Box<dyn rusqlite::ToSql + '_>; 16]> {
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
    ])
}

fn add_history(
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
fn apply_transition(
    tx: &rusqlite::Transaction<'_>,
    change: &Transition,
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
             output = coalesce(?6, output), log = coalesce(?7, log), history_len = ?8 \
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

fn select_run(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<Run>> {
    conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?1"))?
        .query_row([run_id], read_run)
        .optional()
}

fn select_runs(conn: &Connection, filter: &RunFilter) -> rusqlite::Result<Vec<Run>> {
    let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE 1 = 1");
    let mut values: Vec<String> = Vec::new();
    if !filter.statuses.is_empty() {
        // Status names are ours, not the caller's: safe to inline, and
        // inlined the planner can prove the active-runs index applies.
        let names: Vec<String> = filter.statuses.iter().map(|s| format!("'{s}'")).collect();
        sql.push_str(&format!(" AND status IN ({})", names.join(", ")));
        if filter.statuses.iter().all(|s| s.is_active()) {
            sql.push_str(" AND status IN ('queued', 'running')");
        }
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
}

fn select_history(conn: &Connection, run_id: &str) -> rusqlite::Result<Vec<StatusChange>> {
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
        log: match row.get::<_, Option<String>>(14)? {
            Some(text) => parse_json(14, &text)?,
            None => Vec::new(),
        },
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

fn log_text(log: &[LogEntry]) -> rusqlite::Result<Option<String>> {
    if log.is_empty() {
        Ok(None)
    } else {
        json_text(&log).map(Some)
    }
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
