//! Which finished runs a cleanup removes, decided here for every backend:
//! the backends turn a [`Cleanup`] into their own statements, and the
//! memory store applies [`Cleanup::matches`].

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::run::{Run, RunStatus};

/// Which finished runs a cleanup removes: those completed before
/// [`before`](Self::before) (or before their module's own limit, where an
/// [`Override`] gives one), of the chosen statuses and module. Active runs
/// are never removed, whatever their age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleanup {
    /// Finished runs completed before this are removed.
    pub before: DateTime<Utc>,
    /// Only runs in these statuses (finished ones; empty: every finished
    /// status).
    pub statuses: Vec<RunStatus>,
    /// Only this module's runs.
    pub module_id: Option<String>,
    /// Other limits for some modules (and statuses), in place of `before`.
    pub overrides: Vec<Override>,
}

/// A module's own retention limit, for all its finished runs or for one
/// status (which then wins over the module's limit for all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Override {
    /// The module.
    pub module_id: String,
    /// Only its runs in this status; `None`: all its finished runs.
    pub status: Option<RunStatus>,
    /// Its runs completed before this are removed.
    pub before: DateTime<Utc>,
}

/// The finished statuses, as the stores name them.
pub(crate) const FINISHED: [RunStatus; 3] = [
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
];

impl Cleanup {
    /// Every finished run completed more than `age` ago.
    #[must_use]
    pub fn older_than(age: Duration) -> Cleanup {
        Cleanup {
            before: ago(age),
            statuses: Vec::new(),
            module_id: None,
            overrides: Vec::new(),
        }
    }

    /// The finished statuses this cleanup removes.
    #[must_use]
    pub fn finished_statuses(&self) -> Vec<RunStatus> {
        FINISHED
            .into_iter()
            .filter(|status| self.statuses.is_empty() || self.statuses.contains(status))
            .collect()
    }

    /// The limit for a run of `module_id` in `status`: its module's own
    /// for that status, else its module's own, else [`before`](Self::before).
    #[must_use]
    pub fn cutoff_for(&self, module_id: &str, status: RunStatus) -> DateTime<Utc> {
        let own = |wanted: Option<RunStatus>| {
            self.overrides
                .iter()
                .find(|o| o.module_id == module_id && o.status == wanted)
                .map(|o| o.before)
        };
        own(Some(status))
            .or_else(|| own(None))
            .unwrap_or(self.before)
    }

    /// The latest of all limits: no run that ended after it is removed.
    #[must_use]
    pub fn latest(&self) -> DateTime<Utc> {
        self.overrides
            .iter()
            .map(|o| o.before)
            .fold(self.before, DateTime::max)
    }

    /// Whether the cleanup removes `run`.
    #[must_use]
    pub fn matches(&self, run: &Run) -> bool {
        self.finished_statuses().contains(&run.status)
            && self.module_id.as_ref().is_none_or(|m| *m == run.module_id)
            && run
                .completed_at
                .is_some_and(|at| at < self.cutoff_for(&run.module_id, run.status))
    }
}

/// The moment `age` ago (the epoch's start if that is before it).
#[must_use]
pub fn ago(age: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A time as the stores keep it: nanoseconds since the epoch, clamped
/// to what that holds (a limit before 1677 removes nothing, one after
/// 2262 everything finished).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn nanos_clamped(at: DateTime<Utc>) -> i64 {
    at.timestamp_nanos_opt().unwrap_or(if at.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}
