//! The writer thread of a database store: writes go through it, in order,
//! many to a transaction (group commit). The SQLite and the PostgreSQL
//! stores share it; each gives it a [`Backend`] that applies a batch in one
//! transaction. Where the backend allows it (SQLite), a write that comes
//! while the writer has nothing waiting or under way is committed on its
//! caller's thread instead, in the same order: it follows every write
//! handed over before it.
//!
//! When the database cannot be written for now (the disk is full, another
//! process holds a lock, the file was deleted, the server is unreachable),
//! a write either waits or is refused, as it asked ([`OnUnavailable`]). What waits — a run's own
//! status changes, its progress, its log — is held in order and retried with
//! backoff until it commits, so no run is left `running` because one commit
//! failed; what is refused — a start, a cancel — hears why at once, so a
//! caller is never told something happened that the file does not hold.

// The writer serves both database backends and the cluster claimer; a build
// with only some of them leaves some of its verbs unused.
#![cfg_attr(
    not(all(feature = "sqlite", feature = "postgres", feature = "wasm")),
    allow(dead_code)
)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::registry::{Cleanup, Existing, OnUnavailable, StoreHealth, Wanted};
use crate::run::{LogEntry, Progress, Run, StatusChange, Transition, check_time};
use crate::sync::LockUnpoisoned;

pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

/// What one write did, before it is committed.
pub(super) enum Outcome {
    Done,
    Applied(Option<String>),
    Count(usize),
    Claimed(Vec<Run>),
    Released(Vec<(String, String)>),
    Failed(Error),
}

/// Why a batch was not committed.
pub(super) enum NotCommitted {
    /// The database cannot be written for now, and why: the batch is held
    /// or refused, and tried again.
    Unavailable(String),
    /// The database refused the batch (a value it rejects): every write of
    /// it fails with this message.
    Rejected(String),
}

/// A database as the writer thread drives it.
pub(super) trait Backend: Send + 'static {
    /// Applies `batch` in one transaction and commits it, returning each
    /// write's outcome in order. A refusal by the status rules is
    /// `Outcome::Failed` and writes nothing; an empty batch checks that
    /// the database can be written again.
    fn commit(&mut self, batch: &[Write]) -> Result<Vec<Outcome>, NotCommitted>;

    /// Whether the database is still the one the store opened (`Err`: why
    /// not, as a reason to report).
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// One write, queued for the writer thread.
pub(super) enum Write {
    /// A new run, and the idempotency key it was started with, if any: a
    /// run with that key recorded already fails the write with
    /// [`Error::IdempotencyKeyReused`] naming it.
    Insert(Run, Existing, Option<Box<str>>, Reply<()>),
    /// A new run, `Queued` for whichever node claims it (on a store that
    /// is a queue several nodes share), how many attempts it may take, and
    /// its idempotency key (as for `Insert`).
    Enqueue(Run, u32, Option<Box<str>>, Reply<()>),
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
    /// Claims queued runs for this process (a store whose writer does it):
    /// of each wanted version at most its count, this many in all.
    Claim(Vec<Wanted>, usize, Reply<Vec<Run>>),
    /// Gives claimed runs back to the queue, with this reason.
    Release(Vec<String>, String, Reply<Vec<(String, String)>>),
    /// Removes the oldest runs (at most this many) a cleanup matches.
    Cleanup(Cleanup, usize, Reply<usize>),
    Flush(Reply<()>),
    /// Copies the log into the database file once its batch is committed
    /// (SQLite): asked by the store's watch on the log, so that a caller
    /// that committed its own write does not wait for the copy. Counted,
    /// so that callers hand their writes to the writer until it is done.
    Checkpoint,
    /// Nothing to write: wakes the writer to find out what the checkpoint
    /// thread noticed (the file deleted or replaced).
    Check,
    /// Asks the node executing a run on a shared database to cancel it;
    /// answers that node's name, `None` if the run is not active.
    RequestCancel(String, Reply<Option<String>>),
    /// Renews this node's lease on a shared database, and settles the runs
    /// of nodes whose lease ran out. Nobody waits for it: when the database
    /// cannot be written it is dropped, and the next one tries again.
    Heartbeat,
}

impl Write {
    /// The idempotency key of a new run's write.
    pub(super) fn key(&self) -> Option<&str> {
        match self {
            Write::Insert(_, _, key, _) | Write::Enqueue(_, _, key, _) => key.as_deref(),
            _ => None,
        }
    }

    /// Whether nobody waits for the write, so that it may wait a moment to
    /// share a commit ([`SOFT_WAIT`]).
    fn is_soft(&self) -> bool {
        matches!(self, Write::ReportedProgress | Write::Log(_, _, None))
    }

    /// Whether the write counts in [`Shared::outstanding`] until it is
    /// answered: all but the wake-ups other threads send, and the progress
    /// reports, which any commit takes ([`commit_batch`]), so that no
    /// write need wait behind them.
    fn is_counted(&self) -> bool {
        !matches!(
            self,
            Write::Check | Write::Heartbeat | Write::ReportedProgress | Write::TakenProgress(_)
        )
    }

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

/// The progress reports waiting for a commit, and whether the writer was
/// told of them: one wake-up on its way at a time, however many runs
/// report and however many commits take the reports meanwhile.
#[derive(Default)]
struct Reports {
    latest: HashMap<String, Progress>,
    told: bool,
}

/// What the store and its writer thread share.
pub(super) struct Shared {
    /// Where the database is, as messages name it (a path, or a server
    /// address without its password).
    pub(super) path: PathBuf,
    /// Why the database cannot be written now; `None` while it can.
    unavailable: Mutex<Option<String>>,
    /// Progress reports not yet taken by a commit: the latest of each run.
    /// Bounded by the number of active runs, however often they report.
    progress: Mutex<Reports>,
    /// Writes waiting for the database to be writable again.
    held: AtomicUsize,
    /// Writes handed to the writer (by [`Queue`]) and not answered yet,
    /// progress reports aside (any commit takes those): while there are
    /// none, a caller may commit its own write on its own thread
    /// ([`Queue::direct`]), for it then follows every other.
    outstanding: AtomicUsize,
}

impl Shared {
    /// State for the database at `path`.
    pub(super) fn new(path: PathBuf) -> Shared {
        Shared {
            path,
            unavailable: Mutex::new(None),
            progress: Mutex::new(Reports::default()),
            held: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
        }
    }

    /// Counts `writes` as answered (see [`Shared::outstanding`]).
    fn answered<'w>(&self, writes: impl IntoIterator<Item = &'w Write>) {
        let counted = writes
            .into_iter()
            .filter(|write| write.is_counted())
            .count();
        if counted > 0 {
            self.outstanding.fetch_sub(counted, Ordering::AcqRel);
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
    /// be told (no [`Write::ReportedProgress`] is on its way to it).
    pub(super) fn report_progress(&self, run_id: &str, progress: &Progress) -> bool {
        let mut reports = lock(&self.progress);
        match reports.latest.get_mut(run_id) {
            Some(latest) => latest.clone_from(progress),
            None => {
                reports.latest.insert(run_id.to_owned(), progress.clone());
            }
        }
        !std::mem::replace(&mut reports.told, true)
    }

    /// The reports waiting. `told`: taken for the [`Write::ReportedProgress`]
    /// the writer was told with, so that the next report tells it again.
    fn take_progress(&self, told: bool) -> Vec<(String, Progress)> {
        let mut reports = lock(&self.progress);
        if told {
            reports.told = false;
        }
        reports.latest.drain().collect()
    }

    pub(super) fn set_unavailable(&self, reason: Option<String>) {
        let mut unavailable = lock(&self.unavailable);
        match (&*unavailable, &reason) {
            (None, Some(reason)) => {
                tracing::error!(path = %self.path.display(), %reason, "run registry unavailable: holding run updates, refusing starts");
            }
            (Some(_), None) => {
                // The writer retries every write it holds in the batch
                // that commits first, and a caller may commit its own only
                // while the writer holds no write anyone waits for: none is
                // held any more. Said now, with the availability, so that
                // health never reads writable with writes still held.
                self.held.store(0, Ordering::Relaxed);
                tracing::info!(path = %self.path.display(), "run registry writable again: held updates committed");
            }
            _ => {}
        }
        *unavailable = reason;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single assignment or map operation.
    mutex.lock_unpoisoned()
}

/// The first wait before a held batch is tried again; it doubles up to [`LAST_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LAST_RETRY: Duration = Duration::from_secs(2);

/// How long a closing store keeps trying to commit what it holds.
const CLOSING_RETRIES_FOR: Duration = Duration::from_secs(5);

/// How long the writer keeps looking for more work before it sleeps.
const WRITER_LINGER: Duration = Duration::from_micros(200);

/// How long progress reports and logs nobody waits for are kept back for a
/// write that must not wait (a run's end, usually) to share their commit.
/// Progress is latest-wins, so a run that reports all the time costs at
/// most one commit per this span; the events its watchers see do not wait.
const SOFT_WAIT: Duration = Duration::from_millis(50);

/// The writer thread's database and what it shares with the store.
pub(super) struct Writer<B> {
    /// Locked for each commit: by the writer thread, or by a caller that
    /// commits its own write ([`Queue::direct`]).
    backend: Arc<Mutex<B>>,
    shared: Arc<Shared>,
    max_batch: usize,
}

impl<B: Backend> Writer<B> {
    pub(super) fn new(backend: Arc<Mutex<B>>, shared: Arc<Shared>, max_batch: usize) -> Writer<B> {
        Writer {
            backend,
            shared,
            max_batch: max_batch.max(1),
        }
    }

    /// Runs until every sender is gone and nothing is held (or the held
    /// writes could not be committed in [`CLOSING_RETRIES_FOR`]).
    pub(super) fn run(mut self, queue: &mpsc::Receiver<Write>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut held: Vec<Write> = Vec::new();
        // Cleanups, each committed alone once no other write waits: a
        // start or a status change never waits behind more than one.
        let mut cleanups: std::collections::VecDeque<Write> = std::collections::VecDeque::new();
        let mut backoff = FIRST_RETRY;
        let mut closed_at: Option<Instant> = None;
        loop {
            if let Some(reason) = self.shared.unavailable() {
                if closed_at.is_some() {
                    std::thread::sleep(backoff);
                } else if !wait_out(&self.shared, queue, backoff, &reason, &mut held) {
                    closed_at = Some(Instant::now());
                }
                batch.append(&mut held);
            } else if closed_at.is_none() {
                if cleanups.is_empty() {
                    match next_write(queue) {
                        Some(write) => batch.push(write),
                        None => closed_at = Some(Instant::now()),
                    }
                } else {
                    match queue.try_recv() {
                        Ok(write) => batch.push(write),
                        Err(mpsc::TryRecvError::Disconnected) => closed_at = Some(Instant::now()),
                        Err(mpsc::TryRecvError::Empty) => {}
                    }
                }
            }
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            if closed_at.is_none()
                && !batch.is_empty()
                && batch.iter().all(Write::is_soft)
                && !wait_for_hard(queue, &mut batch)
            {
                closed_at = Some(Instant::now());
            }
            let (later, now): (Vec<Write>, Vec<Write>) = batch
                .drain(..)
                .partition(|write| matches!(write, Write::Cleanup(..)));
            batch = now;
            cleanups.extend(later);
            if batch.is_empty()
                && let Some(cleanup) = cleanups.pop_front()
            {
                batch.push(cleanup);
            }
            if closed_at.is_some() && batch.is_empty() {
                return;
            }
            match self.commit(&mut batch) {
                Ok(()) => backoff = FIRST_RETRY,
                Err(reason) => {
                    for write in batch.drain(..) {
                        if write.is_held() {
                            held.push(write);
                        } else {
                            refuse(&self.shared, write, &reason);
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
    /// is committed; see [`commit_batch`].
    fn commit(&mut self, batch: &mut Vec<Write>) -> Result<(), String> {
        commit_batch(&mut *self.backend.lock_unpoisoned(), &self.shared, batch)
    }
}

/// Applies a batch in one transaction and answers every write once it is
/// committed. `Err` is why the database cannot be written: the batch is
/// left as it was, for the caller to hold or refuse. A write the status
/// rules refuse fails alone; a value the database rejects fails the batch.
fn commit_batch<B: Backend>(
    backend: &mut B,
    shared: &Shared,
    batch: &mut Vec<Write>,
) -> Result<(), String> {
    if let Err(reason) = backend.check() {
        shared.set_unavailable(Some(reason.clone()));
        return Err(reason);
    }
    take_progress(shared, batch);
    if !batch.is_empty()
        && batch
            .iter()
            .all(|write| matches!(write, Write::TakenProgress(reports) if reports.is_empty()))
    {
        // Wake-ups for reports an earlier commit took: nothing to write.
        batch.clear();
        return Ok(());
    }
    let outcomes = match backend.commit(batch) {
        Ok(outcomes) => {
            shared.set_unavailable(None);
            outcomes
        }
        Err(NotCommitted::Unavailable(reason)) => {
            shared.set_unavailable(Some(reason.clone()));
            return Err(reason);
        }
        Err(NotCommitted::Rejected(message)) => {
            tracing::error!(path = %shared.path.display(), error = %message, "run registry commit failed");
            let message = format!("a write failed, nothing of its batch was kept: {message}");
            (0..batch.len())
                .map(|_| {
                    Outcome::Failed(Error::Database {
                        path: shared.path.clone(),
                        message: message.clone(),
                    })
                })
                .collect()
        }
    };
    shared.answered(batch.iter());
    for (write, outcome) in batch.drain(..).zip(outcomes) {
        answer(write, outcome);
    }
    Ok(())
}

/// Puts the progress reports waiting into `batch`, whichever writes it
/// holds: a run's end in it then writes the run's latest progress too (one
/// commit for both), however the batch came, from the writer or from a
/// caller committing its own write. They go where the batch holds reports
/// already (a held batch tried again: the newer report of a run wins), or
/// else first, before the writes that may end their runs.
fn take_progress(shared: &Shared, batch: &mut Vec<Write>) {
    let told = batch
        .iter()
        .any(|write| matches!(write, Write::ReportedProgress));
    let reports = shared.take_progress(told);
    let mut taken = None;
    for (index, write) in batch.iter_mut().enumerate() {
        match write {
            // Taken with the others, into one place.
            Write::ReportedProgress => *write = Write::TakenProgress(Vec::new()),
            Write::TakenProgress(held) if taken.is_none() && !held.is_empty() => {
                taken = Some(index);
            }
            _ => {}
        }
    }
    if reports.is_empty() {
        return;
    }
    match taken {
        Some(index) => {
            let Write::TakenProgress(held) = &mut batch[index] else {
                unreachable!("found as taken progress above")
            };
            for (run_id, progress) in reports {
                match held.iter_mut().find(|(held_id, _)| *held_id == run_id) {
                    Some((_, older)) => *older = progress,
                    None => held.push((run_id, progress)),
                }
            }
        }
        None => batch.insert(0, Write::TakenProgress(reports)),
    }
}

/// Keeps a batch of writes nobody waits for back for up to [`SOFT_WAIT`],
/// until a write comes that must not wait, taking in what comes meanwhile.
/// Returns `false` once every sender is gone.
fn wait_for_hard(queue: &mpsc::Receiver<Write>, batch: &mut Vec<Write>) -> bool {
    let until = Instant::now() + SOFT_WAIT;
    while batch.iter().all(Write::is_soft) {
        let left = until.saturating_duration_since(Instant::now());
        match queue.recv_timeout(left) {
            Ok(write) => batch.push(write),
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
    true
}

/// Waits `backoff` before held writes are tried again, taking in new
/// writes meanwhile: those that wait join the held ones, the others are
/// refused at once. Returns `false` once every sender is gone.
fn wait_out(
    shared: &Shared,
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
            Ok(write) => refuse(shared, write, reason),
            Err(mpsc::RecvTimeoutError::Timeout) => return true,
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// The next write, or `None` once every sender is gone.
///
/// The writer lingers a moment after each commit, yielding its core,
/// before it blocks: waking a sleeping thread costs the sender a system
/// call and the writer a trip through the scheduler, more than a commit
/// itself (measured here: an awaited write took 212 us blocking at once,
/// 105 us lingering, against 71-90 us for the bare commit). Under load
/// the next write comes within microseconds; one run at a time, its next
/// write (its end, or the next start) comes within a run's length. Idle,
/// the writer spends at most the linger, yielding, then sleeps.
fn next_write(queue: &mpsc::Receiver<Write>) -> Option<Write> {
    let since = Instant::now();
    loop {
        match queue.try_recv() {
            Ok(write) => return Some(write),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if since.elapsed() < WRITER_LINGER => {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return queue.recv().ok(),
        }
    }
}

fn refuse(shared: &Shared, write: Write, reason: &str) {
    shared.answered([&write]);
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
        Write::Insert(.., reply)
        | Write::Enqueue(.., reply)
        | Write::Replace(.., reply)
        | Write::Flush(reply) => {
            let _ = reply.send(outcome.into_result(|o| matches!(o, Outcome::Done).then_some(())));
        }
        Write::Transition(.., reply)
        | Write::Progress(.., reply)
        | Write::RequestCancel(_, reply) => {
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
        Write::Cleanup(.., reply) => {
            let _ = reply.send(outcome.into_result(|o| match o {
                Outcome::Count(n) => Some(n),
                _ => None,
            }));
        }
        Write::Claim(.., reply) => {
            let _ = reply.send(outcome.into_result(|o| match o {
                Outcome::Claimed(runs) => Some(runs),
                _ => None,
            }));
        }
        Write::Release(.., reply) => {
            let _ = reply.send(outcome.into_result(|o| match o {
                Outcome::Released(runs) => Some(runs),
                _ => None,
            }));
        }
        Write::Check | Write::Heartbeat | Write::Checkpoint => {}
        Write::Log(.., None) | Write::ReportedProgress | Write::TakenProgress(_) => {
            if let Outcome::Failed(e) = outcome {
                tracing::warn!(error = %e, "a run update nobody waited for was not recorded");
            }
        }
    }
}

/// Hands `write` to the writer thread, counted in [`Shared::outstanding`]
/// if it counts.
fn hand_over(shared: &Shared, writes: &mpsc::Sender<Write>, write: Write) -> Result<()> {
    if write.is_counted() {
        shared.outstanding.fetch_add(1, Ordering::AcqRel);
    }
    writes.send(write).map_err(|_| Error::RegistryClosed)
}

/// Hands writes to a store's writer thread from outside the store's calls.
pub(super) struct Handoff {
    shared: Arc<Shared>,
    writes: mpsc::Sender<Write>,
}

impl Handoff {
    /// Hands `write` over, in order after every write handed over before.
    pub(super) fn send(&self, write: Write) -> Result<()> {
        hand_over(&self.shared, &self.writes, write)
    }
}

/// The store's side of the writer thread: hands it writes, in order, and
/// waits for their commit. Dropping it lets the writer commit what it has,
/// then waits for the thread to end.
pub(super) struct Queue {
    pub(super) shared: Arc<Shared>,
    writes: Option<mpsc::Sender<Write>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Commits one write on the caller's thread, while the writer has
    /// nothing to do (see [`Queue::start`]); gives the write back if the
    /// database cannot be written.
    direct: Option<CommitHere>,
}

/// Commits one write on the caller's thread; gives back the batch it made
/// (the write, and the progress reports it took) when the database cannot
/// be written.
type CommitHere = Box<dyn Fn(Write) -> Result<(), Vec<Write>> + Send + Sync>;

/// Whether a store's callers may commit their own write while its writer
/// has nothing to do: [`Direct::Allowed`] for a backend whose commit is
/// short and never needs a runtime of its own (SQLite), sparing a write
/// two trips between threads; the writer thread still commits every
/// write that comes while another is waiting or being written, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direct {
    Allowed,
    Never,
}

impl Queue {
    /// Starts the writer thread `name` over `backend`.
    pub(super) fn start<B: Backend>(
        backend: B,
        shared: Arc<Shared>,
        max_batch: usize,
        name: &str,
        direct: Direct,
    ) -> std::io::Result<Queue> {
        let (writes, queue) = mpsc::channel();
        let backend = Arc::new(Mutex::new(backend));
        let writer = Writer::new(backend.clone(), shared.clone(), max_batch);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer.run(&queue))?;
        let direct = (direct == Direct::Allowed).then(|| {
            let shared = shared.clone();
            Box::new(move |write: Write| {
                let mut batch = vec![write];
                match commit_batch(&mut *backend.lock_unpoisoned(), &shared, &mut batch) {
                    Ok(()) => Ok(()),
                    Err(_) => Err(batch),
                }
            }) as CommitHere
        });
        Ok(Queue {
            shared,
            writes: Some(writes),
            thread: Some(thread),
            direct,
        })
    }

    /// Another way in for writes (a thread that wakes the writer).
    pub(super) fn sender(&self) -> Option<mpsc::Sender<Write>> {
        self.writes.clone()
    }

    /// A way in for writes from outside the store's calls (a hook of the
    /// database), counted as the store's own are.
    pub(super) fn handoff(&self) -> Option<Handoff> {
        Some(Handoff {
            shared: self.shared.clone(),
            writes: self.writes.clone()?,
        })
    }

    /// Queues a write and waits for its commit.
    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let write = make(reply);
        if let Some(write) = self.commit_here(write) {
            self.enqueue(write)?;
        }
        answer.await.map_err(|_| Error::RegistryClosed)?
    }

    /// Commits `write` on this thread when the writer has nothing waiting
    /// or under way, so that it follows every write handed over before
    /// it; `Some(write)` for the writer to take otherwise. A write that
    /// finds the database unwritable goes to the writer, which holds or
    /// refuses it by its rules.
    fn commit_here(&self, write: Write) -> Option<Write> {
        let Some(direct) = &self.direct else {
            return Some(write);
        };
        let idle = self
            .shared
            .outstanding
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !idle {
            return Some(write);
        }
        if let Err(batch) = direct(write) {
            // Counted already (the reports are not): handed over as they are.
            if let Some(writes) = &self.writes {
                for write in batch {
                    let _ = writes.send(write);
                }
            }
        }
        None
    }

    /// Queues a write that someone waits on, unless the database is known
    /// to be unwritable: then it is refused at once, without queueing.
    async fn write_or_refuse<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> Result<T> {
        if let Some(reason) = self.shared.unavailable() {
            return Err(Error::RegistryUnavailable { reason });
        }
        self.write(make).await
    }

    /// Hands a write to the writer thread, in order with all the others.
    fn enqueue(&self, write: Write) -> Result<()> {
        let writes = self.writes.as_ref().ok_or(Error::RegistryClosed)?;
        hand_over(&self.shared, writes, write)
    }

    // The writes of `RunStore`, for the stores to forward.

    pub(super) async fn insert(
        &self,
        run: &Run,
        existing: Existing,
        key: Option<&str>,
    ) -> Result<()> {
        check_times(run)?;
        self.write_or_refuse(|reply| {
            Write::Insert(run.clone(), existing, key.map(Box::from), reply)
        })
        .await
    }

    pub(super) async fn enqueue_run(
        &self,
        run: &Run,
        max_attempts: u32,
        key: Option<&str>,
    ) -> Result<()> {
        check_times(run)?;
        self.write_or_refuse(|reply| {
            Write::Enqueue(run.clone(), max_attempts, key.map(Box::from), reply)
        })
        .await
    }

    pub(super) async fn claim(&self, wanted: &[Wanted], limit: usize) -> Result<Vec<Run>> {
        self.write_or_refuse(|reply| Write::Claim(wanted.to_vec(), limit, reply))
            .await
    }

    pub(super) async fn release(
        &self,
        run_ids: &[String],
        reason: &str,
    ) -> Result<Vec<(String, String)>> {
        self.write_or_refuse(|reply| Write::Release(run_ids.to_vec(), reason.to_owned(), reply))
            .await
    }

    pub(super) async fn replace(&self, run: &Run, change: Option<&StatusChange>) -> Result<()> {
        check_times(run)?;
        if let Some(change) = change {
            check_time(change.at)?;
        }
        self.write_or_refuse(|reply| Write::Replace(run.clone(), change.cloned(), reply))
            .await
    }

    pub(super) async fn transition(
        &self,
        change: &Transition,
        unavailable: OnUnavailable,
    ) -> Result<Option<String>> {
        check_time(change.at)?;
        let write = |reply| Write::Transition(change.clone(), unavailable, reply);
        match unavailable {
            OnUnavailable::Refuse => self.write_or_refuse(write).await,
            OnUnavailable::Hold => self.write(write).await,
        }
    }

    pub(super) async fn set_progress(
        &self,
        run_id: &str,
        progress: &Progress,
    ) -> Result<Option<String>> {
        self.write_or_refuse(|reply| Write::Progress(run_id.to_owned(), progress.clone(), reply))
            .await
    }

    pub(super) fn record_progress(&self, run_id: &str, progress: &Progress) -> Result<()> {
        // The latest report of each run waits in a map, whatever the rate
        // of reports: the queue holds one entry for all of them.
        if self.shared.report_progress(run_id, progress) {
            self.enqueue(Write::ReportedProgress)?;
        }
        Ok(())
    }

    pub(super) async fn set_log(&self, run_id: &str, log: &[LogEntry]) -> Result<bool> {
        self.write_or_refuse(|reply| Write::Log(run_id.to_owned(), log.to_vec(), Some(reply)))
            .await
    }

    pub(super) fn record_log(&self, run_id: &str, log: Vec<LogEntry>) -> Result<()> {
        self.enqueue(Write::Log(run_id.to_owned(), log, None))
    }

    pub(super) async fn request_cancel(&self, run_id: &str) -> Result<Option<String>> {
        self.write_or_refuse(|reply| Write::RequestCancel(run_id.to_owned(), reply))
            .await
    }

    pub(super) async fn remove_finished(&self, cleanup: &Cleanup, limit: usize) -> Result<usize> {
        self.write_or_refuse(|reply| Write::Cleanup(cleanup.clone(), limit, reply))
            .await
    }

    pub(super) async fn flush(&self) -> Result<()> {
        self.write_or_refuse(Write::Flush).await
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what it
        // holds; waiting for it means the database is complete when we return.
        drop(self.writes.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Checks what the stores refuse to write (times they store as nanoseconds)
/// before a write is queued, so that one caller's bad value fails that
/// caller alone, not the batch it would share.
fn check_times(run: &Run) -> Result<()> {
    [
        Some(run.created_at),
        run.started_at,
        run.completed_at,
        run.not_before,
    ]
    .into_iter()
    .flatten()
    .try_for_each(check_time)
}
