//! The run registry: the record of every run and of every status change it
//! went through, behind one small storage trait with interchangeable backends.
//!
//! [`RunRegistry`] is the handle everything else holds (cheap to clone). It
//! keeps the rules that do not depend on where runs are stored — which status
//! changes are allowed, what a history entry is, which events to publish —
//! while a [`RunStore`] does the storing: [`MemoryStore`] for tests and
//! embedding, [`SqliteStore`] for a registry that survives restarts and
//! crashes, [`PostgresStore`] for one on a database server.
//!
//! A store that cannot write for a while (a full disk, a lock held by
//! another process) says so in [`RunRegistry::health`]; starts and cancels
//! are then refused with [`Error::RegistryUnavailable`](crate::Error::RegistryUnavailable),
//! while the status changes of runs already going are held and committed
//! once it can write again ([`OnUnavailable::Hold`]).

mod feed;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod retention;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

pub use feed::{EventFeed, FeedPosition, Numbered, Resumed};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{
    DEFAULT_LEASE, PostgresOptions, PostgresStore, STATEMENT_WAIT, default_node_name,
};
pub use retention::{Cleanup, Override, ago};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteOptions, SqliteReader, SqliteStore, Synchronous};

use crate::error::Result;
use crate::run::{LogEntry, Progress, Run, RunStatus, StatusChange, Transition};
use crate::sync::LockUnpoisoned;

/// The message recorded on runs found unfinished when the registry opens.
pub const INTERRUPTED: &str =
    "interrupted: the modrun process running it stopped before the run finished";

/// How many cancel requests from other processes may wait to be handled;
/// past it they are dropped (a shared store re-reads them at its next
/// heartbeat).
const CANCEL_REQUESTS: usize = 1024;

/// Whether a registry location names a PostgreSQL database rather than a
/// SQLite file.
#[must_use]
pub fn is_database_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// Which runs a listing returns. Listings are always newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFilter {
    /// Only runs in one of these statuses (all statuses when empty).
    pub statuses: Vec<RunStatus>,
    /// Only runs of this module.
    pub module_id: Option<String>,
    /// At most this many runs.
    pub limit: Option<usize>,
    /// Only runs listed after this one (older, or as old with a smaller
    /// id): the next page of a listing.
    pub after: Option<RunCursor>,
}

/// A place in a listing (newest first): the next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCursor {
    /// When the last run listed was created.
    pub created_at: DateTime<Utc>,
    /// Its id.
    pub run_id: String,
}

impl RunCursor {
    /// Whether a run created at `created_at` with id `run_id` is listed
    /// after this place (listings are newest first, ties by id).
    #[must_use]
    pub fn is_followed_by(&self, created_at: DateTime<Utc>, run_id: &str) -> bool {
        (created_at, run_id) < (self.created_at, self.run_id.as_str())
    }
}

/// A run as listings show it: everything but its parameters, output and
/// log, so that a page of thousands of runs stays small whatever the runs
/// returned. The error message is cut at 1024 characters (" \[cut\]").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Its id.
    pub run_id: String,
    /// Its module.
    pub module_id: String,
    /// The module's human name.
    pub module_name: String,
    /// Where the run is in its life.
    pub status: RunStatus,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When its work started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal status.
    pub completed_at: Option<DateTime<Utc>>,
    /// Its exit code, once finished.
    pub exit_code: Option<i32>,
    /// Why it failed or was cancelled (cut).
    pub error_message: Option<String>,
    /// The last progress it reported.
    pub progress: Option<Progress>,
    /// The content hash of the module version that ran.
    pub module_version: Option<String>,
    /// Its [priority](Run::priority) (0 when not shown).
    #[serde(default, skip_serializing_if = "crate::run::is_zero")]
    pub priority: i16,
    /// The earliest time it may start, if it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
}

/// How many runs are in each status, and the runs that ended lately: what a
/// dashboard's overview is drawn from ([`RunRegistry::tally`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Runs per status, every status listed (0 where there are none).
    pub counts: Vec<(RunStatus, u64)>,
    /// Runs that ended since the time asked for, newest first, at most the
    /// number asked for.
    pub ended: Vec<Ended>,
}

/// A node sharing the store, as its heartbeat row tells (PostgreSQL).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    /// Its name (`serve --node`).
    pub node: String,
    /// When it joined.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// When its lease runs out unless renewed.
    pub lease_until: DateTime<Utc>,
    /// The runs it executes now.
    pub running: u64,
}

/// A run that ended, as a tally counts it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ended {
    /// Its module.
    pub module_id: String,
    /// How it ended.
    pub status: RunStatus,
    /// When its work started (never, for a run cancelled while queued).
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub completed_at: DateTime<Utc>,
}

impl Tally {
    /// A tally of these counts (by status) and ended runs, with every
    /// status listed in the order of the flow.
    pub(crate) fn new(
        counts: impl IntoIterator<Item = (RunStatus, u64)>,
        ended: Vec<Ended>,
    ) -> Tally {
        let mut all: Vec<(RunStatus, u64)> = RunStatus::ALL.iter().map(|&s| (s, 0)).collect();
        for (status, count) in counts {
            if let Some(slot) = all.iter_mut().find(|(s, _)| *s == status) {
                slot.1 += count;
            }
        }
        Tally { counts: all, ended }
    }
}

/// The most characters of an error message a summary shows (the database
/// stores cut it in SQL: [`SUMMARY_COLUMNS`]).
const SUMMARY_ERROR_CHARS: usize = 1024;

/// [`RUN_COLUMNS`] as a literal, for backends that read more after them.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
macro_rules! run_columns {
    () => {
        "run_id, module_id, module_name, status, created_at, started_at, completed_at, \
         parameters, exit_code, error_message, output, progress_fraction, progress_message, \
         module_version, log, priority, not_before"
    };
}
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) use run_columns;

/// The columns of a run summary, as the database stores read them: the
/// error message cut at [`SUMMARY_ERROR_CHARS`], then its whole length
/// (for [`mark_cut`]).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) const SUMMARY_COLUMNS: &str = "run_id, module_id, module_name, status, created_at, \
     started_at, completed_at, exit_code, substr(error_message, 1, 1024), \
     length(error_message), progress_fraction, progress_message, module_version, priority, \
     not_before";

/// An error message a summary column cut, marked " [cut]" if its whole
/// length (`chars`) is longer.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn mark_cut(mut message: String, chars: i64) -> String {
    if usize::try_from(chars).is_ok_and(|chars| chars > message.chars().count()) {
        message.push_str(" [cut]");
    }
    message
}

/// The condition of the finished runs' index by status, as both database
/// stores state it: comparisons, not a list, which SQLite would check with
/// a temporary table on every write of a run (a query states it the same
/// way for the planner to prove the index applies).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) const FINISHED: &str =
    "(status = 'completed' OR status = 'failed' OR status = 'cancelled')";

/// The SQL the database stores list runs with, newest first: `columns` of
/// the runs `filter` selects. Its parameters are numbered after `mark`
/// (`?` for SQLite, `$` for PostgreSQL), in this order: the module id if
/// the filter has one, then the cursor's creation time (nanoseconds) and
/// run id if it has one.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn listing_sql(columns: &str, filter: &RunFilter, mark: char) -> String {
    let mut sql = format!("SELECT {columns} FROM runs WHERE true");
    let mut parameters = 0;
    let mut next = || {
        parameters += 1;
        format!("{mark}{parameters}")
    };
    if !filter.statuses.is_empty() {
        // Status names are ours, not the caller's: safe to inline, and
        // inlined the planner can prove the active-runs index applies.
        let names: Vec<String> = filter.statuses.iter().map(|s| format!("'{s}'")).collect();
        sql.push_str(&format!(" AND status IN ({})", names.join(", ")));
        if filter.statuses.iter().all(|s| s.is_active()) {
            sql.push_str(" AND status IN ('queued', 'running')");
        } else if filter.statuses.iter().all(|s| s.is_terminal()) {
            // Likewise for the finished runs' index by status.
            sql.push_str(&format!(" AND {FINISHED}"));
        }
    }
    if filter.module_id.is_some() {
        sql.push_str(&format!(" AND module_id = {}", next()));
    }
    if filter.after.is_some() {
        sql.push_str(&format!(
            " AND (created_at, run_id) < ({}, {})",
            next(),
            next()
        ));
    }
    sql.push_str(" ORDER BY created_at DESC, run_id DESC");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(
            " LIMIT {}",
            i64::try_from(limit).unwrap_or(i64::MAX)
        ));
    }
    sql
}

impl From<&Run> for RunSummary {
    fn from(run: &Run) -> RunSummary {
        RunSummary {
            run_id: run.run_id.clone(),
            module_id: run.module_id.clone(),
            module_name: run.module_name.clone(),
            status: run.status,
            created_at: run.created_at,
            started_at: run.started_at,
            completed_at: run.completed_at,
            exit_code: run.exit_code,
            error_message: run.error_message.as_deref().map(|message| {
                match message.char_indices().nth(SUMMARY_ERROR_CHARS) {
                    Some((end, _)) => format!("{} [cut]", &message[..end]),
                    None => message.to_owned(),
                }
            }),
            progress: run.progress.clone(),
            module_version: run.module_version.clone(),
            priority: run.priority,
            not_before: run.not_before,
        }
    }
}

/// What a write does while the store cannot write (a full disk, a lock held
/// by another process, a deleted file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Fail at once with [`Error::RegistryUnavailable`](crate::Error::RegistryUnavailable):
    /// for a request someone is waiting to hear about (a start, a cancel).
    Refuse,
    /// Wait, held in order with the store's other writes, until it commits:
    /// for what a run's own task records (its start, its end), which must
    /// not be lost.
    Hold,
}

/// Whether a store can write, and what it holds meanwhile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// Why it cannot write now; `None` while it can.
    pub unavailable: Option<String>,
    /// Writes held until it can (status changes of runs that went on,
    /// progress reports, logs).
    pub held_writes: usize,
}

impl RunFilter {
    /// Whether `run` passes the status, module and cursor conditions (not
    /// the limit).
    #[must_use]
    pub fn matches(&self, run: &Run) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&run.status))
            && self.module_id.as_ref().is_none_or(|m| *m == run.module_id)
            && self
                .after
                .as_ref()
                .is_none_or(|cursor| cursor.is_followed_by(run.created_at, &run.run_id))
    }
}

/// What the registry tells its subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RunEvent {
    /// A run entered a status (including being added as `Queued`).
    Status {
        /// The run.
        run_id: String,
        /// Its module.
        module_id: String,
        /// The status entered, when and why.
        change: StatusChange,
    },
    /// A running run wrote to its log.
    Log {
        /// The run.
        run_id: String,
        /// Its module.
        module_id: String,
        /// What it wrote.
        entry: LogEntry,
    },
    /// A running run reported progress.
    Progress {
        /// The run.
        run_id: String,
        /// Its module.
        module_id: String,
        /// What it reported.
        progress: Progress,
    },
}

impl RunEvent {
    /// The run the event is about.
    #[must_use]
    pub fn run_id(&self) -> &str {
        match self {
            RunEvent::Status { run_id, .. }
            | RunEvent::Log { run_id, .. }
            | RunEvent::Progress { run_id, .. } => run_id,
        }
    }
}

/// The earliest of the times offered to it since it was last taken, and
/// a notice for each offer: when a claimer should look again for runs
/// queued for later.
#[derive(Debug, Default)]
pub struct NextDue {
    at: std::sync::Mutex<Option<DateTime<Utc>>>,
    told: tokio::sync::Notify,
}

impl NextDue {
    /// Keeps `at` if it is the earliest offered, and tells the waiter.
    pub fn offer(&self, at: DateTime<Utc>) {
        let mut earliest = self.at.lock_unpoisoned();
        if earliest.is_none_or(|earliest| at < earliest) {
            *earliest = Some(at);
        }
        drop(earliest);
        self.told.notify_one();
    }

    /// The earliest time offered since the last take, if any.
    pub fn take(&self) -> Option<DateTime<Utc>> {
        self.at.lock_unpoisoned().take()
    }

    /// Told at each offer (a permit is kept for an offer not waited for).
    pub fn notice(&self) -> &tokio::sync::Notify {
        &self.told
    }
}

/// How an insert treats a run id that is already recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace a finished run; refuse an active one.
    ReplaceFinished,
    /// Also take over a `Queued` one (keeping its history), as a task
    /// manager does for a run its caller added before starting it.
    AdoptQueued,
}

impl Existing {
    /// How [`RunStore::enqueue`] treats an id already recorded: a run
    /// claimed as it is recorded (`Running`) takes over a queued one.
    #[must_use]
    pub fn on_enqueue(run: &Run) -> Existing {
        if run.status == RunStatus::Running {
            Existing::AdoptQueued
        } else {
            Existing::ReplaceFinished
        }
    }
}

/// What an insert does with an id already recorded, as every backend
/// decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Replace the finished run (a fresh record and history).
    Replace,
    /// Take over the queued run, keeping its history.
    Adopt,
}

/// The status rule of an insert over `run_id`, recorded in status `stored`:
/// a finished run is replaced, a queued one adopted when `existing` allows,
/// an active one refused with [`Error::RunActive`](crate::Error::RunActive).
pub(crate) fn on_taken(run_id: &str, stored: RunStatus, existing: Existing) -> Result<Taken> {
    if stored.is_terminal() {
        Ok(Taken::Replace)
    } else if stored == RunStatus::Queued && existing == Existing::AdoptQueued {
        Ok(Taken::Adopt)
    } else {
        Err(crate::Error::RunActive {
            run_id: run_id.to_owned(),
            status: stored,
        })
    }
}

/// The status rule of a whole-record replace of `run_id`, recorded in
/// status `from`, with its status changing to `to` (if it changes): a
/// finished run never changes, and the change must be one the flow allows.
pub(crate) fn check_replace(run_id: &str, from: RunStatus, to: Option<RunStatus>) -> Result<()> {
    if from.is_terminal() {
        return Err(crate::Error::RunFinished {
            run_id: run_id.to_owned(),
            status: from,
        });
    }
    match to {
        Some(to) if !from.can_become(to) => Err(crate::Error::InvalidTransition {
            run_id: run_id.to_owned(),
            from,
            to,
        }),
        _ => Ok(()),
    }
}

/// Where runs are stored. Each backend passes the same contract tests
/// (`tests/all/registry_contract.rs`); [`RunRegistry`] is the API to use.
///
/// Every method returns once its change is as durable as the backend makes
/// it (for [`SqliteStore`]: committed).
#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    /// Records `run` with a one-entry history (its status at `created_at`).
    /// An id already recorded is treated as `existing` says. With an
    /// idempotency `key`, the run is recorded only if no run holds that key
    /// (else it fails with [`Error::IdempotencyKeyReused`](crate::Error::IdempotencyKeyReused)
    /// naming the run that does), and it holds the key from then on.
    async fn insert(&self, run: &Run, existing: Existing, key: Option<&str>) -> Result<()>;

    /// The run recorded with this idempotency key, if any.
    async fn run_by_key(&self, key: &str) -> Result<Option<Run>>;

    /// Replaces the record of `run`, appending `change` to its history when
    /// given. Fails if the run is unknown or finished, or if `change` is not
    /// allowed from the stored status.
    async fn replace(&self, run: &Run, change: Option<&StatusChange>) -> Result<()>;

    /// Applies `change` if the flow allows it from the stored status, and
    /// returns the run's module id; `None` when it did not apply (unknown
    /// run, or the flow forbids it — typically: the run already finished).
    /// While the store cannot write, `unavailable` says whether to refuse
    /// or hold it.
    async fn transition(
        &self,
        change: &Transition,
        unavailable: OnUnavailable,
    ) -> Result<Option<String>>;

    /// Records progress of an active run; returns its module id, or `None`
    /// if the run is unknown or finished.
    async fn set_progress(&self, run_id: &str, progress: &Progress) -> Result<Option<String>>;

    /// Records progress of an active run without waiting for it to be
    /// durable (progress is frequent, and the next status change commits
    /// it). Ignored for an unknown or finished run. However often a run
    /// reports, a store keeps at most its latest report waiting; while it
    /// cannot write, that report is held.
    fn record_progress(&self, run_id: &str, progress: &Progress) -> Result<()>;

    /// Replaces a run's log, whatever its status (a log is not a status
    /// change: a cancelled run's log is saved after it was cancelled).
    /// Returns `false` if the run is unknown.
    async fn set_log(&self, run_id: &str, log: &[LogEntry]) -> Result<bool>;

    /// Saves a run's log without waiting for it to be durable, in order
    /// with the run's other writes (held while the store cannot write):
    /// what a run's work does when it is stopped and cannot wait. On a
    /// store nodes share, only while this node holds the run.
    fn record_log(&self, run_id: &str, log: Vec<LogEntry>) -> Result<()>;

    /// One run.
    async fn get(&self, run_id: &str) -> Result<Option<Run>>;

    /// Runs matching `filter`, newest first.
    async fn list(&self, filter: &RunFilter) -> Result<Vec<Run>>;

    /// Summaries of the runs matching `filter`, newest first, without
    /// loading what summaries leave out.
    async fn list_summaries(&self, filter: &RunFilter) -> Result<Vec<RunSummary>>;

    /// The status changes of a run, oldest first (empty if unknown).
    async fn history(&self, run_id: &str) -> Result<Vec<StatusChange>>;

    /// Removes the oldest runs `cleanup` matches, at most `limit` of them,
    /// with their history and logs; returns how many. Active runs are
    /// never removed.
    async fn remove_finished(&self, cleanup: &Cleanup, limit: usize) -> Result<usize>;

    /// How many runs `cleanup` would remove.
    async fn count_finished(&self, cleanup: &Cleanup) -> Result<usize>;

    /// How many runs are in each status, and the runs that ended at or
    /// after `since`, newest first, at most `limit` of them.
    async fn tally(&self, since: DateTime<Utc>, limit: usize) -> Result<Tally>;

    /// The nodes sharing the store, by name (none for a store only one
    /// process uses).
    async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        Ok(Vec::new())
    }

    /// The bytes the store takes on disk, where it can tell (`None` by
    /// default).
    async fn disk_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Returns once every change made so far is durable.
    async fn flush(&self) -> Result<()>;

    /// Whether the store can write now, and what it holds meanwhile.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    /// For a store other processes share (nodes on one database): from now
    /// on, publish the status changes they record into `events`, and send
    /// into `cancels` the ids of runs this process executes whose cancel
    /// another process asked for. Nothing to do for a store one process
    /// holds (the default).
    fn connect_events(&self, events: EventFeed, cancels: mpsc::Sender<String>) {
        let _ = (events, cancels);
    }

    /// Tells the other processes sharing the store that a run this one
    /// executes wrote to its log (for their event streams; nothing is
    /// stored). Nothing to do for a store one process holds (the default).
    fn announce_log(&self, run_id: &str, module_id: &str, entry: &LogEntry) {
        let _ = (run_id, module_id, entry);
    }

    /// Asks the process that executes an active run to cancel it: records
    /// the intent and tells that process. Returns its node name, `None` if
    /// the run is not active or no other process can execute it (the
    /// default).
    async fn request_cancel(&self, run_id: &str) -> Result<Option<String>> {
        let _ = run_id;
        Ok(None)
    }

    // The queue's verbs: module runs are recorded queued for no process in
    // particular, and each process claims what it has room for. Every
    // bundled store keeps them (one contract suite); runners use them on a
    // store several processes share (nodes on one database).

    /// Whether this store is a queue several processes share, so that
    /// module runs should be [`enqueue`](Self::enqueue)d for any of them to
    /// [`claim`](Self::claim) (`false` by default).
    fn is_shared_queue(&self) -> bool {
        false
    }

    /// Records `run`, `Queued`, for whichever process claims it; or, when
    /// its status is `Running`, claimed by this process as it is recorded
    /// (its history: queued at `created_at`, running at `started_at`).
    /// A run whose process is lost is queued again while it has taken
    /// fewer than `max_attempts` attempts. By default, as an insert.
    ///
    /// An id already recorded is treated as [`insert`](Self::insert) treats
    /// it: a finished run is replaced. A `Queued` one is taken over
    /// ([`Existing::AdoptQueued`]) only by a run claimed as it is recorded:
    /// that is a task manager starting a run its caller added first.
    async fn enqueue(&self, run: &Run, max_attempts: u32, key: Option<&str>) -> Result<()> {
        let _ = max_attempts;
        self.insert(run, Existing::on_enqueue(run), key).await
    }

    /// Keeps the component bytes of a module version (`hash`, as runs
    /// record it) where every process sharing the store can fetch them,
    /// unless they are kept already. Nothing to do for a store one process
    /// holds (the default).
    async fn store_module(&self, module_id: &str, hash: &str, bytes: &[u8]) -> Result<()> {
        let _ = (module_id, hash, bytes);
        Ok(())
    }

    /// Whether the bytes of module version `hash` are kept
    /// ([`store_module`](Self::store_module)); `false` by default.
    async fn has_module(&self, hash: &str) -> Result<bool> {
        let _ = hash;
        Ok(false)
    }

    /// The module id and component bytes kept for version `hash`, if any
    /// (`None` by default). They come from another process: whoever runs
    /// them checks them against the hash first. Bytes longer than
    /// `max_bytes` are not read: [`Error::Corrupt`](crate::Error::Corrupt)
    /// says how long they are.
    async fn module_bytes(&self, hash: &str, max_bytes: u64) -> Result<Option<(String, Vec<u8>)>> {
        let _ = (hash, max_bytes);
        Ok(None)
    }

    /// Publishes version `hash` of module `module_id`, loaded from a file
    /// modified at `modified`, as the version every process sharing the
    /// store runs, unless the one published came from a file modified as
    /// late or later. Its bytes are [stored](Self::store_module) first.
    /// Nothing to do for a store one process holds (the default).
    async fn publish_head(
        &self,
        module_id: &str,
        hash: &str,
        modified: DateTime<Utc>,
    ) -> Result<()> {
        let _ = (module_id, hash, modified);
        Ok(())
    }

    /// The module versions published for every process to run
    /// ([`publish_head`](Self::publish_head)); none by default.
    async fn heads(&self) -> Result<Vec<ModuleHead>> {
        Ok(Vec::new())
    }

    /// Notified whenever another process queues a run (or gives one
    /// back), for this one's claimer to wake (`None` by default).
    fn queued_elsewhere(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// The earliest not-before time another process announced of the
    /// runs it queued for later, for this one's claimer to wake then
    /// (`None` by default).
    fn due_elsewhere(&self) -> Option<Arc<NextDue>> {
        None
    }

    /// The earliest not-before time later than `after` of the runs queued
    /// for any process to claim: when a claimer should look for runs
    /// again. (None by default, as a store that queues nothing.)
    async fn next_due(&self, after: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        let _ = after;
        Ok(None)
    }

    /// Claims queued runs for this process: of each [`Wanted`] module
    /// version at most its count, and `limit` in all, oldest first. They
    /// are recorded `Running`, for this process, before they come back:
    /// no other process can claim them. (Nothing to claim by default.)
    ///
    /// A claimed run comes back with what starting it needs; a store may
    /// leave out what an earlier attempt left (its output, log, error and
    /// progress), since the run starts afresh. A store that other
    /// processes write records a run whose parameters are over
    /// [`MAX_PARAMETERS_BYTES`](crate::run::MAX_PARAMETERS_BYTES) `Failed`,
    /// saying so, rather than read them.
    async fn claim(&self, wanted: &[Wanted], limit: usize) -> Result<Vec<Run>> {
        let _ = (wanted, limit);
        Ok(Vec::new())
    }

    /// Gives back runs this process claimed but did not start: `Queued`
    /// again, for any process, with `reason` in their history. Returns the
    /// runs given back, with their modules.
    async fn release(&self, run_ids: &[String], reason: &str) -> Result<Vec<(String, String)>> {
        let _ = (run_ids, reason);
        Ok(Vec::new())
    }

    /// The active runs the store holds for this process (executing, or
    /// queued in its own memory).
    async fn claimed(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// The module versions (`<module>@<content hash>`) that queued runs
    /// no process has claimed were started on.
    async fn queued_versions(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Tells the other processes which module versions this one can run
    /// (`<module>@<content hash>`), so that a queued run none of them can
    /// run is settled rather than left waiting.
    fn publish_versions(&self, versions: Vec<String>) {
        let _ = versions;
    }

    /// For a store other processes share, where each holds a lease: how
    /// much longer this process may execute the runs it holds before
    /// another may settle them (its lease's time left, less a margin).
    /// `None`: no lease (the default).
    fn lease_left(&self) -> Option<Duration> {
        None
    }
}

/// The version of a module that every process sharing a store runs: the
/// newest component file any of them loaded for it
/// ([`RunStore::publish_head`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleHead {
    /// The module.
    pub module_id: String,
    /// Its content hash (`sha256:…`).
    pub hash: String,
    /// When the file it came from was last modified.
    pub modified: DateTime<Utc>,
    /// The process (node) that published it.
    pub node: String,
}

/// Queued runs a process asks for when it claims: runs of `module_id`
/// started on `version` (its content hash), at most `count` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The module.
    pub module_id: String,
    /// The module version the runs were started on.
    pub version: String,
    /// The most runs wanted.
    pub count: usize,
}

/// The record of runs and of every status change, shared by everything that
/// starts, watches or serves runs.
///
/// Cheap to clone: clones share one store and one event stream.
///
/// # Examples
///
/// ```
/// use modrun::{Run, RunRegistry, RunStatus};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> modrun::Result<()> {
/// let registry = RunRegistry::in_memory();
/// let run = Run::new("hello", "Hello");
/// registry.add_run(&run).await?;
///
/// let stored = registry.get_run(&run.run_id).await?.expect("just added");
/// assert_eq!(stored.status, RunStatus::Queued);
/// assert_eq!(registry.active_runs().await?.len(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RunRegistry {
    store: Arc<dyn RunStore>,
    events: EventFeed,
    #[cfg_attr(not(feature = "wasm"), allow(dead_code))]
    cancel_requests: Arc<std::sync::Mutex<Option<mpsc::Receiver<String>>>>,
    retention: Arc<Removed>,
}

/// What cleanups removed, counted as they go.
#[derive(Default)]
struct Removed {
    removed: AtomicU64,
    /// When the last cleanup finished (Unix seconds; 0: none yet).
    last_cleanup: AtomicI64,
}

/// What cleanups removed since a registry was opened
/// ([`RunRegistry::retention_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetentionStats {
    /// Runs removed.
    pub removed: u64,
    /// When the last cleanup finished.
    pub last_cleanup: Option<DateTime<Utc>>,
}

/// How many runs one write of a cleanup removes at most: small enough
/// that a write that arrives while one commits waits about a millisecond
/// (the writer commits a cleanup alone, and only when no other write
/// waits).
pub const CLEANUP_BATCH: usize = 20;

impl std::fmt::Debug for RunRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRegistry")
            .field("subscribers", &self.events.receiver_count())
            .finish_non_exhaustive()
    }
}

/// Defines a registry write that only the task manager and the module
/// runner make: crate-private, but public to modrun's own tests and
/// benchmarks (the `test-util` feature), which play nodes and crashed
/// processes with them.
macro_rules! manager_write {
    // `$first` is `fn` or `async`: the visibility goes before it.
    ($(#[$meta:meta])* $first:ident $($rest:tt)*) => {
        #[cfg(feature = "test-util")]
        $(#[$meta])*
        #[doc(hidden)]
        pub $first $($rest)*
        #[cfg(not(feature = "test-util"))]
        $(#[$meta])*
        pub(crate) $first $($rest)*
    };
}

#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
impl RunRegistry {
    /// A registry over any store.
    #[must_use]
    pub fn new(store: impl RunStore) -> RunRegistry {
        let events = EventFeed::new();
        let (cancels, cancel_requests) = mpsc::channel(CANCEL_REQUESTS);
        store.connect_events(events.clone(), cancels);
        RunRegistry {
            store: Arc::new(store),
            events,
            cancel_requests: Arc::new(std::sync::Mutex::new(Some(cancel_requests))),
            retention: Arc::new(Removed::default()),
        }
    }

    manager_write! {
        /// The ids of runs this process executes whose cancel another process
        /// sharing the store asked for ([`request_cancel`](Self::request_cancel)):
        /// whoever runs them should cancel them. Given once; `None` after.
        fn take_cancel_requests(&self) -> Option<mpsc::Receiver<String>> {
            self.cancel_requests.lock_unpoisoned().take()
        }
    }

    manager_write! {
        /// Asks the process executing an active run (another node on a shared
        /// database) to cancel it. Returns that node's name, or `None` when
        /// the run is not active or no other process can execute it.
        ///
        /// Refused with [`Error::RegistryUnavailable`](crate::Error::RegistryUnavailable)
        /// while the store cannot write.
        async fn request_cancel(&self, run_id: &str) -> Result<Option<String>> {
            self.store.request_cancel(run_id).await
        }
    }

    /// A registry that lives in this process's memory only.
    #[must_use]
    pub fn in_memory() -> RunRegistry {
        RunRegistry::new(MemoryStore::default())
    }

    /// A registry in a SQLite file (created if missing), with default options.
    ///
    /// Runs that a previous process left `Running`, and plain tasks it left
    /// `Queued`, are marked `Failed` ("interrupted") before this returns;
    /// its queued module runs wait for
    /// [`ModuleRunner::resume_queued`](crate::ModuleRunner::resume_queued).
    /// See [`SqliteStore::open`].
    #[cfg(feature = "sqlite")]
    pub fn open_sqlite(path: impl AsRef<std::path::Path>) -> Result<RunRegistry> {
        Ok(RunRegistry::new(SqliteStore::open(
            path,
            SqliteOptions::default(),
        )?))
    }

    /// A registry in a PostgreSQL database (`postgres://user@host:port/db`),
    /// in the schema `modrun`, created or migrated as needed; see
    /// [`PostgresStore::connect`].
    #[cfg(feature = "postgres")]
    pub async fn open_postgres(url: &str) -> Result<RunRegistry> {
        Ok(RunRegistry::new(
            PostgresStore::connect(url, PostgresOptions::default()).await?,
        ))
    }

    /// The registry at `location`: a PostgreSQL URL (`postgres://…` or
    /// `postgresql://…`, see [`open_postgres`](Self::open_postgres)), or
    /// else the path of a SQLite file ([`open_sqlite`](Self::open_sqlite)).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub async fn open(location: &str) -> Result<RunRegistry> {
        if is_database_url(location) {
            #[cfg(feature = "postgres")]
            return RunRegistry::open_postgres(location).await;
            #[cfg(not(feature = "postgres"))]
            return Err(crate::Error::Database {
                path: location.into(),
                message: "this build of modrun has no PostgreSQL backend; enable its \"postgres\" feature".into(),
            });
        }
        #[cfg(feature = "sqlite")]
        return RunRegistry::open_sqlite(location);
        #[cfg(not(feature = "sqlite"))]
        Err(crate::Error::Database {
            path: location.into(),
            message: "this build of modrun has no SQLite backend; enable its \"sqlite\" feature"
                .into(),
        })
    }

    /// Records a new run. Its history starts with its status at `created_at`.
    ///
    /// A finished run with the same id is replaced (its old history goes with
    /// it); a queued or running one is refused with [`Error::RunActive`](crate::Error::RunActive).
    pub async fn add_run(&self, run: &Run) -> Result<()> {
        self.insert(run, Existing::ReplaceFinished).await
    }

    manager_write! {
        /// Records `run` as [`RunStore::insert`] does, and publishes the event.
        async fn insert(&self, run: &Run, existing: Existing) -> Result<()> {
            self.insert_keyed(run, existing, None).await
        }
    }

    /// [`insert`](Self::insert) of a run started with an idempotency key.
    pub(crate) async fn insert_keyed(
        &self,
        run: &Run,
        existing: Existing,
        key: Option<&str>,
    ) -> Result<()> {
        self.store.insert(run, existing, key).await?;
        self.publish(|| RunEvent::Status {
            run_id: run.run_id.clone(),
            module_id: run.module_id.clone(),
            change: StatusChange {
                status: run.status,
                at: run.created_at,
                message: None,
            },
        });
        Ok(())
    }

    /// Whether module runs go through a queue several processes share
    /// ([`RunStore::is_shared_queue`]).
    #[must_use]
    pub fn is_shared_queue(&self) -> bool {
        self.store.is_shared_queue()
    }

    /// Records `run`, `Queued`, for whichever process sharing the store
    /// claims it ([`RunStore::enqueue`]) — or, `Running`, claimed by this
    /// one as it starts — and publishes the events.
    pub(crate) async fn enqueue(
        &self,
        run: &Run,
        max_attempts: u32,
        key: Option<&str>,
    ) -> Result<()> {
        self.store.enqueue(run, max_attempts, key).await?;
        self.publish(|| RunEvent::Status {
            run_id: run.run_id.clone(),
            module_id: run.module_id.clone(),
            change: StatusChange {
                status: RunStatus::Queued,
                at: run.created_at,
                message: None,
            },
        });
        if let (RunStatus::Running, Some(at)) = (run.status, run.started_at) {
            self.publish(|| RunEvent::Status {
                run_id: run.run_id.clone(),
                module_id: run.module_id.clone(),
                change: StatusChange {
                    status: RunStatus::Running,
                    at,
                    message: None,
                },
            });
        }
        Ok(())
    }

    /// See [`RunStore::store_module`].
    pub(crate) async fn store_module(
        &self,
        module_id: &str,
        hash: &str,
        bytes: &[u8],
    ) -> Result<()> {
        self.store.store_module(module_id, hash, bytes).await
    }

    /// See [`RunStore::has_module`].
    pub(crate) async fn has_module(&self, hash: &str) -> Result<bool> {
        self.store.has_module(hash).await
    }

    /// See [`RunStore::publish_head`].
    pub(crate) async fn publish_head(
        &self,
        module_id: &str,
        hash: &str,
        modified: DateTime<Utc>,
    ) -> Result<()> {
        self.store.publish_head(module_id, hash, modified).await
    }

    /// See [`RunStore::heads`].
    pub(crate) async fn heads(&self) -> Result<Vec<ModuleHead>> {
        self.store.heads().await
    }

    /// See [`RunStore::module_bytes`].
    pub(crate) async fn module_bytes(
        &self,
        hash: &str,
        max_bytes: u64,
    ) -> Result<Option<(String, Vec<u8>)>> {
        self.store.module_bytes(hash, max_bytes).await
    }

    /// What tells this process that another queued a run it may claim
    /// ([`RunStore::queued_elsewhere`]).
    pub(crate) fn queued_elsewhere(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.store.queued_elsewhere()
    }

    /// See [`RunStore::due_elsewhere`].
    pub(crate) fn due_elsewhere(&self) -> Option<Arc<NextDue>> {
        self.store.due_elsewhere()
    }

    /// See [`RunStore::next_due`].
    pub(crate) async fn next_due(&self, after: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
        self.store.next_due(after).await
    }

    /// Claims queued runs for this process ([`RunStore::claim`]), and
    /// publishes their start.
    pub(crate) async fn claim(&self, wanted: &[Wanted], limit: usize) -> Result<Vec<Run>> {
        let runs = self.store.claim(wanted, limit).await?;
        for run in &runs {
            self.publish(|| RunEvent::Status {
                run_id: run.run_id.clone(),
                module_id: run.module_id.clone(),
                change: StatusChange {
                    status: RunStatus::Running,
                    at: run.started_at.unwrap_or_else(Utc::now),
                    message: None,
                },
            });
        }
        Ok(runs)
    }

    /// Gives claimed runs back to the queue ([`RunStore::release`]), and
    /// publishes it.
    pub(crate) async fn release(&self, run_ids: &[String], reason: &str) -> Result<usize> {
        let released = self.store.release(run_ids, reason).await?;
        let at = Utc::now();
        for (run_id, module_id) in &released {
            self.publish(|| RunEvent::Status {
                run_id: run_id.clone(),
                module_id: module_id.clone(),
                change: StatusChange {
                    status: RunStatus::Queued,
                    at,
                    message: Some(reason.to_owned()),
                },
            });
        }
        Ok(released.len())
    }

    /// The active runs the store holds for this process.
    pub(crate) async fn claimed(&self) -> Result<Vec<String>> {
        self.store.claimed().await
    }

    /// How much longer this process may execute the runs it holds
    /// ([`RunStore::lease_left`]).
    pub(crate) fn lease_left(&self) -> Option<Duration> {
        self.store.lease_left()
    }

    /// The module versions unclaimed queued runs were started on.
    pub(crate) async fn queued_versions(&self) -> Result<Vec<String>> {
        self.store.queued_versions().await
    }

    /// Tells the processes sharing the store which module versions this
    /// one can run ([`RunStore::publish_versions`]).
    pub(crate) fn publish_versions(&self, versions: Vec<String>) {
        self.store.publish_versions(versions);
    }

    /// Replaces a run's record with `run`. If its status differs from the
    /// stored one, the change must be allowed by the status flow and is
    /// added to the history (with `error_message` as its message).
    ///
    /// A finished run cannot be updated: [`Error::RunFinished`](crate::Error::RunFinished),
    /// but for one thing, the guide's way to reuse its id: a fresh `Queued`
    /// run replaces it, as [`add_run`](Self::add_run) would (a new record
    /// and a new history), ready for `start_task`.
    pub async fn update_run(&self, run: &Run) -> Result<()> {
        let stored = self
            .store
            .get(&run.run_id)
            .await?
            .ok_or_else(|| crate::Error::RunNotFound(run.run_id.clone()))?;
        if stored.status.is_terminal() && run.status == RunStatus::Queued {
            return self.insert(run, Existing::ReplaceFinished).await;
        }
        let change = (stored.status != run.status).then(|| StatusChange {
            status: run.status,
            at: Utc::now(),
            message: run.error_message.clone(),
        });
        self.store.replace(run, change.as_ref()).await?;
        if let Some(change) = change {
            self.publish(|| RunEvent::Status {
                run_id: run.run_id.clone(),
                module_id: run.module_id.clone(),
                change,
            });
        }
        Ok(())
    }

    manager_write! {
        /// Applies a status change if the flow allows it from the run's current
        /// status. Returns whether it applied: of two racing terminal changes,
        /// exactly one returns `true`.
        ///
        /// Refused with [`Error::RegistryUnavailable`](crate::Error::RegistryUnavailable)
        /// while the store cannot write.
        //
        // Not an `async fn`: a run's task awaits these, and a layer of future
        // state of their own would grow every in-flight task.
        fn transition<'a>(
            &'a self,
            change: &'a Transition,
        ) -> impl Future<Output = Result<bool>> + Send + 'a {
            self.apply_transition(change, OnUnavailable::Refuse)
        }
    }

    manager_write! {
        /// [`transition`](Self::transition) as a run's own task records its
        /// start and its end: while the store cannot write, the change is held
        /// and retried until it commits, and this waits for that. So a run that
        /// finished while the disk was full is recorded finished once there is
        /// room, and nobody reads it finished before.
        fn hold_transition<'a>(
            &'a self,
            change: &'a Transition,
        ) -> impl Future<Output = Result<bool>> + Send + 'a {
            self.apply_transition(change, OnUnavailable::Hold)
        }
    }

    async fn apply_transition(
        &self,
        change: &Transition,
        unavailable: OnUnavailable,
    ) -> Result<bool> {
        let Some(module_id) = self.store.transition(change, unavailable).await? else {
            return Ok(false);
        };
        self.publish(|| RunEvent::Status {
            run_id: change.run_id.clone(),
            module_id,
            change: change.status_change(),
        });
        Ok(true)
    }

    manager_write! {
        /// Records the progress an active run reported. Returns `false` if the
        /// run is unknown or already finished.
        // Runs report progress without waiting (`report_progress`); the
        // durable form is for the contract tests of every store.
        #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
        async fn set_progress(&self, run_id: &str, progress: Progress) -> Result<bool> {
            let Some(module_id) = self.store.set_progress(run_id, &progress).await? else {
                return Ok(false);
            };
            self.publish(|| RunEvent::Progress {
                run_id: run_id.to_owned(),
                module_id,
                progress,
            });
            Ok(true)
        }
    }

    manager_write! {
        /// Records the progress a running run of `module_id` reported and tells
        /// subscribers, without waiting for the record to be durable: what a
        /// module host does on every progress call.
        fn report_progress(&self, run_id: &str, module_id: &str, progress: Progress) -> Result<()> {
            self.store.record_progress(run_id, &progress)?;
            self.publish(|| RunEvent::Progress {
                run_id: run_id.to_owned(),
                module_id: module_id.to_owned(),
                progress,
            });
            Ok(())
        }
    }

    manager_write! {
        /// Saves a run's log without waiting (see [`RunStore::record_log`]):
        /// what a stopped run's work does as it is dropped. A later
        /// [`flush`](Self::flush) returns once it is durable.
        fn record_log(&self, run_id: &str, log: Vec<LogEntry>) -> Result<()> {
            self.store.record_log(run_id, log)
        }
    }

    manager_write! {
        /// Tells subscribers, as it happens, that a run wrote to its log. Nothing
        /// is stored: the log is saved with the run's end, or by
        /// [`record_log`](Self::record_log).
        fn publish_log(&self, run_id: &str, module_id: &str, entry: &LogEntry) {
            self.store.announce_log(run_id, module_id, entry);
            self.publish(|| RunEvent::Log {
                run_id: run_id.to_owned(),
                module_id: module_id.to_owned(),
                entry: entry.clone(),
            });
        }
    }

    /// The run started with this idempotency key, if any.
    pub async fn run_by_key(&self, key: &str) -> Result<Option<Run>> {
        self.store.run_by_key(key).await
    }

    /// One run, if recorded.
    pub async fn get_run(&self, run_id: &str) -> Result<Option<Run>> {
        self.store.get(run_id).await
    }

    /// Runs matching `filter`, newest first.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        self.store.list(filter).await
    }

    /// Summaries of the runs matching `filter`, newest first: what a
    /// listing shows, without parameters, output or log.
    pub async fn list_summaries(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        self.store.list_summaries(filter).await
    }

    /// Whether the registry can write now, and what it holds meanwhile.
    #[must_use]
    pub fn health(&self) -> StoreHealth {
        self.store.health()
    }

    /// Runs that are `Queued` or `Running`, newest first.
    pub async fn active_runs(&self) -> Result<Vec<Run>> {
        self.list_runs(&RunFilter {
            statuses: vec![RunStatus::Queued, RunStatus::Running],
            ..RunFilter::default()
        })
        .await
    }

    /// Runs of one module, newest first.
    pub async fn runs_by_module(&self, module_id: &str) -> Result<Vec<Run>> {
        self.list_runs(&RunFilter {
            module_id: Some(module_id.to_owned()),
            ..RunFilter::default()
        })
        .await
    }

    /// Runs in one status, newest first.
    pub async fn runs_by_status(&self, status: RunStatus) -> Result<Vec<Run>> {
        self.list_runs(&RunFilter {
            statuses: vec![status],
            ..RunFilter::default()
        })
        .await
    }

    /// The `limit` newest runs.
    pub async fn recent_runs(&self, limit: usize) -> Result<Vec<Run>> {
        self.list_runs(&RunFilter {
            limit: Some(limit),
            ..RunFilter::default()
        })
        .await
    }

    /// The nodes sharing the store, with their heartbeats and the runs
    /// each executes (none for a store only this process uses).
    pub async fn nodes(&self) -> Result<Vec<NodeStatus>> {
        self.store.nodes().await
    }

    /// How many runs are in each status, and the runs that ended at or
    /// after `since` (newest first, at most `limit`): what the dashboard's
    /// overview draws.
    pub async fn tally(&self, since: DateTime<Utc>, limit: usize) -> Result<Tally> {
        self.store.tally(since, limit).await
    }

    /// Every status change of a run, oldest first, with its time and reason.
    /// Empty for an unknown run.
    pub async fn history(&self, run_id: &str) -> Result<Vec<StatusChange>> {
        self.store.history(run_id).await
    }

    /// Deletes finished runs that completed more than `older_than` ago, with
    /// their history, and returns how many. Active runs are never deleted.
    pub async fn cleanup_old_runs(&self, older_than: Duration) -> Result<usize> {
        self.cleanup(&Cleanup::older_than(older_than)).await
    }

    /// Removes every run `cleanup` matches, with its history and log, in
    /// batches of [`CLEANUP_BATCH`]; returns how many. Active runs are
    /// never removed. Each batch is its own short write, and the cleanup
    /// rests twice as long as each took before the next, so that starts
    /// and status changes go on meanwhile at about their usual pace.
    pub async fn cleanup(&self, cleanup: &Cleanup) -> Result<usize> {
        let mut removed = 0;
        loop {
            let began = std::time::Instant::now();
            let batch = self.store.remove_finished(cleanup, CLEANUP_BATCH).await?;
            removed += batch;
            self.retention
                .removed
                .fetch_add(batch as u64, Ordering::Relaxed);
            if batch < CLEANUP_BATCH {
                break;
            }
            tokio::time::sleep(began.elapsed() * 2).await;
        }
        self.retention
            .last_cleanup
            .store(Utc::now().timestamp(), Ordering::Relaxed);
        Ok(removed)
    }

    /// How many runs `cleanup` would remove, removing none.
    pub async fn count_finished(&self, cleanup: &Cleanup) -> Result<usize> {
        self.store.count_finished(cleanup).await
    }

    /// The bytes the registry takes on disk, where its store can tell.
    pub async fn disk_bytes(&self) -> Result<Option<u64>> {
        self.store.disk_bytes().await
    }

    /// What cleanups removed since this registry was opened.
    #[must_use]
    pub fn retention_stats(&self) -> RetentionStats {
        let last = self.retention.last_cleanup.load(Ordering::Relaxed);
        RetentionStats {
            removed: self.retention.removed.load(Ordering::Relaxed),
            last_cleanup: (last != 0)
                .then(|| DateTime::from_timestamp(last, 0))
                .flatten(),
        }
    }

    /// Returns once every change made so far is durable.
    pub async fn flush(&self) -> Result<()> {
        self.store.flush().await
    }

    /// A stream of every status change and progress report from now on.
    ///
    /// A subscriber that falls more than a few thousand events behind is told
    /// how many it missed and goes on from the newest.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.events.subscribe()
    }

    /// The numbered feed of the same events, for listeners that resume
    /// where they left off (`Last-Event-ID`).
    #[must_use]
    pub fn feed(&self) -> &EventFeed {
        &self.events
    }

    fn publish(&self, event: impl FnOnce() -> RunEvent) {
        self.events.publish(event);
    }
}
