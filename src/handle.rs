//! [`RunHandle`]: what a start gives back. Its id, its status, a wait for
//! how it ends, a cancel, and its own events: no subscribe-and-filter loop
//! at every caller.

use std::fmt;
use std::ops::Deref;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;

use crate::error::{Error, Result};
use crate::manager::BackgroundTaskManager;
#[cfg(feature = "wasm")]
use crate::module::ModuleRunner;
use crate::registry::{RunEvent, RunRegistry};
use crate::run::{Run, RunStatus};

/// A started run. It reads as its id (`&*handle`, `handle.id()`,
/// `handle.to_string()`, or [`into_id`](Self::into_id)), so code that kept
/// the bare id keeps working; and it can wait for the run's end, cancel it,
/// and follow its events.
///
/// Dropping a handle changes nothing about the run, and any number of
/// handles may follow one run. A handle holds the registry and the runner
/// (or manager) it came from, as a clone of them would: keep only the id
/// ([`into_id`](Self::into_id)) where those must close, as a SQLite
/// registry's file must before another process may open it.
#[derive(Clone)]
pub struct RunHandle {
    run_id: String,
    canceller: Canceller,
}

/// Who cancels the run: the module runner (which reaches the node that
/// executes it), or the manager that holds the task.
#[derive(Clone)]
enum Canceller {
    #[cfg(feature = "wasm")]
    Module(ModuleRunner),
    Task(BackgroundTaskManager),
}

impl RunHandle {
    #[cfg(feature = "wasm")]
    pub(crate) fn for_module(run_id: String, runner: &ModuleRunner) -> RunHandle {
        RunHandle {
            run_id,
            canceller: Canceller::Module(runner.clone()),
        }
    }

    pub(crate) fn for_task(run_id: String, manager: &BackgroundTaskManager) -> RunHandle {
        RunHandle {
            run_id,
            canceller: Canceller::Task(manager.clone()),
        }
    }

    /// The manager of this process that would execute the run.
    fn manager(&self) -> &BackgroundTaskManager {
        match &self.canceller {
            #[cfg(feature = "wasm")]
            Canceller::Module(runner) => runner.manager(),
            Canceller::Task(manager) => manager,
        }
    }

    /// The registry the run is recorded in.
    fn registry(&self) -> &RunRegistry {
        match &self.canceller {
            #[cfg(feature = "wasm")]
            Canceller::Module(runner) => runner.registry(),
            Canceller::Task(manager) => manager.registry(),
        }
    }

    /// The run's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.run_id
    }

    /// The run's id, owned.
    #[must_use]
    pub fn into_id(self) -> String {
        self.run_id
    }

    /// The run as the registry holds it now.
    pub async fn run(&self) -> Result<Run> {
        self.registry()
            .get_run(&self.run_id)
            .await?
            .ok_or_else(|| Error::RunNotFound(self.run_id.clone()))
    }

    /// Where the run is now.
    pub async fn status(&self) -> Result<RunStatus> {
        Ok(self.run().await?.status)
    }

    /// Waits until the run has ended, and returns it as recorded, with its
    /// output or error and its log. An end that came before the wait began
    /// is found at once: the wait listens first, then looks.
    pub async fn wait(&self) -> Result<Run> {
        // A run this process executes: its task lets go of the run once
        // its end is recorded. (Not recorded: the store refused it, as a
        // node that lost the run; the events say how it ended.)
        self.manager().task_gone(&self.run_id).await;
        let run = self.run().await?;
        if run.status.is_terminal() {
            return Ok(run);
        }
        let mut events = self.registry().subscribe();
        loop {
            let run = self.run().await?;
            if run.status.is_terminal() {
                return Ok(run);
            }
            // Until an event says this run ended (or events were missed,
            // when the registry is read again).
            loop {
                match events.recv().await {
                    Ok(RunEvent::Status { run_id, change, .. })
                        if run_id == self.run_id && change.status.is_terminal() =>
                    {
                        break;
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return Err(Error::RegistryClosed),
                }
            }
        }
    }

    /// Cancels the run; `false` if it had already ended. A module run is
    /// cancelled wherever it executes.
    pub async fn cancel(&self) -> Result<bool> {
        match &self.canceller {
            #[cfg(feature = "wasm")]
            Canceller::Module(runner) => runner.cancel(&self.run_id).await,
            Canceller::Task(manager) => manager.cancel_task(&self.run_id).await,
        }
    }

    /// The run's own events from now on: status changes, progress and log
    /// lines. The stream ends after the run's terminal status. Events the
    /// stream falls too far behind to keep are skipped (read the run for
    /// where it is).
    pub fn events(&self) -> impl Stream<Item = RunEvent> + Send + Unpin + 'static {
        let events = self.registry().subscribe();
        let run_id = self.run_id.clone();
        Box::pin(futures_util::stream::unfold(
            (events, run_id, false),
            |(mut events, run_id, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    match events.recv().await {
                        Ok(event) if event.run_id() == run_id => {
                            let ends = matches!(
                                &event,
                                RunEvent::Status { change, .. } if change.status.is_terminal()
                            );
                            return Some((event, (events, run_id, ends)));
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        ))
    }
}

impl Deref for RunHandle {
    type Target = str;

    fn deref(&self) -> &str {
        &self.run_id
    }
}

impl AsRef<str> for RunHandle {
    fn as_ref(&self) -> &str {
        &self.run_id
    }
}

impl fmt::Display for RunHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.run_id)
    }
}

impl fmt::Debug for RunHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RunHandle").field(&self.run_id).finish()
    }
}

impl From<RunHandle> for String {
    fn from(handle: RunHandle) -> String {
        handle.run_id
    }
}

impl PartialEq<str> for RunHandle {
    fn eq(&self, other: &str) -> bool {
        self.run_id == other
    }
}

impl PartialEq<&str> for RunHandle {
    fn eq(&self, other: &&str) -> bool {
        self.run_id == *other
    }
}

impl PartialEq<String> for RunHandle {
    fn eq(&self, other: &String) -> bool {
        &self.run_id == other
    }
}

impl PartialEq<RunHandle> for &str {
    fn eq(&self, other: &RunHandle) -> bool {
        *self == other.run_id
    }
}

impl PartialEq<RunHandle> for str {
    fn eq(&self, other: &RunHandle) -> bool {
        self == other.run_id
    }
}

impl PartialEq<RunHandle> for String {
    fn eq(&self, other: &RunHandle) -> bool {
        *self == other.run_id
    }
}

impl serde::Serialize for RunHandle {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.run_id)
    }
}
