//! modrun runs work as tracked background tasks: start it and get a run id
//! at once, watch its status change in a run registry, cancel it, and shut
//! down without losing anything.
//!
//! - [`Run`] and [`RunStatus`]: one invocation and the status flow it follows.
//! - [`RunRegistry`]: the record of runs and of every status change, in
//!   memory or in a SQLite file that survives crashes.
//! - [`BackgroundTaskManager`]: starts futures as tracked tasks, with limits,
//!   cancellation and graceful shutdown.
//! - [`RunHandle`]: what a start returns: the run's id, a wait for its
//!   end, a cancel, and its own events.
//! - `Modrun` (feature `wasm`): the one entry point for WebAssembly plugins,
//!   built from a plugins directory, a store, limits, a compiled-module
//!   cache and the application's own
//!   [host functions](module::HostFunctions).
//!
//! # Features
//!
//! `cli` (the default) is everything the `modrun` command needs. With
//! `default-features = false` the crate is the task manager, run handles and
//! the memory store, and compiles no wasmtime, SQLite, PostgreSQL or HTTP;
//! add `wasm` (plugins), `sqlite`, `postgres` and `http` (the API and the
//! dashboard) as needed.
//!
//! # Quick start
//!
//! ```
//! use modrun::{BackgroundTaskManager, Run, RunRegistry, RunStatus};
//!
//! # #[tokio::main]
//! # async fn main() -> anyhow::Result<()> {
//! let registry = RunRegistry::in_memory();
//! let manager = BackgroundTaskManager::new(registry.clone());
//!
//! let run = Run::new("my-module", "My Module")
//!     .with_parameters(serde_json::json!({"key": "value"}));
//! registry.add_run(&run).await?;
//!
//! // Returns at once; the work goes on in the background.
//! let run_id = manager
//!     .start_task(run, async {
//!         tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//!         anyhow::Ok("result")
//!     })
//!     .await?;
//! assert!(manager.is_task_active(&run_id));
//!
//! // Before shutting down:
//! manager.wait_all().await;
//! let history = registry.history(&run_id).await?;
//! let statuses: Vec<RunStatus> = history.iter().map(|change| change.status).collect();
//! assert_eq!(statuses, [RunStatus::Queued, RunStatus::Running, RunStatus::Completed]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "wasm")]
pub mod cluster;
pub mod error;
mod handle;
#[cfg(feature = "http")]
pub mod http;
mod line;
pub mod manager;
#[cfg(feature = "wasm")]
mod modrun;
#[cfg(feature = "wasm")]
pub mod module;
pub mod registry;
pub mod run;
mod sync;

pub use error::{Error, Result};
pub use handle::RunHandle;
pub use manager::{
    BackgroundTaskManager, CancelReason, Failure, ShutdownReport, TaskLimits, TaskOutput,
};
#[cfg(feature = "wasm")]
pub use modrun::{Modrun, ModrunBuilder};
#[cfg(feature = "wasm")]
pub use module::{HostConfig, HostFunctions, ModuleHost, ModuleRunner};
pub use registry::{RunEvent, RunFilter, RunRegistry, RunStore};
pub use run::{
    LogEntry, LogLevel, LogSource, Progress, Run, RunStatus, StartOptions, StatusChange, Transition,
};
/// The WebAssembly runtime modrun is built on, at the version it uses: for
/// the types of [host functions](module::HostFunctions).
#[cfg(feature = "wasm")]
pub use wasmtime;
