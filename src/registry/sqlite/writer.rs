//! The writer thread: every write of a [`SqliteStore`](super::SqliteStore)
//! goes through it, in order, many to a transaction (group commit).
//!
//! When the file cannot be written for now (the disk is full, another
//! process holds a lock, the file was deleted), a write either waits or is
//! refused, as it asked ([`OnUnavailable`]). What waits — a run's own
//! status changes, its progress, its log — is held in order and retried with
//! backoff until it commits, so no run is left `running` because one commit
//! failed; what is refused — a start, a cancel — hears why at once, so a
//! caller is never told something happened that the file does not hold.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use super::schema::{describe, unavailable_reason};
use super::sql::{self, Outcome};
use crate::error::{Error, Result};
use crate::registry::{Existing, OnUnavailable, StoreHealth};
use crate::run::{LogEntry, Progress, Run, StatusChange, Transition};

pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

/// One write, queued for the writer thread.
pub(super) enum Write {
    Insert(Run, Existing, Reply<()>),
    Replace(Run, Option<StatusChange>, Reply<()>),
    Transition(Transition, OnUnavailable, Reply<Option<String>>),
    Progress(String, Progress, Reply<Option<String>>),
    /// The progress reports waiting in [`Shared::progress`]: taken when the
    /// writer reaches this point of the queue, so they stay in order with
    /// the runs' other writes.
    ReportedProgress,
    /// Progress reports already taken, kept for the next attempt.
    TakenProgress(Vec<(String, Progress)>),
    /// A log to save; with no reply, nobody waits and it is held.
    Log(String, Vec<LogEntry>, Option<Reply<bool>>),
    Cleanup(DateTime<Utc>, Reply<usize>),
    Flush(Reply<()>),
    /// Nothing to write: wakes the writer to find out what the checkpoint
    /// thread noticed (the file deleted or replaced).
    Check,
}

impl Write {
    /// Whether the write waits, held, while the file cannot be written.
    fn is_held(&self) -> bool {
        matches!(
            self,
            Write::Transition(_, OnUnavailable::Hold, _)
                | Write::ReportedProgress
                | Write::TakenProgress(_)
                | Write::Log(_, _, None)
        )
    }
}

/// What the store and its writer thread share.
pub(super) struct Shared {
    pub(super) path: PathBuf,
    /// The file the store opened, to notice it deleted or replaced.
    identity: Option<FileIdentity>,
    /// Why the file cannot be written now; `None` while it can.
    unavailable: Mutex<Option<String>>,
    /// Progress reports not yet taken by the writer: the latest of each run.
    /// Bounded by the number of active runs, however often they report.
    progress: Mutex<HashMap<String, Progress>>,
    /// Writes waiting for the file to be writable again.
    held: AtomicUsize,
}

impl Shared {
    /// State for the registry file at `path`, which must be open already.
    pub(super) fn new(path: PathBuf) -> Shared {
        Shared {
            identity: file_identity(&path),
            path,
            unavailable: Mutex::new(None),
            progress: Mutex::new(HashMap::new()),
            held: AtomicUsize::new(0),
        }
    }

    pub(super) fn health(&self) -> StoreHealth {
        StoreHealth {
            unavailable: lock(&self.unavailable).clone(),
            held_writes: self.held.load(Ordering::Relaxed),
        }
    }

    /// Why the file cannot be written, if it cannot.
    pub(super) fn unavailable(&self) -> Option<String> {
        lock(&self.unavailable).clone()
    }

    /// Keeps the latest progress of a run; returns whether the writer must
    /// be told (no report was waiting, so no [`Write::ReportedProgress`] is
    /// queued).
    pub(super) fn report_progress(&self, run_id: &str, progress: &Progress) -> bool {
        let mut waiting = lock(&self.progress);
        let first = waiting.is_empty();
        match waiting.get_mut(run_id) {
            Some(latest) => latest.clone_from(progress),
            None => {
                waiting.insert(run_id.to_owned(), progress.clone());
            }
        }
        first
    }

    fn take_progress(&self) -> Vec<(String, Progress)> {
        lock(&self.progress).drain().collect()
    }

    /// Whether the registry's path still names the file the store opened:
    /// after a deletion the store would write into a file nobody can open
    /// again, and everything committed there would be lost at the next start.
    pub(super) fn check_file(&self) -> Result<(), String> {
        let path = self.path.display();
        match std::fs::metadata(&self.path) {
            Ok(metadata) if Some(identity_of(&metadata)) == self.identity => Ok(()),
            Ok(_) => Err(format!(
                "the registry file {path} was replaced by another file while modrun had it \
                 open: put the original back, or restart modrun"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "the registry file {path} was deleted while modrun had it open: put it back, \
                 or restart modrun to start a new registry"
            )),
            Err(e) => Err(format!("cannot check the registry file {path}: {e}")),
        }
    }

    fn set_unavailable(&self, reason: Option<String>) {
        let mut unavailable = lock(&self.unavailable);
        match (&*unavailable, &reason) {
            (None, Some(reason)) => {
                tracing::error!(path = %self.path.display(), %reason, "run registry unavailable: holding run updates, refusing starts");
            }
            (Some(_), None) => {
                tracing::info!(path = %self.path.display(), "run registry writable again: held updates committed");
            }
            _ => {}
        }
        *unavailable = reason;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single assignment or map operation.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first wait before a held batch is tried again; it doubles up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LAST_RETRY: Duration = Duration::from_secs(2);

/// How long a closing store keeps trying to commit what it holds.
const CLOSING_RETRIES_FOR: Duration = Duration::from_secs(5);

/// A batch this large means writes are pouring in: worth lingering for more.
const BUSY_BATCH: usize = 8;

/// How long a busy writer keeps looking for more work before it sleeps.
const WRITER_LINGER: Duration = Duration::from_micros(200);

/// The writer thread's connection and what it checks before each commit.
pub(super) struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    max_batch: usize,
}

impl Writer {
    pub(super) fn new(conn: Connection, shared: Arc<Shared>, max_batch: usize) -> Writer {
        Writer {
            conn,
            shared,
            max_batch: max_batch.max(1),
        }
    }

    /// Runs until every sender is gone and nothing is held (or the held
    /// writes could not be committed in [`CLOSING_RETRIES_FOR`]).
    pub(super) fn run(mut self, queue: &mpsc::Receiver<Write>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut held: Vec<Write> = Vec::new();
        let mut busy = false;
        let mut backoff = FIRST_RETRY;
        let mut closed_at: Option<Instant> = None;
        loop {
            if let Some(reason) = self.shared.unavailable() {
                if closed_at.is_some() {
                    std::thread::sleep(backoff);
                } else if !wait_out(queue, backoff, &reason, &mut held) {
                    closed_at = Some(Instant::now());
                }
                batch.append(&mut held);
            } else if closed_at.is_none() {
                match next_write(queue, busy) {
                    Some(write) => batch.push(write),
                    None => closed_at = Some(Instant::now()),
                }
            }
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            if closed_at.is_some() && batch.is_empty() {
                return;
            }
            busy = batch.len() >= BUSY_BATCH;
            match self.commit(&mut batch) {
                Ok(()) => backoff = FIRST_RETRY,
                Err(reason) => {
                    for write in batch.drain(..) {
                        if write.is_held() {
                            held.push(write);
                        } else {
                            refuse(write, &reason);
                        }
                    }
                    backoff = (backoff * 2).min(LAST_RETRY);
                    if closed_at.is_some_and(|at| at.elapsed() > CLOSING_RETRIES_FOR) {
                        tracing::error!(
                            path = %self.shared.path.display(),
                            writes = held.len(),
                            %reason,
                            "run registry closed with updates it could not commit; \
                             the runs they concern are marked interrupted when it next opens"
                        );
                        return;
                    }
                }
            }
            self.shared.held.store(held.len(), Ordering::Relaxed);
        }
    }

    /// Applies a batch in one transaction and answers every write once it
    /// is committed. `Err` is why the file cannot be written: the batch is
    /// left as it was, for the caller to hold or refuse. A write the status
    /// rules refuse fails alone; a value SQLite rejects fails the batch.
    fn commit(&mut self, batch: &mut Vec<Write>) -> Result<(), String> {
        if let Err(reason) = self.shared.check_file() {
            self.shared.set_unavailable(Some(reason.clone()));
            return Err(reason);
        }
        for write in batch.iter_mut() {
            if matches!(write, Write::ReportedProgress) {
                *write = Write::TakenProgress(self.shared.take_progress());
            }
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        let committed = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if batch.is_empty() {
                // Nothing to write, but the file was unavailable: a real
                // write (the header page) tells whether it is writable again.
                let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
                tx.pragma_update(None, "user_version", version)?;
            }
            for write in batch.iter() {
                outcomes.push(apply(&tx, write)?);
            }
            tx.commit()
        })();
        match committed {
            Ok(()) => self.shared.set_unavailable(None),
            Err(e) => match unavailable_reason(&e) {
                Some(reason) => {
                    self.shared.set_unavailable(Some(reason.clone()));
                    return Err(reason);
                }
                None => {
                    tracing::error!(path = %self.shared.path.display(), error = %e, "run registry commit failed");
                    let message = format!(
                        "a write failed, nothing of its batch was kept: {}",
                        describe(&e)
                    );
                    outcomes = (0..batch.len())
                        .map(|_| {
                            Outcome::Failed(Error::Database {
                                path: self.shared.path.clone(),
                                message: message.clone(),
                            })
                        })
                        .collect();
                }
            },
        }
        for (write, outcome) in batch.drain(..).zip(outcomes) {
            answer(write, outcome);
        }
        Ok(())
    }
}

/// Which file a path names (device and inode), to notice it replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity(u64, u64);

fn file_identity(path: &Path) -> Option<FileIdentity> {
    std::fs::metadata(path)
        .ok()
        .map(|metadata| identity_of(&metadata))
}

#[cfg(unix)]
fn identity_of(metadata: &std::fs::Metadata) -> FileIdentity {
    use std::os::unix::fs::MetadataExt;
    FileIdentity(metadata.dev(), metadata.ino())
}

/// Elsewhere only a deleted file is noticed.
#[cfg(not(unix))]
fn identity_of(_: &std::fs::Metadata) -> FileIdentity {
    FileIdentity(0, 0)
}

/// Waits `backoff` before held writes are tried again, taking in new
/// writes meanwhile: those that wait join the held ones, the others are
/// refused at once. Returns `false` once every sender is gone.
fn wait_out(
    queue: &mpsc::Receiver<Write>,
    backoff: Duration,
    reason: &str,
    held: &mut Vec<Write>,
) -> bool {
    let until = Instant::now() + backoff;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match queue.recv_timeout(left) {
            Ok(write) if write.is_held() => held.push(write),
            Ok(write) => refuse(write, reason),
            Err(mpsc::RecvTimeoutError::Timeout) => return true,
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// The next write, or `None` once every sender is gone.
///
/// Under load (`busy`), writes arrive every few microseconds: the writer
/// lingers a moment, yielding its core, before it blocks, because waking a
/// sleeping thread costs each sender a system call and the writer a context
/// switch, more than the write itself. When writes come one at a time it
/// blocks at once, leaving the core to whoever is producing them.
fn next_write(queue: &mpsc::Receiver<Write>, busy: bool) -> Option<Write> {
    let since = Instant::now();
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

fn refuse(write: Write, reason: &str) {
    answer(
        write,
        Outcome::Failed(Error::RegistryUnavailable {
            reason: reason.to_owned(),
        }),
    );
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
        Write::Transition(.., reply) | Write::Progress(.., reply) => {
            let _ = reply.send(outcome.into_result(|o| match o {
                Outcome::Applied(module) => Some(module),
                _ => None,
            }));
        }
        Write::Log(.., Some(reply)) => {
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
        Write::Check => {}
        Write::Log(.., None) | Write::ReportedProgress | Write::TakenProgress(_) => {
            if let Outcome::Failed(e) = outcome {
                tracing::warn!(error = %e, "a run update nobody waited for was not recorded");
            }
        }
    }
}

/// Applies one write inside the batch's transaction. `Err` is a database
/// failure (it aborts the batch); a refusal by the status rules is
/// `Ok(Outcome::Failed)` and writes nothing.
fn apply(tx: &rusqlite::Transaction<'_>, write: &Write) -> rusqlite::Result<Outcome> {
    Ok(match write {
        Write::Insert(run, existing, _) => sql::insert(tx, run, *existing)?,
        Write::Replace(run, change, _) => sql::replace(tx, run, change.as_ref())?,
        Write::Transition(change, ..) => Outcome::Applied(sql::apply_transition(tx, change)?),
        Write::Progress(run_id, progress, _) => {
            Outcome::Applied(apply_progress(tx, run_id, progress)?)
        }
        Write::ReportedProgress => Outcome::Done,
        Write::TakenProgress(reports) => {
            for (run_id, progress) in reports {
                apply_progress(tx, run_id, progress)?;
            }
            Outcome::Done
        }
        Write::Log(run_id, log, _) => Outcome::Count(
            tx.prepare_cached("UPDATE runs SET log = ?2 WHERE run_id = ?1")?
                .execute(params![run_id, sql::log_text(log)?])?,
        ),
        Write::Cleanup(cutoff, _) => Outcome::Count(sql::delete_finished_before(tx, *cutoff)?),
        Write::Flush(_) | Write::Check => Outcome::Done,
    })
}

/// Records progress of an active run; returns its module id, `None` if the
/// run is unknown or finished.
fn apply_progress(
    tx: &rusqlite::Transaction<'_>,
    run_id: &str,
    progress: &Progress,
) -> rusqlite::Result<Option<String>> {
    match sql::current(tx, run_id)? {
        Some(stored) if stored.status.is_active() => {
            tx.prepare_cached(
                "UPDATE runs SET progress_fraction = ?2, progress_message = ?3 WHERE id = ?1",
            )?
            .execute(params![stored.id, progress.fraction, progress.message])?;
            Ok(Some(stored.module_id))
        }
        _ => Ok(None),
    }
}
