//! The background task manager: starts work as tracked tokio tasks, records
//! every status change in the registry, cancels, limits and shuts down.
//!
//! The registry is the one judge of how a run ends: the task and a canceller
//! both ask it for a terminal status, and its conditional
//! status change ([`RunStore::transition`](crate::RunStore::transition))
//! lets exactly one of them win.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::handle::RunHandle;
use crate::line::{InLine, Line, Permit};
use crate::registry::{Existing, RunRegistry};
use crate::run::{EXIT_FAILURE, EXIT_PANIC, LogEntry, Run, RunStatus, Transition, cut_to};
use crate::sync::LockUnpoisoned;

/// Bounds on the work a manager takes on. The default bounds nothing, as the
/// guide's manager did; a server should set both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskLimits {
    /// At most this many tasks run at once; the others wait, `Queued`, in
    /// the order they were started.
    pub max_concurrent: Option<usize>,
    /// At most this many tasks wait for a slot; past it, `start_task` is
    /// refused with [`Error::QueueFull`]. Only applies with `max_concurrent`.
    pub max_queued: Option<usize>,
}

/// Why a run was cancelled; recorded as its history message and error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelReason {
    /// Somebody asked for it.
    User,
    /// The manager was shutting down and the run did not finish within the grace period.
    Shutdown,
    /// Another reason, in words.
    Other(String),
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelReason::User => f.write_str("cancelled by user"),
            CancelReason::Shutdown => f.write_str("cancelled: shutdown"),
            CancelReason::Other(reason) => write!(f, "cancelled: {reason}"),
        }
    }
}

/// Why a task's work failed, as the run records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The run's error message.
    pub message: String,
    /// The run's exit code (see the `EXIT_*` constants in [`run`](crate::run)).
    pub exit_code: i32,
}

impl Failure {
    /// A failure with [`EXIT_FAILURE`].
    #[must_use]
    pub fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            exit_code: EXIT_FAILURE,
        }
    }
}

/// What a task's work returns, turned into a run's outcome: `Ok` output is
/// stored as JSON (`Completed`), a failure makes the run `Failed`.
pub trait TaskOutput: Sized {
    /// The output as JSON, or why the work failed.
    fn into_outcome(self) -> Result<Value, Failure>;

    /// The outcome and the log to save with it (none by default).
    fn into_report(self) -> (Result<Value, Failure>, Option<Vec<LogEntry>>) {
        (self.into_outcome(), None)
    }
}

impl TaskOutput for () {
    fn into_outcome(self) -> Result<Value, Failure> {
        Ok(Value::Null)
    }
}

impl<T: Serialize, E: fmt::Display> TaskOutput for Result<T, E> {
    fn into_outcome(self) -> Result<Value, Failure> {
        match self {
            // `{:#}` shows an error's whole chain where it has one (anyhow).
            Err(e) => Err(Failure::new(format!("{e:#}"))),
            Ok(output) => serde_json::to_value(output).map_err(|e| {
                Failure::new(format!("the task's output cannot be stored as JSON: {e}"))
            }),
        }
    }
}

/// How long [`BackgroundTaskManager::shutdown`] gives cancelled work to
/// stop, and the registry to commit, once the grace period is over.
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// What [`BackgroundTaskManager::shutdown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Runs cancelled because they outlived the grace period.
    pub cancelled: Vec<String>,
    /// Tasks still executing when shutdown returned: work that ignored
    /// cancellation by never yielding. Their runs are recorded `Cancelled`.
    pub still_running: usize,
    /// Module runs whose not-before time had not come: left `Queued` in
    /// the registry, for the next process on a registry file to resume
    /// ([`ModuleRunner::resume_queued`](crate::ModuleRunner::resume_queued))
    /// at their time, rather than cancelled.
    pub left_queued: Vec<String>,
}

/// Starts work as tracked background tasks: fire-and-forget, with every
/// status change recorded in a [`RunRegistry`].
///
/// Cheap to clone: clones share the same tasks.
///
/// # Examples
///
/// ```
/// use modrun::{BackgroundTaskManager, Run, RunRegistry, RunStatus};
///
/// # #[tokio::main]
/// # async fn main() -> modrun::Result<()> {
/// let registry = RunRegistry::in_memory();
/// let manager = BackgroundTaskManager::new(registry.clone());
///
/// let run = Run::new("greeter", "Greeter");
/// let run_id = manager
///     .start_task(run, async { Ok::<_, std::io::Error>("hello") })
///     .await?;
///
/// manager.wait_all().await;
/// let run = registry.get_run(&run_id).await?.expect("recorded");
/// assert_eq!(run.status, RunStatus::Completed);
/// assert_eq!(run.output, Some("hello".into()));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct BackgroundTaskManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for BackgroundTaskManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackgroundTaskManager")
            .field("active", &self.active_task_count())
            .field("limits", &self.inner.limits)
            .finish_non_exhaustive()
    }
}

struct Inner {
    registry: RunRegistry,
    limits: TaskLimits,
    /// The places among the tasks allowed to run at once, when
    /// `max_concurrent` is set: taken by priority, then first come.
    slots: Option<Arc<Line>>,
    state: Mutex<State>,
    live: Arc<Live>,
    /// Told whenever a task ends: room for another may be free.
    ended: Notify,
    next_task: AtomicU64,
    shutting_down: AtomicBool,
}

/// Spawned tasks whose future has not ended yet (cancelled ones included
/// until they stop), and a wake-up for `wait_all` when none is left. Kept
/// apart from [`Inner`]: a task lets go of the manager, and with it of the
/// registry, before it counts itself out, so that once `wait_all` (or
/// `shutdown`) returns no task holds the registry any longer (a SQLite
/// file can be opened again at once).
#[derive(Default)]
struct Live {
    tasks: AtomicUsize,
    idle: Notify,
}

#[derive(Default)]
struct State {
    /// Runs this manager owns that are not finished: queued or running.
    /// Keyed by the run id the task holds too (one allocation for both).
    active: HashMap<Arc<str>, Tracked>,
    /// Tasks that did not get a slot when they were admitted and have not
    /// got one yet, whatever they wait on (their gate's first permits, or
    /// a slot): what `max_queued` bounds.
    queued: usize,
    /// The active runs someone waits to see gone (a run handle in this
    /// process), each told when its task lets go of it: a task's end wakes
    /// only who waits for that run.
    watched: HashMap<Arc<str>, Arc<Notify>>,
}

struct Tracked {
    /// Tells the task to stop.
    token: CancellationToken,
    /// Tells this task from a later one that reuses its run id.
    task: u64,
    started: bool,
    /// Counted in `State::queued`.
    queued: bool,
    /// A module run waiting for its not-before time, which a shutdown
    /// leaves `Queued` for the next process rather than cancels.
    parkable: bool,
}

#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
impl BackgroundTaskManager {
    /// A manager recording into `registry`, with no limits.
    #[must_use]
    pub fn new(registry: RunRegistry) -> BackgroundTaskManager {
        BackgroundTaskManager::with_limits(registry, TaskLimits::default())
    }

    /// A manager recording into `registry`, bounded by `limits`.
    #[must_use]
    pub fn with_limits(registry: RunRegistry, limits: TaskLimits) -> BackgroundTaskManager {
        BackgroundTaskManager {
            inner: Arc::new(Inner {
                registry,
                limits,
                slots: limits.max_concurrent.map(|max| Arc::new(Line::new(max))),
                state: Mutex::new(State::default()),
                live: Arc::default(),
                ended: Notify::new(),
                next_task: AtomicU64::new(0),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// The registry this manager records into.
    #[must_use]
    pub fn registry(&self) -> &RunRegistry {
        &self.inner.registry
    }

    /// Starts `work` in the background as run `run`, and returns the run id
    /// as soon as the run is recorded — never waiting for the work.
    ///
    /// The run is recorded `Queued` (added if the registry does not have it;
    /// a finished run with the same id is replaced), becomes `Running` when
    /// its work really starts, and ends `Completed` with the work's output,
    /// `Failed` with its error (or panic) message, or `Cancelled`.
    ///
    /// Refused, with nothing started, when a run with this id is already
    /// queued or running ([`Error::RunActive`]), when the queue is full
    /// ([`Error::QueueFull`]) or the manager is shutting down
    /// ([`Error::ShuttingDown`]).
    pub async fn start_task<F>(&self, run: Run, work: F) -> Result<RunHandle>
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let run_id = self
            .start_gated_task(run.requeued(), None, None, work)
            .await?;
        Ok(RunHandle::for_task(run_id, self))
    }

    /// [`start_task`](Self::start_task) of a run taken as it is (a fresh
    /// run, or one resumed with its record), with the run also waiting,
    /// `Queued`, for the permits of `gate` (first come first served) before
    /// it starts: how a module's own limit on concurrent runs, and the
    /// engine's pool of instances, are kept.
    ///
    /// With an idempotency `key`, the run is recorded only if no run holds
    /// the key: otherwise nothing starts and the start fails with
    /// [`Error::IdempotencyKeyReused`] naming that run.
    pub(crate) async fn start_gated_task<F>(
        &self,
        run: Run,
        key: Option<Box<str>>,
        gate: Option<Arc<Gate>>,
        work: F,
    ) -> Result<String>
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let (task, slot) = self.admit(&run, gate.as_deref())?;
        let slot = ready_now(slot, gate.as_deref());
        let span = tracing::info_span!("run", run_id = %run.run_id, module_id = %run.module_id);
        let run_id = run.run_id.clone();
        // The task records the run itself, so that once a start has begun it
        // completes even if our caller stops waiting: no run is left `Queued`
        // with nothing to start it.
        let (on_recorded, recorded) = oneshot::channel();
        // Boxed: the task's future then holds a pointer, not the whole record,
        // for as long as the work runs.
        let execute = execute(
            task,
            slot,
            gate,
            Some(Box::new(NewRun { run, key })),
            Some(on_recorded),
            work,
        );
        tokio::spawn(execute.instrument(span));
        recorded.await.map_err(|_| Error::RegistryClosed)??;
        Ok(run_id)
    }

    /// Reserves the id and a slot (or a place in the queue) for a new run.
    /// Nothing awaits between this and spawning the task that owns the
    /// reservation, which releases it when it ends.
    ///
    /// A run takes a slot at once only if the first permits of its gate (a
    /// module's own limit) are free too; otherwise it queues, and takes a
    /// slot only once it holds them. So runs that wait for their module
    /// never hold slots that other modules' runs could use. Queued runs
    /// take their turns by [priority](Run::priority), then first come.
    ///
    /// A run not due yet ([`Run::not_before`]) queues, and joins the lines
    /// only once it is due.
    fn admit(&self, run: &Run, gate: Option<&Gate>) -> Result<(TaskEnd, Pending)> {
        let (run_id, priority) = (run.run_id.as_str(), run.priority);
        let mut state = self.inner.lock();
        if let Some(tracked) = state.active.get(run_id) {
            return Err(active(run_id, tracked));
        }
        if let Some(until) = run.not_before.filter(|&at| at > Utc::now()) {
            let queued = self.inner.slots.is_some();
            if queued {
                self.inner.count_queued(&mut state)?;
            }
            let slot = Pending::Delayed { until, priority };
            let end = self.inner.track(&mut state, run_id, false, queued);
            if let Some(tracked) = state.active.get_mut(run_id) {
                // A module run, pinned to its version, can be resumed.
                tracked.parkable = gate.is_some() && run.module_version.is_some();
            }
            return Ok((end, slot));
        }
        let ready = |slots: &Arc<Line>| {
            let slot = slots.try_acquire()?;
            let first = match gate {
                None => None,
                // Without it, the slot goes back as it came.
                Some(gate) => gate.try_first()?,
            };
            Some(Pending::Ready(slot, first))
        };
        let slot = match &self.inner.slots {
            None => Pending::Unlimited(gate.and_then(|gate| gate.in_line(priority))),
            Some(slots) => match ready(slots) {
                Some(ready) => ready,
                None => {
                    self.inner.count_queued(&mut state)?;
                    if let Some(in_line) = gate.and_then(|gate| gate.in_line(priority)) {
                        // Its module's permit first: it takes its turn for
                        // a slot once it holds one.
                        Pending::Queued(in_line, priority)
                    } else {
                        // In turn now, so that slots go in the order the
                        // starts were admitted, however the tasks are run.
                        Pending::Waiting(slots.join(priority))
                    }
                }
            },
        };
        let queued = matches!(slot, Pending::Queued(..) | Pending::Waiting(_));
        Ok((self.inner.track(&mut state, run_id, false, queued), slot))
    }

    /// Cancels an active run: `true` if it was queued or running and is now
    /// recorded `Cancelled`; `false` if this manager does not know it or it
    /// finished first (its status then stays as it was).
    ///
    /// The work is stopped at its next `.await`.
    pub async fn cancel_task(&self, run_id: &str) -> Result<bool> {
        self.cancel_task_because(run_id, CancelReason::User).await
    }

    /// [`cancel_task`](Self::cancel_task), recording `reason`.
    pub async fn cancel_task_because(&self, run_id: &str, reason: CancelReason) -> Result<bool> {
        let Some((token, task)) = self
            .inner
            .lock()
            .active
            .get(run_id)
            .map(|tracked| (tracked.token.clone(), tracked.task))
        else {
            return Ok(false);
        };
        let recorded = self
            .inner
            .registry
            .transition(&Transition::cancelled(run_id, reason.to_string()))
            .await?;
        if recorded {
            token.cancel();
            self.inner.forget(run_id, task);
            tracing::info!(run_id, %reason, "run cancelled");
        }
        Ok(recorded)
    }

    /// Up to `wanted` places for runs to start now: as many slots as are
    /// free (all `wanted` without `max_concurrent`); none while shutting
    /// down, or while tasks of this manager wait for a slot. What a claimer
    /// takes before it claims runs from a shared queue.
    pub(crate) fn reserve(&self, wanted: usize) -> Vec<Room> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Vec::new();
        }
        let Some(slots) = &self.inner.slots else {
            return (0..wanted).map(|_| Room { slot: None }).collect();
        };
        // None is free while any task waits for one: they go to waiters first.
        (0..wanted)
            .map_while(|_| slots.try_acquire())
            .map(|slot| Room { slot: Some(slot) })
            .collect()
    }

    /// Starts the work of a run claimed from a shared queue: already
    /// recorded `Running` for this process, so it starts at once, in the
    /// room and with the permits its claimer took. It is tracked, cancelled
    /// and shut down as any task is.
    pub(crate) fn start_claimed<F>(
        &self,
        run: &Run,
        room: Room,
        permits: Permits,
        work: F,
    ) -> Result<()>
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let mut state = self.inner.lock();
        if let Some(tracked) = state.active.get(run.run_id.as_str()) {
            return Err(active(&run.run_id, tracked));
        }
        let end = self.inner.track(&mut state, &run.run_id, true, false);
        drop(state);
        let (first, then) = permits;
        let held = Box::new(Held {
            _slot: room.slot,
            _first: first,
            _then: then,
            attempt: run.attempt,
        });
        let span = tracing::info_span!("run", run_id = %run.run_id, module_id = %run.module_id);
        let execute = execute(end, Pending::Claimed(held), None, None, None, work);
        tokio::spawn(execute.instrument(span));
        Ok(())
    }

    /// The runs whose work has started, here.
    #[must_use]
    pub fn started_task_ids(&self) -> Vec<String> {
        self.inner
            .lock()
            .active
            .iter()
            .filter(|(_, tracked)| tracked.started)
            .map(|(run_id, _)| run_id.to_string())
            .collect()
    }

    /// Stops a run's work without recording anything: for a run this node
    /// has lost (another node settled or re-queued it).
    pub(crate) fn stop_lost(&self, run_id: &str) {
        tracing::warn!(
            run_id,
            "this node lost the run (another node settled or re-queued it); stopping its work"
        );
        self.inner.stop(run_id);
    }

    /// Stops every started run's work, recording each `Failed` with
    /// `message`, held until the registry can write it (a run another node
    /// has settled meanwhile keeps that end): for a node about to lose its
    /// lease, which must not execute runs it no longer holds.
    pub(crate) fn abandon_started(&self, message: &str) -> usize {
        let run_ids = self.started_task_ids();
        for run_id in &run_ids {
            self.inner.stop(run_id);
            let registry = self.inner.registry.clone();
            let mut change = Transition::failed(run_id, EXIT_FAILURE, message);
            // Only while this node still holds the run.
            change.attempt = Some(0);
            tokio::spawn(async move {
                if let Err(e) = registry.hold_transition(&change).await {
                    tracing::error!(run_id = %change.run_id, error = %e, "cannot record an abandoned run");
                }
            });
        }
        run_ids.len()
    }

    /// Resolves once a task has ended since the last call (or now, if one
    /// has): room for another may be free.
    pub(crate) async fn task_ended(&self) {
        self.inner.ended.notified().await;
    }

    /// Waits until this manager holds no task for `run_id` (at once if it
    /// holds none): a task's end is recorded, or given up, before it lets
    /// go of its run.
    pub(crate) async fn task_gone(&self, run_id: &str) {
        loop {
            let gone = {
                let mut state = self.inner.lock();
                let Some((key, _)) = state.active.get_key_value(run_id) else {
                    return;
                };
                let key = key.clone();
                state.watched.entry(key).or_default().clone()
            };
            let notified = gone.notified();
            tokio::pin!(notified);
            // Listening before looking again: an end between the two is heard.
            notified.as_mut().enable();
            // The same task still holds the run only if its wake-up is
            // still there (a task that ended took it along).
            let waiting = self
                .inner
                .lock()
                .watched
                .get(run_id)
                .is_some_and(|watched| Arc::ptr_eq(watched, &gone));
            if waiting {
                notified.await;
            }
        }
    }

    /// Whether [`shutdown`](Self::shutdown) has begun.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Acquire)
    }

    /// Waits until every task started so far has ended (cancelled ones
    /// included, once their work has stopped). Never fails: outcomes are in
    /// the registry.
    pub async fn wait_all(&self) {
        loop {
            let idle = self.inner.live.idle.notified();
            if self.inner.live.tasks.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Stops taking new runs, waits up to `grace` for the active ones, then
    /// cancels the rest (reason: shutdown), gives their work up to
    /// [`STOP_WAIT`] to stop, and flushes the registry. Module runs whose
    /// not-before time has not come are neither waited for nor cancelled:
    /// they are left `Queued` ([`ShutdownReport::left_queued`]).
    ///
    /// However the work and the registry behave, this returns within
    /// `grace` plus a few seconds: work that ignores cancellation is left
    /// behind (counted in [`ShutdownReport::still_running`], its run
    /// recorded `Cancelled`), and a registry that cannot write is reported,
    /// not waited for.
    pub async fn shutdown(&self, grace: Duration) -> Result<ShutdownReport> {
        self.inner.shutting_down.store(true, Ordering::Release);
        let mut report = ShutdownReport {
            left_queued: self.inner.park_waiting(),
            ..ShutdownReport::default()
        };
        if !report.left_queued.is_empty() {
            tracing::info!(
                runs = report.left_queued.len(),
                "left the runs not due yet queued, for the next start to resume"
            );
        }
        if tokio::time::timeout(grace, self.wait_all()).await.is_err() {
            let cancels = async {
                for run_id in self.active_task_ids() {
                    match self
                        .cancel_task_because(&run_id, CancelReason::Shutdown)
                        .await
                    {
                        Ok(true) => report.cancelled.push(run_id),
                        Ok(false) => {}
                        Err(e) => {
                            // Stopped all the same: the registry marks it
                            // interrupted when it next opens.
                            tracing::error!(run_id, error = %e, "cannot record a run cancelled at shutdown; stopping it");
                            self.inner.stop(&run_id);
                        }
                    }
                }
                self.wait_all().await;
            };
            if tokio::time::timeout(STOP_WAIT, cancels).await.is_err() {
                report.still_running = self.inner.live.tasks.load(Ordering::Acquire);
            }
        }
        match tokio::time::timeout(STOP_WAIT, self.inner.registry.flush()).await {
            Ok(flushed) => flushed?,
            Err(_) => {
                return Err(Error::RegistryUnavailable {
                    reason: format!(
                        "the registry did not commit what it holds within {STOP_WAIT:?} of shutdown"
                    ),
                });
            }
        }
        Ok(report)
    }

    /// How many runs are queued or running.
    #[must_use]
    pub fn active_task_count(&self) -> usize {
        self.inner.lock().active.len()
    }

    /// The ids of the runs that are queued or running.
    #[must_use]
    pub fn active_task_ids(&self) -> Vec<String> {
        self.inner
            .lock()
            .active
            .keys()
            .map(|run_id| run_id.to_string())
            .collect()
    }

    /// Whether the run is queued or running in this manager.
    #[must_use]
    pub fn is_task_active(&self, run_id: &str) -> bool {
        self.inner.lock().active.contains_key(run_id)
    }

    /// How many runs wait to start (for a slot, or for their module's own
    /// limit).
    #[must_use]
    pub fn queued_task_count(&self) -> usize {
        self.inner.lock().queued
    }
}

/// The refusal of a start whose run id an active task holds.
fn active(run_id: &str, tracked: &Tracked) -> Error {
    Error::RunActive {
        run_id: run_id.to_owned(),
        status: if tracked.started {
            RunStatus::Running
        } else {
            RunStatus::Queued
        },
    }
}

impl Inner {
    /// Registers a new task for `run_id` (checked free) and returns its
    /// hold, which forgets it when the task ends.
    fn track(
        self: &Arc<Self>,
        state: &mut State,
        run_id: &str,
        started: bool,
        queued: bool,
    ) -> TaskEnd {
        let token = CancellationToken::new();
        let task = self.next_task.fetch_add(1, Ordering::Relaxed);
        let key: Arc<str> = Arc::from(run_id);
        state.active.insert(
            key.clone(),
            Tracked {
                token: token.clone(),
                task,
                started,
                queued,
                parkable: false,
            },
        );
        TaskEnd {
            inner: self.clone(),
            run_id: key,
            token,
            task,
            _counted: Counted::new(&self.live),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few map and queue operations that do
        // not panic halfway, so a poisoned lock still guards consistent state.
        self.state.lock_unpoisoned()
    }

    /// Counts one more queued task, unless the queue is full.
    fn count_queued(&self, state: &mut State) -> Result<()> {
        let limit = self.limits.max_queued.unwrap_or(usize::MAX);
        if state.queued >= limit {
            return Err(Error::QueueFull {
                queued: state.queued,
                limit,
            });
        }
        state.queued += 1;
        Ok(())
    }

    /// Drops a run from the active set, and from the queued count if it
    /// is counted there; only if it is still the same task, not a later run
    /// reusing the id. (A place it holds in a line is left when its task
    /// drops it.)
    fn forget(&self, run_id: &str, task: u64) {
        let mut state = self.lock();
        if state
            .active
            .get(run_id)
            .is_none_or(|tracked| tracked.task != task)
        {
            return;
        }
        if state
            .active
            .remove(run_id)
            .is_some_and(|tracked| tracked.queued)
        {
            state.queued -= 1;
        }
        if let Some(gone) = state.watched.remove(run_id) {
            gone.notify_waiters();
        }
    }

    /// Tells a run's work to stop, without recording anything.
    fn stop(&self, run_id: &str) {
        if let Some(tracked) = self.lock().active.get(run_id) {
            tracked.token.cancel();
        }
    }

    /// Marks a run's task as started; `false` if it was told to stop
    /// first (a shutdown that left its run queued), so that a run is
    /// either started or left, never both.
    fn mark_started(&self, run_id: &str) -> bool {
        match self.lock().active.get_mut(run_id) {
            Some(tracked) if tracked.token.is_cancelled() => false,
            Some(tracked) => {
                tracked.started = true;
                true
            }
            None => true,
        }
    }

    /// Stops the tasks of the module runs still waiting for their
    /// not-before time, recording nothing: their runs stay `Queued`.
    fn park_waiting(&self) -> Vec<String> {
        let state = self.lock();
        let mut parked = Vec::new();
        for (run_id, tracked) in &state.active {
            if tracked.parkable && !tracked.started {
                tracked.token.cancel();
                parked.push(run_id.to_string());
            }
        }
        parked
    }

    /// A queued run holds its slot: it no longer counts as queued.
    fn dequeue(&self, run_id: &str, task: u64) {
        let mut state = self.lock();
        if let Some(tracked) = state.active.get_mut(run_id)
            && tracked.task == task
            && tracked.queued
        {
            tracked.queued = false;
            state.queued -= 1;
        }
    }
}

/// What a run holds besides its room: its module's permit (for a module
/// with its own limit) and an instance of the engine's pool.
pub(crate) type Permits = (Option<Permit>, Option<OwnedSemaphorePermit>);

/// A place for one run claimed from a shared queue, taken before the
/// claim: its slot, when the manager bounds concurrent tasks. Freed when
/// dropped unused.
#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
pub(crate) struct Room {
    slot: Option<Permit>,
}

/// What a run must hold, besides its slot, before it starts: a permit of
/// `first` before it takes a slot (a module's own limit: waiting for it
/// holds no slot; served by priority, then first come), then a permit of
/// `then` (the engine's pool of instances, first come first served).
/// Every run takes them in this order, so no two runs wait on each
/// other's.
#[derive(Debug)]
pub(crate) struct Gate {
    pub(crate) first: Option<Arc<Line>>,
    pub(crate) then: Option<Arc<Semaphore>>,
}

impl Gate {
    /// The first permit if it is free now (`Some(None)` without one).
    fn try_first(&self) -> Option<Option<Permit>> {
        match &self.first {
            None => Some(None),
            Some(line) => line.try_acquire().map(Some),
        }
    }

    /// A place in line for the first permit at `priority`, if the gate
    /// has one. Joined as the run is admitted, so that runs waiting on
    /// one module take their turns in the order they were started (within
    /// a priority), however their tasks happen to be scheduled.
    fn in_line(&self, priority: i16) -> Option<InLine> {
        self.first.as_ref().map(|line| line.join(priority))
    }
}

/// Waits for a permit of `semaphore`, if there is one; `None` if the run
/// was cancelled meanwhile (or the semaphore closed).
async fn permit(
    semaphore: Option<&Arc<Semaphore>>,
    token: &CancellationToken,
) -> Option<Option<OwnedSemaphorePermit>> {
    let Some(semaphore) = semaphore else {
        return Some(None);
    };
    tokio::select! {
        biased;
        () = token.cancelled() => None,
        permit = semaphore.clone().acquire_owned() => permit.ok().map(Some),
    }
}

#[cfg_attr(not(feature = "wasm"), allow(dead_code))]
enum Pending {
    /// No bound on concurrent tasks; in line for the gate's first permit
    /// if it has one.
    Unlimited(Option<InLine>),
    /// A slot, and the gate's first permit, taken when admitted.
    Ready(Permit, Option<Permit>),
    /// Counted among the queued until it holds a slot (or is forgotten);
    /// takes its turn for a slot, at its priority, once it holds its
    /// gate's first permit.
    Queued(InLine, i16),
    /// Not due until `until`: then it joins the lines, at `priority`.
    /// Counted among the queued (where slots are bounded) meanwhile.
    Delayed { until: DateTime<Utc>, priority: i16 },
    /// Counted among the queued, and in turn for a slot since admitted.
    Waiting(InLine),
    /// Claimed from a shared queue, with the room its claimer took; or a
    /// new run that took all its room when admitted.
    Claimed(Box<Held>),
    /// A new run that needs no room at all (no bound, no gate's permits):
    /// it starts at once, as a claimed run does, holding nothing.
    Free,
}

/// A task's hold on its run id and on the live task count, released when
/// the task's future ends, however it ends.
struct TaskEnd {
    inner: Arc<Inner>,
    run_id: Arc<str>,
    token: CancellationToken,
    task: u64,
    /// Last, so dropped last (fields are dropped in order, after `drop`):
    /// the task counts itself out once it has let go of the manager (see
    /// [`Live`]).
    _counted: Counted,
}

impl Drop for TaskEnd {
    fn drop(&mut self) {
        self.inner.forget(&self.run_id, self.task);
        self.inner.ended.notify_one();
    }
}

/// A task's place in the [`Live`] count: taken when made, given back
/// (waking `wait_all` when none is left) when dropped.
struct Counted(Arc<Live>);

impl Counted {
    fn new(live: &Arc<Live>) -> Counted {
        live.tasks.fetch_add(1, Ordering::AcqRel);
        Counted(live.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs a task: records its run `Queued` (`run`, telling `on_recorded`),
/// waits for its turn (`slot`, then `gate`), records it `Running`, does the
/// work and records how it ended. A new run that holds its room already
/// (`Pending::Claimed`, or needs none: `Pending::Free`) is recorded queued
/// and running in one write; a run claimed from a shared queue (`run` is
/// `None`) is recorded `Running` already: none of that but the work and
/// its end.
async fn execute<F>(
    end: TaskEnd,
    slot: Pending,
    gate: Option<Arc<Gate>>,
    run: Option<Box<NewRun>>,
    on_recorded: Option<oneshot::Sender<Result<()>>>,
    work: F,
) where
    F: Future + Send + 'static,
    F::Output: TaskOutput,
{
    let (inner, run_id, token) = (&end.inner, &*end.run_id, &end.token);
    let claimed = matches!(slot, Pending::Claimed(_) | Pending::Free);
    if let Some(mut new) = run {
        let recorded = if claimed {
            // Marked before the registry is, as below.
            let _ = inner.mark_started(run_id);
            new.run.status = RunStatus::Running;
            new.run.started_at = Some(chrono::Utc::now());
            inner
                .registry
                .enqueue(&new.run, 1, new.key.as_deref())
                .await
        } else {
            inner
                .registry
                .insert_keyed(&new.run, Existing::AdoptQueued, new.key.as_deref())
                .await
        };
        drop(new);
        let failed = recorded.is_err();
        if let Some(on_recorded) = on_recorded {
            let _ = on_recorded.send(recorded);
        }
        if failed {
            return;
        }
    }
    // Waiting is boxed: its state then takes no room in the future of a
    // run that never waits (no limits), and none once the work is going.
    let _held = match (slot, gate) {
        (Pending::Claimed(held), _) => Some(held),
        (Pending::Free, _) => None,
        (slot, gate) => match Box::pin(wait_to_start(&end, slot, gate)).await {
            Some(held) => Some(held),
            None => return,
        },
    };
    if token.is_cancelled() {
        return;
    }
    if !claimed {
        // Marked before the registry is, so that whoever sees `Running`
        // there also sees the task as started here.
        if !inner.mark_started(run_id) {
            return;
        }
        match inner
            .registry
            .hold_transition(&Transition::running(run_id))
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot record the run as running; not starting it");
                return;
            }
        }
    }
    let outcome = tokio::select! {
        biased;
        () = token.cancelled() => return,
        outcome = AssertUnwindSafe(work).catch_unwind() => outcome,
    };
    let (outcome, log) = match outcome.map(TaskOutput::into_report) {
        Ok((outcome, log)) => (Ok(outcome), log),
        Err(panic) => (Err(panic), None),
    };
    let mut change = match outcome {
        Ok(Ok(output)) => Transition::completed(run_id, output),
        Ok(Err(failure)) => {
            let message = cut_to(failure.message, MAX_ERROR_MESSAGE);
            tracing::warn!(error = %message, "run failed");
            Transition::failed(run_id, failure.exit_code, message)
        }
        Err(panic) => {
            let message = cut_to(
                format!("the task panicked: {}", panic_message(panic.as_ref())),
                MAX_ERROR_MESSAGE,
            );
            tracing::error!(error = %message, "run failed");
            Transition::failed(run_id, EXIT_PANIC, message)
        }
    };
    change.log = log;
    // For a claimed run, the end is fenced: recorded only if the store
    // still holds the run as this node's attempt.
    change.attempt = _held.as_ref().and_then(|held| held.attempt);
    match inner.registry.hold_transition(&change).await {
        Ok(true) => {}
        Ok(false) if change.attempt.is_some() => tracing::warn!(
            status = %change.to,
            "this node lost the run while it ran (another node settled or re-queued it): its end is not recorded"
        ),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, status = %change.to, "cannot record the run's end"),
    }
}

/// A new run's room, when everything it needs to start is free now:
/// then it holds it all (as a run claimed from a queue does) and is
/// recorded queued and running in one write, one commit fewer before its
/// work begins. Otherwise it waits as any run does, recorded `Queued`.
fn ready_now(slot: Pending, gate: Option<&Gate>) -> Pending {
    let (slot, first) = match slot {
        Pending::Ready(slot, first) => (Some(slot), first),
        Pending::Unlimited(None) => (None, None),
        slot => return slot,
    };
    let then = match gate.and_then(|gate| gate.then.clone()) {
        None => None,
        Some(pool) => match pool.try_acquire_owned() {
            Ok(permit) => Some(permit),
            // Given back as they were: the run waits for its turn.
            Err(_) => {
                return match slot {
                    Some(slot) => Pending::Ready(slot, first),
                    None => Pending::Unlimited(None),
                };
            }
        },
    };
    if slot.is_none() && first.is_none() && then.is_none() {
        // Nothing to hold: no allocation for it either.
        return Pending::Free;
    }
    let held = Held {
        _slot: slot,
        _first: first,
        _then: then,
        attempt: None,
    };
    Pending::Claimed(Box::new(held))
}

/// A run its task records as it starts, and its idempotency key. A run
/// its caller added `Queued` already (the guide's way), or one resumed
/// from its record, is adopted.
struct NewRun {
    run: Run,
    key: Option<Box<str>>,
}

/// What a started run holds until it ends: its slot and its gate's permits.
struct Held {
    _slot: Option<Permit>,
    _first: Option<Permit>,
    _then: Option<OwnedSemaphorePermit>,
    /// The attempt of a run claimed from a shared queue.
    attempt: Option<u32>,
}

/// Waits for what a run needs before it starts: its gate's first permit,
/// then a slot (unless it got both when admitted), then the gate's other
/// permit. `None` if it was cancelled meanwhile.
async fn wait_to_start(end: &TaskEnd, slot: Pending, gate: Option<Arc<Gate>>) -> Option<Box<Held>> {
    let token = &end.token;
    let (slot, first) = match slot {
        // Holds its room already.
        Pending::Claimed(held) => return Some(held),
        Pending::Free | Pending::Unlimited(None) => (None, None),
        Pending::Unlimited(Some(in_line)) => (None, Some(in_line.turn(token).await?)),
        Pending::Ready(slot, first) => (Some(slot), first),
        Pending::Waiting(in_line) => (Some(in_turn(end, in_line).await?), None),
        Pending::Queued(in_line, priority) => {
            let first = in_line.turn(token).await?;
            (take_slot(end, priority).await?, Some(first))
        }
        Pending::Delayed { until, priority } => {
            let wait = (until - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                biased;
                () = token.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
            let first = match gate.as_ref().and_then(|gate| gate.in_line(priority)) {
                Some(in_line) => Some(in_line.turn(token).await?),
                None => None,
            };
            (take_slot(end, priority).await?, first)
        }
    };
    let then = gate.as_ref().and_then(|g| g.then.clone());
    let then = permit(then.as_ref(), token).await?;
    Some(Box::new(Held {
        _slot: slot,
        _first: first,
        _then: then,
        attempt: None,
    }))
}

/// A slot for a run that queued, in turn at `priority` (none needed where
/// slots are not bounded). `None` if it was cancelled meanwhile.
async fn take_slot(end: &TaskEnd, priority: i16) -> Option<Option<Permit>> {
    match &end.inner.slots {
        None => Some(None),
        Some(slots) => in_turn(end, slots.join(priority)).await.map(Some),
    }
}

/// A queued run's slot, once its place in line comes; from then on it no
/// longer counts among the queued. `None` if it was cancelled meanwhile.
async fn in_turn(end: &TaskEnd, place: InLine) -> Option<Permit> {
    let slot = place.turn(&end.token).await?;
    end.inner.dequeue(&end.run_id, end.task);
    Some(slot)
}

/// The longest error message a run records, in bytes; a longer one is cut
/// (" \[cut\]"), so that one failing run cannot bloat the registry or every
/// listing and event that carries its message.
pub const MAX_ERROR_MESSAGE: usize = 16 << 10;

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic value that is not a string)")
}
