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
//! connections and see committed data only. The writes nobody waits for are
//! progress reports ([`RunStore::record_progress`], the latest per run
//! kept) and a stopped run's log ([`RunStore::record_log`]): they are queued
//! in order with the run's other writes and committed with the next batch,
//! so a crash can lose the last progress report, never a status.
//!
//! # When the file cannot be written
//!
//! A full disk, a lock held by another process, a file deleted under the
//! store: the store then reports itself unavailable ([`RunStore::health`]),
//! refuses writes that someone waits on with
//! [`Error::RegistryUnavailable`] saying why, and holds the writes a run's
//! own task makes ([`OnUnavailable::Hold`]), retrying them with backoff until
//! they commit. See the writer (`writer.rs`).
//!
//! The database runs in WAL mode. With [`Synchronous::Normal`] (the default)
//! a commit survives the process being killed at any point; the last commits
//! before a power loss or kernel crash may be lost. [`Synchronous::Full`]
//! syncs every commit to disk, which survives those too, at the price of an
//! fsync per batch.
//!
//! Opening the file takes an exclusive lock beside it (`<file>.lock`), so two
//! processes never share one registry, then marks every run a previous
//! process left `Running`, and every plain task it left `Queued`, as
//! `Failed` ("interrupted"). Module runs it left `Queued` stay queued, for
//! [`ModuleRunner::resume_queued`](crate::ModuleRunner::resume_queued).

mod backend;
mod reader;
mod schema;
mod sql;

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
pub use reader::SqliteReader;
use rusqlite::Connection;

use super::writer::{Direct, Handoff, Queue, Shared, Write};
use super::{
    Cleanup, Existing, OnUnavailable, RunFilter, RunStore, RunSummary, StoreHealth, Tally, Wanted,
};
use crate::error::{Error, Result};
use crate::run::{LogEntry, Progress, Run, StatusChange, Transition};
use crate::sync::LockUnpoisoned;
use backend::SqliteBackend;
use chrono::{DateTime, Utc};
use schema::{open_read_only, open_writer, storage_error, take_lock};

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

/// Runs in a SQLite file, in WAL mode, written by one thread that commits
/// many writes at once; what is durable when is in the README
/// ("What is durable when").
pub struct SqliteStore {
    writes: Queue,
    checkpoints: mpsc::SyncSender<Checkpoint>,
    checkpointer: Option<JoinHandle<()>>,
    /// The writer's way in for the watch on the log ([`watch_log`]): let
    /// go when the store closes, so that the writer thread sees its last
    /// sender gone.
    handoff: Arc<Mutex<Option<Handoff>>>,
    readers: Mutex<Vec<Connection>>,
    max_readers: usize,
    _lock: File,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.writes.shared.path)
            .finish_non_exhaustive()
    }
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
        let mut conn = open_writer(&path, options.synchronous).map_err(fail)?;
        // One wake-up waiting is enough: the checkpoint copies all there is.
        let (checkpoints, asked) = mpsc::sync_channel(1);
        let handoff = Arc::new(Mutex::new(None));
        watch_log(&mut conn, checkpoints.clone(), handoff.clone())
            .map_err(|e| fail(schema::describe(&e)))?;

        let shared = Arc::new(Shared::new(path.clone()));
        let backend = SqliteBackend::new(conn, path.clone());
        let writes = Queue::start(
            backend,
            shared.clone(),
            options.max_batch,
            "modrun-registry",
            Direct::Allowed,
        )
        .map_err(|e| fail(format!("cannot start its writer thread: {e}")))?;
        *handoff.lock_unpoisoned() = writes.handoff();
        let checkpoint_conn = Connection::open(&path).map_err(|e| {
            fail(format!(
                "cannot open it for checkpoints: {}",
                schema::describe(&e)
            ))
        })?;
        let watched = backend::FileCheck::new(&path);
        let wake_writer = writes.sender().ok_or(Error::RegistryClosed)?;
        let checkpointer = std::thread::Builder::new()
            .name("modrun-checkpoint".into())
            .spawn(move || {
                checkpoint_loop(&checkpoint_conn, &asked, &shared, &watched, &wake_writer)
            })
            .map_err(|e| fail(format!("cannot start its checkpoint thread: {e}")))?;

        Ok(SqliteStore {
            writes,
            checkpoints,
            checkpointer: Some(checkpointer),
            handoff,
            readers: Mutex::new(Vec::new()),
            max_readers: options.readers.max(1),
            _lock: lock,
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.writes.shared.path
    }

    /// Runs `query` on a pooled read connection, off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let pooled = self.readers.lock_unpoisoned().pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_read_only(self.path()).map_err(|e| self.error(&e))?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = query(&conn);
            (conn, result)
        })
        .await
        .map_err(|_| Error::RegistryClosed)?;
        let mut pool = self.readers.lock_unpoisoned();
        if pool.len() < self.max_readers {
            pool.push(conn);
        }
        result.map_err(|e| self.error(&e))
    }

    fn error(&self, e: &rusqlite::Error) -> Error {
        storage_error(self.path(), e)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The checkpoint thread and the watch on the log can hand the
        // writer work: they let go first, then the writer ends (as
        // `writes` is dropped) once it has committed what it holds, so
        // the file is complete when we return.
        let _ = self.checkpoints.send(Checkpoint::Stop);
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
        self.handoff.lock_unpoisoned().take();
    }
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn insert(&self, run: &Run, existing: Existing, key: Option<&str>) -> Result<()> {
        self.writes.insert(run, existing, key).await
    }

    async fn enqueue(&self, run: &Run, max_attempts: u32, key: Option<&str>) -> Result<()> {
        self.writes.enqueue_run(run, max_attempts, key).await
    }

    async fn claim(&self, wanted: &[Wanted], limit: usize) -> Result<Vec<Run>> {
        if wanted.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        self.writes.claim(wanted, limit).await
    }

    async fn release(&self, run_ids: &[String], reason: &str) -> Result<Vec<(String, String)>> {
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.writes.release(run_ids, reason).await
    }

    async fn claimed(&self) -> Result<Vec<String>> {
        self.read(sql::claimed).await
    }

    async fn queued_versions(&self) -> Result<Vec<String>> {
        self.read(sql::queued_versions).await
    }

    async fn next_due(&self, after: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        self.read(move |conn| sql::next_due(conn, after)).await
    }

    async fn run_by_key(&self, key: &str) -> Result<Option<Run>> {
        let key = key.to_owned();
        self.read(move |conn| sql::select_run_by_key(conn, &key))
            .await
    }

    async fn replace(&self, run: &Run, change: Option<&StatusChange>) -> Result<()> {
        self.writes.replace(run, change).await
    }

    async fn transition(
        &self,
        change: &Transition,
        unavailable: OnUnavailable,
    ) -> Result<Option<String>> {
        self.writes.transition(change, unavailable).await
    }

    async fn set_progress(&self, run_id: &str, progress: &Progress) -> Result<Option<String>> {
        self.writes.set_progress(run_id, progress).await
    }

    fn record_progress(&self, run_id: &str, progress: &Progress) -> Result<()> {
        self.writes.record_progress(run_id, progress)
    }

    async fn set_log(&self, run_id: &str, log: &[LogEntry]) -> Result<bool> {
        self.writes.set_log(run_id, log).await
    }

    fn record_log(&self, run_id: &str, log: Vec<LogEntry>) -> Result<()> {
        self.writes.record_log(run_id, log)
    }

    async fn get(&self, run_id: &str) -> Result<Option<Run>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| sql::select_run(conn, &run_id)).await
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let filter = filter.clone();
        self.read(move |conn| sql::select_runs(conn, &filter)).await
    }

    async fn list_summaries(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        let filter = filter.clone();
        self.read(move |conn| sql::select_summaries(conn, &filter))
            .await
    }

    async fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        let run_id = run_id.to_owned();
        self.read(move |conn| sql::select_history(conn, &run_id))
            .await
    }

    async fn remove_finished(&self, cleanup: &Cleanup, limit: usize) -> Result<usize> {
        self.writes.remove_finished(cleanup, limit).await
    }

    async fn count_finished(&self, cleanup: &Cleanup) -> Result<usize> {
        let cleanup = cleanup.clone();
        self.read(move |conn| sql::count_finished(conn, &cleanup))
            .await
    }

    async fn tally(&self, since: DateTime<Utc>, limit: usize) -> Result<Tally> {
        self.read(move |conn| sql::tally(conn, since, limit)).await
    }

    async fn disk_bytes(&self) -> Result<Option<u64>> {
        // The file, and its write-ahead log until it is checkpointed.
        let mut bytes = 0;
        for suffix in ["", "-wal"] {
            let mut path = self.path().as_os_str().to_owned();
            path.push(suffix);
            bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        }
        Ok(Some(bytes))
    }

    async fn flush(&self) -> Result<()> {
        self.writes.flush().await
    }

    fn health(&self) -> StoreHealth {
        self.writes.shared.health()
    }
}

/// How often the checkpoint thread copies the log into the database file
/// when nothing asks it sooner.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// How many frames (pages) the writer appends to the log between two
/// wake-ups of the checkpoint thread: about 4 MiB of 4 KiB pages. Each
/// checkpoint syncs the log and the file, so fewer of them cost less CPU;
/// the writer's own checkpoint then has at most this much left to sync.
const LOG_FRAMES_STEP: i32 = 1_024;

/// How many frames the log may hold before the writer checkpoints it
/// itself: about 12 MiB of 4 KiB pages, under the 16 MiB the file is cut
/// back to (`journal_size_limit`).
///
/// The log only starts over from its beginning when a checkpoint has
/// copied all of it before the next commit, which a checkpoint beside a
/// writer that never pauses cannot do: without this, under steady load the
/// log grows by every page of every commit (hundreds of MB a minute) until
/// the load stops or the disk is full, and each of its new pages costs the
/// kernel an allocation. The checkpoint thread has copied, and synced, all
/// but the last [`LOG_FRAMES_STEP`] frames or so by then, so the writer's
/// own checkpoint is short.
const LOG_FRAMES_MAX: i32 = 3_072;

/// How many more frames the writer appends before it checkpoints again,
/// when its checkpoint left the log as it was: a reader still reading an
/// older state of the file (a long query, another process) keeps the log
/// from starting over, and a checkpoint per commit meanwhile would sync
/// the files at every commit.
const LOG_FRAMES_RETRY: i32 = 256;

/// What the checkpoint thread is asked.
enum Checkpoint {
    /// The log has grown: copy it now.
    Now,
    /// The store is closing.
    Stop,
}

/// Keeps the log of the writer's connection bounded: after each commit,
/// wakes the checkpoint thread every [`LOG_FRAMES_STEP`] frames, and past
/// [`LOG_FRAMES_MAX`] hands the writer thread a checkpoint
/// ([`Write::Checkpoint`], every [`LOG_FRAMES_RETRY`] frames until it
/// takes), so that the next commit starts the log over. Handed over
/// whichever thread committed: a caller that committed its own write (on
/// an async runtime's thread, often) must not wait for it.
fn watch_log(
    conn: &mut Connection,
    checkpoints: mpsc::SyncSender<Checkpoint>,
    writer: Arc<Mutex<Option<Handoff>>>,
) -> rusqlite::Result<()> {
    // The log's length when the writer last woke the thread or checkpointed.
    let mut acted_at = 0;
    conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: i32| {
        if frames < acted_at {
            // The log started over.
            acted_at = 0;
        }
        if frames >= LOG_FRAMES_MAX && frames - acted_at >= LOG_FRAMES_RETRY {
            acted_at = frames;
            if let Some(writer) = &*writer.lock_unpoisoned() {
                let _ = writer.send(Write::Checkpoint);
            }
        } else if frames - acted_at >= LOG_FRAMES_STEP {
            acted_at = frames;
            // Full: a wake-up is on its way already.
            let _ = checkpoints.try_send(Checkpoint::Now);
        }
        Ok(())
    }))
}

/// Checkpoints the log beside the writer, so that commits rarely wait for
/// one: when the writer asks ([`watch_log`]), and every
/// [`CHECKPOINT_EVERY`] otherwise; stops when the store is dropped. A
/// passive checkpoint never blocks the writer or readers: what it cannot
/// copy now it copies next time.
///
/// It also looks at the file each time: one deleted or replaced under the
/// store wakes the writer, which then reports the registry unavailable even
/// when nothing is being written.
fn checkpoint_loop(
    conn: &Connection,
    asked: &mpsc::Receiver<Checkpoint>,
    shared: &Shared,
    file: &backend::FileCheck,
    writer: &mpsc::Sender<Write>,
) {
    loop {
        match asked.recv_timeout(CHECKPOINT_EVERY) {
            Ok(Checkpoint::Now) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Checkpoint::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if shared.unavailable().is_none() && file.check().is_err() {
            let _ = writer.send(Write::Check);
            continue;
        }
        backend::checkpoint(conn);
    }
}
