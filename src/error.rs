//! The library's error type: every failure a caller can cause or meet, each
//! with a message that says what went wrong and what to do about it.

use std::path::PathBuf;

use crate::run::RunStatus;

/// What can go wrong in modrun's library calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A run with this id is queued or running, so it cannot be added or started again.
    #[error("run {run_id} is already active ({status}); wait for it to finish or cancel it first")]
    RunActive {
        /// The id that is in use.
        run_id: String,
        /// Its current status.
        status: RunStatus,
    },

    /// No run with this id is recorded.
    #[error("run {0} not found")]
    RunNotFound(String),

    /// The run already reached a terminal status; its record is final.
    #[error("run {run_id} is already {status}; a finished run cannot change")]
    RunFinished {
        /// The finished run.
        run_id: String,
        /// Its terminal status.
        status: RunStatus,
    },

    /// A status change that the status flow does not allow.
    #[error("run {run_id} cannot go from {from} to {to}")]
    InvalidTransition {
        /// The run concerned.
        run_id: String,
        /// Its current status.
        from: RunStatus,
        /// The status that was asked for.
        to: RunStatus,
    },

    /// The manager's queue of waiting runs is full.
    #[error("too many runs waiting: {queued} queued, the limit is {limit}; retry once some finish")]
    QueueFull {
        /// How many runs are waiting.
        queued: usize,
        /// The configured bound.
        limit: usize,
    },

    /// The manager is shutting down and takes no new work.
    #[error("the task manager is shutting down and accepts no new runs")]
    ShuttingDown,

    /// A status name that is not one of modrun's.
    #[error(
        "unknown run status {0:?}; expected one of queued, running, completed, failed, cancelled"
    )]
    UnknownStatus(String),

    /// The registry file is held by another modrun process (a running
    /// server): open it with [`SqliteReader`](crate::registry::SqliteReader)
    /// to read it meanwhile.
    #[error(
        "run registry at {}: it is in use by another modrun process; stop that one or choose another file",
        path.display()
    )]
    RegistryInUse {
        /// The database file.
        path: PathBuf,
    },

    /// The registry cannot write for now (a full disk, a lock another
    /// process holds, a deleted file): nothing was recorded. Runs already
    /// going keep their updates held until it can write again.
    #[error("the run registry cannot record anything now: {reason}")]
    RegistryUnavailable {
        /// Why, and what to do about it.
        reason: String,
    },

    /// The registry database could not be opened or used.
    #[error("run registry at {}: {message}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// What went wrong, in words.
        message: String,
    },

    /// A stored value could not be read back (the database was edited by hand, or is damaged).
    #[error("run registry holds a value it cannot read: {0}")]
    Corrupt(String),

    /// A time the registry cannot store.
    #[error("time {0} is outside the years 1677 to 2262 that the run registry stores")]
    TimeOutOfRange(chrono::DateTime<chrono::Utc>),

    /// A start gave an idempotency key that an earlier start of another
    /// module, or with other parameters, used.
    #[error(
        "idempotency key {key:?} was used for run {run_id}, started with another module or \
         other parameters; use a new key for a new run"
    )]
    IdempotencyKeyReused {
        /// The key.
        key: String,
        /// The run started with it.
        run_id: String,
    },

    /// An idempotency key that is empty, too long, or holds control
    /// characters.
    #[error("{0:?} is not an idempotency key: use 1 to 255 printable characters")]
    InvalidIdempotencyKey(String),

    /// No module with this id is loaded.
    #[error("no module {0:?} is loaded; list the loaded modules to see which are")]
    UnknownModule(String),

    /// A module id that is not a safe name.
    #[error("{0:?} is not a module id: use 1 to 64 lowercase letters, digits, '-' or '_'")]
    InvalidModuleId(String),

    /// Parameters that the module's schema rejects.
    #[error("parameters for module {module_id} are invalid: {}", problems.join("; "))]
    InvalidParameters {
        /// The module.
        module_id: String,
        /// Each problem, naming the field.
        problems: Vec<String>,
    },

    /// A component file that could not be loaded.
    #[error("module file {}: {message}", path.display())]
    ModuleLoad {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// The plugins directory could not be read.
    #[error("plugins directory {}: {message}", path.display())]
    PluginsDir {
        /// The directory.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// The WebAssembly engine could not be set up.
    #[error("WebAssembly engine: {0}")]
    Engine(String),

    /// Building plugin sources failed.
    #[error("building plugins: {0}")]
    Build(String),

    /// The registry's storage thread is gone (it was closed, or it panicked).
    #[error("the run registry is closed")]
    RegistryClosed,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
