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

/// Helpers shared by the tests: temporary registries and waiting with deadlines.
mod support;
