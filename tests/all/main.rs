//! modrun's integration tests: one binary, one module per part of the product.

/// The contract every registry backend passes: the same tests, run against
/// the in-memory and the SQLite store.
mod registry_contract;

/// What only the SQLite registry promises: reopening, crash recovery, clear
/// errors for bad files, durability of acknowledged writes under SIGKILL.
mod sqlite;

/// The background task manager: status flow, failures, panics, cancellation
/// races, limits and queueing, shutdown.
mod manager;

/// WebAssembly modules: loading plugins, sandboxed runs, hostile plugins,
/// cancellation of guests, grants.
mod modules;

/// Hot reload: swapping, breaking, deleting and rewriting components under a
/// running host, and the compiled-module cache.
mod reload;

/// The HTTP API, called in process: every endpoint, every error, the token,
/// the event stream, the OpenAPI document.
mod http;

/// `modrun serve` and `modrun run` as real processes: SIGTERM, kill -9 and
/// restart, a flood of starts past the limits, exit codes.
mod server;

/// The registry when it cannot write: a lock another process holds, a
/// deleted file, a full disk. Starts are refused, run ends held, nothing lost.
mod outage;

/// Hostile plugins and clumsy operators against the host's bounds: floods
/// of progress and log calls, huge outputs and errors, special files and
/// links in grants and in the plugins directory, absurd manifests.
mod abuse;

/// Properties over generated input: the manifest parser, parameter
/// validation, and the status flow under any interleaving of start, cancel
/// and finish.
mod properties;

/// A bounded soak of one server: a storm of starts, cancels, reloads and
/// hostile plugins; memory, files and threads must come back flat.
mod soak;

/// How runs end as their authors would describe them: a module's exit,
/// traps with their backtraces in the log, output line by line, runs past
/// the instance pool waiting, `modrun run` recorded.
mod outcomes;

/// `modrun dev` as a process: serving, rebuilding on an edit, re-running,
/// a broken save reported while the last good version serves.
mod dev;

/// Several nodes on one PostgreSQL database: node leases, runs of a lost
/// node settled, restarts, `modrun serve` processes sharing a database.
mod cluster;

/// The store as the queue, on PostgreSQL: claims, module limits applied
/// at claim, runs started on one node executed by another, runs no node
/// can run settled.
mod queue;

/// Retention: `serve --retain` and `modrun cleanup` remove finished runs
/// past their limits, never active ones, and the file shrinks.
mod retention;

/// Plugins in Python and JavaScript, built by `modrun build` with the guest
/// toolchains it installs, and `modrun new` in every language.
mod polyglot;

/// The web dashboard in headless Chromium over WebDriver: starting from the
/// generated form, cancelling, a failure, a load error, signing in.
mod dashboard;

/// Embedding: the one entry point, the application's own host functions
/// (linked, missing, mistyped, misnamed), and typed load errors.
mod embed;

/// Helpers shared by the tests: temporary registries and waiting with deadlines.
mod support;
