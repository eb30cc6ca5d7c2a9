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

    /// A component file that could not be loaded; [`LoadError`] says why.
    #[cfg(feature = "wasm")]
    #[error("module file {}: {cause}", path.display())]
    ModuleLoad {
        /// The file (or, for a version fetched from a shared database,
        /// the module file it would replace).
        path: PathBuf,
        /// Why it was not loaded.
        #[source]
        cause: LoadError,
    },

    /// The plugins directory could not be read.
    #[error("plugins directory {}: {message}", path.display())]
    PluginsDir {
        /// The directory.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },

    /// An application's host functions could not be linked: a bad
    /// interface name, or a function its definition could not define.
    #[error("host functions of interface {interface}: {source}")]
    #[cfg(feature = "wasm")]
    HostFunctions {
        /// The interface, as it was named.
        interface: String,
        /// Why.
        #[source]
        source: wasmtime::Error,
    },

    /// A setting, or a combination of settings, that cannot work; the
    /// message says which and what would.
    #[error("{0}")]
    InvalidConfig(String),

    /// The compiled-module cache directory could not be made private to
    /// this user.
    #[error("cache directory {}: {source}", path.display())]
    CacheDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
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

/// Why a module was not loaded. The message of each says what to do.
#[cfg(feature = "wasm")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file's name is no module id (`<id>.wasm`).
    #[error("{0}")]
    FileName(String),

    /// The module's manifest (`<id>.toml` beside it) is wrong.
    #[error("{0}")]
    Manifest(String),

    /// There is no such file.
    #[error("there is no such file")]
    Missing,

    /// The file may not or could not be read: not a regular file, a link
    /// its manifest does not allow, over the size limit, or an I/O error.
    #[error("{0}")]
    Unreadable(String),

    /// The bytes are not WebAssembly.
    #[error("it is not a WebAssembly file")]
    NotWasm,

    /// The bytes are a core WebAssembly module, not a component.
    #[error(
        "it is a core WebAssembly module, not a component; build it for wasm32-wasip2 \
         (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,

    /// The component does not validate or compile.
    #[error("it is not a valid component: {0:#}")]
    Invalid(#[source] wasmtime::Error),

    /// The component imports an interface this host does not provide, or
    /// provides with other functions or types. The sandbox gives a plugin
    /// WASI, modrun's `host`, and the interfaces the application links
    /// ([`HostFunctions`](crate::module::HostFunctions)); nothing else.
    #[error(
        "it imports {interface}, which this host does not provide ({reason}); link it with \
         the application's host functions, or build the plugin without it"
    )]
    MissingImport {
        /// The interface, as the component names it (`acme:app/kv@0.1.0`).
        interface: String,
        /// What exactly is missing or different.
        reason: String,
        /// The linker's error.
        #[source]
        source: wasmtime::Error,
    },

    /// The component is not a modrun module: it lacks the `plugin` export,
    /// or has it with other types.
    #[error("it is not a modrun module: {0:#}")]
    NotAModule(#[source] wasmtime::Error),

    /// Its `describe` call trapped or failed.
    #[error("describe() failed: {0:#}")]
    DescribeFailed(#[source] wasmtime::Error),

    /// Its `describe` call did not return in time.
    #[error("describe() took longer than {0:?}")]
    DescribeTimedOut(std::time::Duration),

    /// It describes itself as another module than its file names.
    #[error(
        "it describes itself as module {described:?}, but its file is named for {file:?}; \
         rename the file {described}.wasm"
    )]
    IdMismatch {
        /// The id its `describe` returned.
        described: String,
        /// The id its file name gives.
        file: String,
    },

    /// Its `describe` returned a field longer than a module's may be: the
    /// host keeps them with every run.
    #[error("describe() returned {field} of {bytes} bytes; a module's may have at most {max}")]
    DescribedTooLong {
        /// Which field: "an id", "a name", "a version", "a description" or
        /// "a parameters schema".
        field: &'static str,
        /// How long it was.
        bytes: usize,
        /// The most it may be.
        max: usize,
    },

    /// Its parameters schema is not JSON, or not a valid JSON Schema.
    #[error("its parameters schema {0}")]
    Schema(String),

    /// The bytes of a version do not match its content hash: the file
    /// changed since the version was loaded, or a database holds other
    /// bytes under that hash.
    #[error("version {version}: {reason}")]
    Version {
        /// The content hash wanted.
        version: String,
        /// What was found instead.
        reason: String,
    },

    /// The thread reading or compiling it stopped (it panicked, or the
    /// runtime is shutting down).
    #[error("loading stopped: {0}")]
    Stopped(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
