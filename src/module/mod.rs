//! The WebAssembly side: each module is a component from the plugins
//! directory, run in a fresh sandbox per run under the task manager.
//!
//! - [`ModuleHost`] loads and checks components and keeps the current
//!   version of each module (`loader`), on one engine (`engine`).
//! - [`ModuleRunner`] starts runs: validates parameters against the
//!   module's schema, records the run, and executes it with its limits
//!   (`runner`), through the host functions of `host`.
//! - [`HostFunctions`] are the embedding application's own functions that
//!   its plugins may import (`host_functions`).
//! - [`Manifest`] is a module's limits and grants (`manifest`).
//! - [`Reloader`] keeps a host in step with its plugins directory (`reload`).
//! - [`build_plugins`] builds plugin sources, in Rust, Python or
//!   JavaScript, into components (`build`); [`new_plugin`] starts one
//!   (`scaffold`).

mod bindings;
mod build;
mod engine;
mod filesystem;
mod host;
mod host_functions;
mod loader;
mod manifest;
mod module_id;
mod output;
mod plugin_file;
mod reload;
mod runner;
mod scaffold;

pub use build::{
    BuiltPlugin, Language, PluginSource, build_plugin, build_plugins, is_source_path,
    plugin_sources,
};
pub use engine::{HostConfig, WARM_SLOTS, shared_cache_dir};
pub use host::HostState;
pub use host_functions::HostFunctions;
pub(crate) use loader::LoadedModule;
pub use loader::{
    CompileStats, LoadFailure, LoadReport, ModuleHost, ModuleInfo, ModuleSummary, ReloadEvent,
    component_files,
};
pub use manifest::{
    ComponentFile, DirGrant, Grants, Manifest, ModuleLimits, Retention, parse_age, parse_delay,
    parse_start_time,
};
pub use module_id::ModuleId;
pub use reload::{DEFAULT_DEBOUNCE, Reloader, changes_content};
pub use runner::{CancelAnswer, ModuleRunner};
pub use scaffold::new_plugin;
