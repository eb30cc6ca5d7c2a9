//! A run — one invocation of a module — and the status flow it follows.
//!
//! Every run moves `Queued → Running → Completed | Failed | Cancelled`, and a
//! run may also end straight from `Queued` (cancelled while waiting, or failed
//! because its host died). Once a run is in a terminal status it never changes
//! again; [`RunStatus::can_become`] is the single place that flow is written down.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Error;

/// The exit code recorded for a run that completed.
pub const EXIT_SUCCESS: i32 = 0;
/// The exit code recorded for a run whose work returned an error or trapped.
pub const EXIT_FAILURE: i32 = 1;
/// The exit code recorded for a run that ran out of time (as `timeout(1)` reports it).
pub const EXIT_TIMEOUT: i32 = 124;
/// The exit code recorded for a run whose work panicked (as a Rust process does).
pub const EXIT_PANIC: i32 = 101;
/// The exit code recorded for a cancelled run (as a shell reports Ctrl-C).
pub const EXIT_CANCELLED: i32 = 130;

/// The largest parameters a module run takes, as JSON text: a start with
/// larger ones is refused, and a node never reads larger ones from a
/// queue other nodes write (such a run is recorded `Failed`, saying so).
pub const MAX_PARAMETERS_BYTES: usize = 16 << 20;

/// `text` cut to at most `max` bytes (on a character boundary), marked
/// " [cut]" when it was: how every message a run records is bounded.
#[must_use]
pub(crate) fn cut_to(mut text: String, max: usize) -> String {
    if text.len() > max {
        text.truncate(text.floor_char_boundary(max));
        text.push_str(" [cut]");
    }
    text
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Recorded, waiting to start.
    Queued,
    /// Its work is executing.
    Running,
    /// Its work finished successfully.
    Completed,
    /// Its work returned an error, panicked, timed out, or was interrupted.
    Failed,
    /// It was cancelled (by a user, or by shutdown).
    Cancelled,
}

impl RunStatus {
    /// Every status, in flow order.
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The stable lowercase name used in storage, JSON and the CLI.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the run is over: `Completed`, `Failed` or `Cancelled`.
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    /// Whether the run is still `Queued` or `Running`.
    #[must_use]
    pub const fn is_active(self) -> bool {
        !self.is_terminal()
    }

    /// Whether the status flow allows going from `self` to `next`.
    ///
    /// ```
    /// use modrun::RunStatus;
    /// assert!(RunStatus::Queued.can_become(RunStatus::Running));
    /// assert!(RunStatus::Queued.can_become(RunStatus::Cancelled));
    /// assert!(!RunStatus::Running.can_become(RunStatus::Queued));
    /// assert!(!RunStatus::Completed.can_become(RunStatus::Failed));
    /// ```
    #[must_use]
    pub const fn can_become(self, next: RunStatus) -> bool {
        match self {
            RunStatus::Queued => !matches!(next, RunStatus::Queued),
            RunStatus::Running => next.is_terminal(),
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled => false,
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::UnknownStatus(s.to_owned()))
    }
}

/// How far a run has come, as its work last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Done fraction, from 0.0 to 1.0.
    pub fraction: f64,
    /// What the work is doing now.
    pub message: String,
}

/// One invocation of a module, as the registry records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Unique id (a UUID unless the caller chose another).
    pub run_id: String,
    /// The module that runs.
    pub module_id: String,
    /// The module's human name.
    pub module_name: String,
    /// Where the run is in its life.
    pub status: RunStatus,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
    /// When its work started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a terminal status.
    pub completed_at: Option<DateTime<Utc>>,
    /// The parameters it was started with.
    pub parameters: Map<String, Value>,
    /// 0 when completed; see the `EXIT_*` constants for the others.
    pub exit_code: Option<i32>,
    /// Why it failed or was cancelled.
    pub error_message: Option<String>,
    /// What its work returned.
    pub output: Option<Value>,
    /// The last progress its work reported.
    pub progress: Option<Progress>,
    /// The content hash of the module version that ran.
    pub module_version: Option<String>,
    /// The node that executes (or executed) the run, where several nodes
    /// share one database; `None` for a run not yet claimed, and in a
    /// store one process holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// How many times a node has claimed the run from a shared queue (a
    /// run re-queued after its node was lost runs again); `None` where
    /// runs are not claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// How soon the run starts among those waiting for the same room:
    /// higher first (0 by default; negative for background work). Runs
    /// of equal priority start in the order they became due.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i16,
    /// The earliest time the run may start; `None`: as soon as there is
    /// room. A run waits `Queued` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// What the run's work logged (for a module: its log calls, then its
    /// captured standard output and error), capped by the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<LogEntry>,
}

/// How much a log entry matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Fine detail.
    Trace,
    /// Detail for whoever debugs the module.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong.
    Warn,
    /// Something failed.
    Error,
}

impl LogLevel {
    /// Its name: `trace`, `debug`, `info`, `warn` or `error`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Where a log entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// The module's `log` calls (or the host, about the run).
    Log,
    /// The module's standard output.
    Stdout,
    /// The module's standard error.
    Stderr,
}

impl LogSource {
    /// Its name: `log`, `stdout` or `stderr`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            LogSource::Log => "log",
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
        }
    }
}

/// One line of a run's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When it was written (for captured output: when the run ended).
    pub at: DateTime<Utc>,
    /// How much it matters.
    pub level: LogLevel,
    /// Where it came from.
    pub source: LogSource,
    /// The text.
    pub message: String,
}

impl Run {
    /// A new `Queued` run with a fresh id, created now, with no parameters.
    ///
    /// Ids are UUID v7: unique like v4, and ordered by creation time, which
    /// keeps the registry's indexes append-mostly.
    ///
    /// ```
    /// use modrun::{Run, RunStatus};
    /// let run = Run::new("hello", "Hello");
    /// assert_eq!(run.status, RunStatus::Queued);
    /// assert_eq!(run.run_id.len(), 36);
    /// ```
    #[must_use]
    pub fn new(module_id: impl Into<String>, module_name: impl Into<String>) -> Run {
        Run {
            run_id: uuid::Uuid::now_v7().to_string(),
            module_id: module_id.into(),
            module_name: module_name.into(),
            status: RunStatus::Queued,
            created_at: Utc::now(),
            started_at: None,
            completed_at: None,
            parameters: Map::new(),
            exit_code: None,
            error_message: None,
            output: None,
            progress: None,
            module_version: None,
            node: None,
            attempt: None,
            priority: 0,
            not_before: None,
            log: Vec::new(),
        }
    }

    /// The same run with these parameters.
    ///
    /// ```
    /// use modrun::Run;
    /// let run = Run::new("hello", "Hello").with_parameters(serde_json::json!({"name": "Ada"}));
    /// assert_eq!(run.parameters["name"], "Ada");
    /// ```
    ///
    /// A value that is not a JSON object is stored under the key `"value"`.
    #[must_use]
    pub fn with_parameters(mut self, parameters: Value) -> Run {
        self.parameters = match parameters {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => Map::from_iter([("value".to_owned(), other)]),
        };
        self
    }

    /// The same run with this [priority](Run::priority): higher starts
    /// first among the runs waiting for the same room.
    ///
    /// ```
    /// use modrun::Run;
    /// assert_eq!(Run::new("hello", "Hello").with_priority(5).priority, 5);
    /// ```
    #[must_use]
    pub fn with_priority(mut self, priority: i16) -> Run {
        self.priority = priority;
        self
    }

    /// The same run, to start no earlier than `at`. A time not after the
    /// run's creation sets none: the run is due already.
    #[must_use]
    pub fn with_not_before(mut self, at: DateTime<Utc>) -> Run {
        self.not_before = (at > self.created_at).then_some(at);
        self
    }

    /// When the run may start: its [not-before](Run::not_before) time,
    /// or its creation. Runs of equal priority start in this order.
    #[must_use]
    pub fn due_at(&self) -> DateTime<Utc> {
        self.not_before.unwrap_or(self.created_at)
    }

    /// Where the run stands among queued runs: those with a smaller key
    /// are claimed first (higher priority, then due first). Ties go to the
    /// run queued first.
    pub(crate) fn queue_order(&self) -> (std::cmp::Reverse<i16>, DateTime<Utc>) {
        (std::cmp::Reverse(self.priority), self.due_at())
    }

    /// Whether the run may start at `now` (its not-before time, if any,
    /// has come).
    #[must_use]
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.not_before.is_none_or(|at| at <= now)
    }

    /// The same run with this id instead of a fresh one.
    #[must_use]
    pub fn with_id(mut self, run_id: impl Into<String>) -> Run {
        self.run_id = run_id.into();
        self
    }

    /// This run reset to a fresh `Queued` state: everything its earlier
    /// attempt recorded (times, outcome, progress) is cleared, and
    /// `created_at` is now.
    #[must_use]
    pub(crate) fn requeued(mut self) -> Run {
        self.status = RunStatus::Queued;
        self.created_at = Utc::now();
        self.started_at = None;
        self.completed_at = None;
        self.exit_code = None;
        self.error_message = None;
        self.output = None;
        self.progress = None;
        self.log.clear();
        self
    }

    /// Applies a status change to this record, as every backend does.
    pub(crate) fn apply(&mut self, change: &Transition) {
        self.status = change.to;
        if change.to == RunStatus::Running {
            self.started_at = Some(change.at);
        }
        if change.to.is_terminal() {
            self.completed_at = Some(change.at);
            self.exit_code = change.exit_code;
            self.error_message = change.error_message.clone();
            if change.output.is_some() {
                self.output = change.output.clone();
            }
            if let Some(log) = &change.log {
                self.log = log.clone();
            }
        }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde passes a reference
pub(crate) fn is_zero(priority: &i16) -> bool {
    *priority == 0
}

/// How a run is started, besides its module and parameters: how soon it
/// goes among the runs waiting for the same room, the earliest time it may
/// start, and a key that makes the start safe to retry.
///
/// ```
/// use modrun::StartOptions;
/// let options = StartOptions::new()
///     .priority(10)
///     .delay(std::time::Duration::from_secs(60))
///     .idempotency_key("invoice-42");
/// assert_eq!(options.priority, 10);
/// assert!(options.not_before.is_some());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartOptions {
    /// Higher starts first among the runs waiting for the same room (0 by
    /// default): see [`Run::priority`].
    pub priority: i16,
    /// The earliest time the run may start (`None`: as soon as there is
    /// room): see [`Run::not_before`].
    pub not_before: Option<DateTime<Utc>>,
    /// Makes the start safe to retry: every start with the same key,
    /// module and parameters answers the run the first one recorded.
    pub idempotency_key: Option<String>,
}

impl StartOptions {
    /// No priority, no delay, no key: a plain start.
    #[must_use]
    pub fn new() -> StartOptions {
        StartOptions::default()
    }

    /// With this priority: higher starts first.
    #[must_use]
    pub fn priority(mut self, priority: i16) -> StartOptions {
        self.priority = priority;
        self
    }

    /// To start no earlier than `at`.
    #[must_use]
    pub fn not_before(mut self, at: DateTime<Utc>) -> StartOptions {
        self.not_before = Some(at);
        self
    }

    /// To start no earlier than `delay` from now. (A delay past what a
    /// registry stores, the year 2262, is refused when the run starts.)
    #[must_use]
    pub fn delay(self, delay: std::time::Duration) -> StartOptions {
        let at = chrono::TimeDelta::from_std(delay)
            .ok()
            .and_then(|delay| Utc::now().checked_add_signed(delay))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        self.not_before(at)
    }

    /// Safe to retry with `key`: see [`StartOptions::idempotency_key`].
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> StartOptions {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// `at`, if a registry can store it (as nanoseconds: the years 1677 to
/// 2262); else [`Error::TimeOutOfRange`].
#[cfg_attr(
    not(any(feature = "wasm", feature = "sqlite", feature = "postgres")),
    allow(dead_code)
)]
pub(crate) fn check_time(at: DateTime<Utc>) -> Result<(), Error> {
    match at.timestamp_nanos_opt() {
        Some(_) => Ok(()),
        None => Err(Error::TimeOutOfRange(at)),
    }
}

/// One entry of a run's history: a status it entered, when, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The status entered.
    pub status: RunStatus,
    /// When.
    pub at: DateTime<Utc>,
    /// Why, where there is more to say (an error, who cancelled).
    pub message: Option<String>,
}

/// A status change asked of the registry: it applies only if the flow allows
/// it from the run's current status, so of two racing changes to a terminal
/// status exactly one wins.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The run to change.
    pub run_id: String,
    /// The status to enter.
    pub to: RunStatus,
    /// When.
    pub at: DateTime<Utc>,
    /// The history entry's message.
    pub message: Option<String>,
    /// The exit code, for a terminal status.
    pub exit_code: Option<i32>,
    /// The error message, for `Failed` or `Cancelled`.
    pub error_message: Option<String>,
    /// The work's output, for `Completed`.
    pub output: Option<Value>,
    /// The run's log, saved with a terminal status (none: keep what is saved).
    pub log: Option<Vec<LogEntry>>,
    /// For a run this node executes on a registry nodes share: the
    /// attempt it executes (0: whichever attempt this node holds). The
    /// change then applies only while the store still holds the run as
    /// that attempt, executed by this node (a fenced write: once another
    /// node has settled or re-queued the run, this node's late change is
    /// refused). Ignored by stores one process holds.
    pub attempt: Option<u32>,
}

impl Transition {
    /// The run started its work now.
    #[must_use]
    pub fn running(run_id: impl Into<String>) -> Transition {
        Transition::new(run_id, RunStatus::Running)
    }

    /// The run's work succeeded now with this output.
    #[must_use]
    pub fn completed(run_id: impl Into<String>, output: Value) -> Transition {
        Transition {
            exit_code: Some(EXIT_SUCCESS),
            output: Some(output),
            ..Transition::new(run_id, RunStatus::Completed)
        }
    }

    /// The run failed now, for this reason.
    #[must_use]
    pub fn failed(
        run_id: impl Into<String>,
        exit_code: i32,
        error: impl Into<String>,
    ) -> Transition {
        let error = error.into();
        Transition {
            message: Some(error.clone()),
            exit_code: Some(exit_code),
            error_message: Some(error),
            ..Transition::new(run_id, RunStatus::Failed)
        }
    }

    /// The run was cancelled now, for this reason.
    #[must_use]
    pub fn cancelled(run_id: impl Into<String>, reason: impl Into<String>) -> Transition {
        let reason = reason.into();
        Transition {
            message: Some(reason.clone()),
            exit_code: Some(EXIT_CANCELLED),
            error_message: Some(reason),
            ..Transition::new(run_id, RunStatus::Cancelled)
        }
    }

    fn new(run_id: impl Into<String>, to: RunStatus) -> Transition {
        Transition {
            run_id: run_id.into(),
            to,
            at: Utc::now(),
            message: None,
            exit_code: None,
            error_message: None,
            output: None,
            log: None,
            attempt: None,
        }
    }

    /// The history entry this change adds.
    #[must_use]
    pub fn status_change(&self) -> StatusChange {
        StatusChange {
            status: self.to,
            at: self.at,
            message: self.message.clone(),
        }
    }
}
