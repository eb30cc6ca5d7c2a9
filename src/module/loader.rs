//! The module host: loads the components of a plugins directory, checks each
//! one, and keeps the current version of every module.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};
use wasmtime_wasi::WasiCtx;

use super::bindings::{Module, ModulePre};
use super::engine::{HostConfig, new_engine};
use super::host::HostState;
use super::manifest::Manifest;
use crate::error::{Error, Result};

/// How long `describe` may take when a module is loaded.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a module says about itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleInfo {
    /// Its id (a safe name, the same as its file's name).
    pub id: String,
    /// Its human name.
    pub name: String,
    /// Its own version string.
    pub version: String,
    /// What it does.
    pub description: String,
    /// The JSON Schema its parameters must satisfy.
    pub parameters_schema: Value,
}

/// A loaded module, as listings show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleSummary {
    /// What the module says about itself.
    #[serde(flatten)]
    pub info: ModuleInfo,
    /// The content hash of the component (`sha256:…`): the version runs record.
    pub content_hash: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// When this version was loaded.
    pub loaded_at: DateTime<Utc>,
    /// Its limits and grants.
    pub manifest: Manifest,
}

/// A file that could not be loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadFailure {
    /// The file.
    pub path: PathBuf,
    /// What was wrong, in words.
    pub error: String,
    /// When the load was tried.
    pub at: DateTime<Utc>,
}

/// What loading a directory did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadReport {
    /// Modules now loaded from it.
    pub loaded: Vec<String>,
    /// Files that failed, each with its reason; the others still loaded.
    pub failed: Vec<LoadFailure>,
}

/// A module ready to run: compiled, linked, described.
pub(crate) struct LoadedModule {
    pub(crate) summary: ModuleSummary,
    pub(crate) pre: ModulePre<HostState>,
    pub(crate) validator: jsonschema::Validator,
}

/// Loads modules and keeps the current version of each.
///
/// Cheap to clone: clones share the engine and the modules.
#[derive(Clone)]
pub struct ModuleHost {
    inner: Arc<HostInner>,
}

struct HostInner {
    engine: Engine,
    linker: Linker<HostState>,
    config: HostConfig,
    modules: RwLock<HashMap<String, Arc<LoadedModule>>>,
    failures: RwLock<BTreeMap<PathBuf, LoadFailure>>,
}

impl std::fmt::Debug for ModuleHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleHost")
            .field("modules", &self.module_ids())
            .finish_non_exhaustive()
    }
}

impl ModuleHost {
    /// A host with no modules yet.
    pub fn new(config: HostConfig) -> Result<ModuleHost> {
        let engine = new_engine(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| Module::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s))
            .map_err(|e| Error::Engine(format!("cannot link the host functions: {e:#}")))?;
        Ok(ModuleHost {
            inner: Arc::new(HostInner {
                engine,
                linker,
                config,
                modules: RwLock::new(HashMap::new()),
                failures: RwLock::new(BTreeMap::new()),
            }),
        })
    }

    /// The host's configuration.
    #[must_use]
    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Loads every `*.wasm` file in `dir`, compiling them in parallel off the
    /// async threads. A file that fails is reported and skipped; the others
    /// load.
    pub async fn load_dir(&self, dir: &Path) -> Result<LoadReport> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::PluginsDir {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
            .collect();
        files.sort();
        let loads = files.into_iter().map(|path| {
            let host = self.clone();
            async move {
                let result = host.load_file(&path).await;
                (path, result)
            }
        });
        let mut report = LoadReport::default();
        for (path, result) in futures_util::future::join_all(loads).await {
            match result {
                Ok(summary) => report.loaded.push(summary.info.id),
                Err(error) => report.failed.push(LoadFailure {
                    path,
                    error: error.to_string(),
                    at: Utc::now(),
                }),
            }
        }
        Ok(report)
    }

    /// Loads (or reloads) one component file, and makes it the current
    /// version of its module. On failure the module's previous version, if
    /// any, stays current and the failure is listed in [`failures`](Self::failures).
    pub async fn load_file(&self, path: &Path) -> Result<ModuleSummary> {
        let result = self.load(path).await;
        let mut failures = self
            .inner
            .failures
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(loaded) => {
                failures.remove(path);
                let summary = loaded.summary.clone();
                tracing::info!(
                    module_id = %summary.info.id,
                    version = %summary.content_hash,
                    path = %path.display(),
                    "module loaded"
                );
                self.inner
                    .modules
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(summary.info.id.clone(), Arc::new(loaded));
                Ok(summary)
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "module not loaded");
                failures.insert(
                    path.to_path_buf(),
                    LoadFailure {
                        path: path.to_path_buf(),
                        error: error.to_string(),
                        at: Utc::now(),
                    },
                );
                Err(error)
            }
        }
    }

    async fn load(&self, path: &Path) -> Result<LoadedModule> {
        let fail = |message: String| Error::ModuleLoad {
            path: path.to_path_buf(),
            message,
        };
        let id = module_id_of(path).map_err(fail)?;
        let manifest = Manifest::for_component(
            path,
            &self.inner.config.default_limits,
            self.inner.config.memory_ceiling,
        )
        .map_err(fail)?;
        let host = self.clone();
        let file = path.to_path_buf();
        let (component, content_hash) = tokio::task::spawn_blocking(move || host.compile(&file))
            .await
            .map_err(|e| fail(format!("compilation stopped: {e}")))?
            .map_err(fail)?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .and_then(ModulePre::new)
            .map_err(|e| fail(format!("needs something the host does not provide: {e:#}")))?;
        let info = self.describe(&pre, &manifest).await.map_err(fail)?;
        if info.id != id {
            return Err(fail(format!(
                "it describes itself as module {:?}, but its file is named for {id:?}; \
                 rename the file {}.wasm",
                info.id, info.id
            )));
        }
        let schema: Value = serde_json::from_str(&info.parameters_schema)
            .map_err(|e| fail(format!("its parameters schema is not JSON: {e}")))?;
        let validator = jsonschema::validator_for(&schema).map_err(|e| {
            fail(format!(
                "its parameters schema is not a valid JSON Schema: {e}"
            ))
        })?;
        Ok(LoadedModule {
            summary: ModuleSummary {
                info: super::ModuleInfo {
                    id,
                    name: info.name,
                    version: info.version,
                    description: info.description,
                    parameters_schema: schema,
                },
                content_hash,
                path: path.to_path_buf(),
                loaded_at: Utc::now(),
                manifest,
            },
            pre,
            validator,
        })
    }

    /// Reads, checks and compiles a component file. Blocking: CPU-heavy.
    fn compile(&self, path: &Path) -> std::result::Result<(Component, String), String> {
        let max = self.inner.config.max_module_bytes;
        let size = std::fs::metadata(path)
            .map_err(|e| format!("cannot read it: {e}"))?
            .len();
        if size > max {
            return Err(format!("it is {size} bytes, over the limit of {max} bytes"));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
        if bytes.len() < 8 || !bytes.starts_with(b"\0asm") {
            return Err("it is not a WebAssembly file".into());
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(
                "it is a core WebAssembly module, not a component; build it for \
                        wasm32-wasip2 (or wrap it with `wasm-tools component new`)"
                    .into(),
            );
        }
        let content_hash = format!("sha256:{:x}", Sha256::digest(&bytes));
        let component = Component::new(&self.inner.engine, &bytes)
            .map_err(|e| format!("it is not a valid component: {e:#}"))?;
        Ok((component, content_hash))
    }

    /// Calls `describe` in a fresh, bounded sandbox.
    async fn describe(
        &self,
        pre: &ModulePre<HostState>,
        manifest: &Manifest,
    ) -> std::result::Result<super::bindings::Info, String> {
        let state = HostState::new(
            WasiCtx::builder().build(),
            manifest.limits.memory_bytes,
            None,
        );
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|_| Ok(wasmtime::UpdateDeadline::Yield(1)));
        store.set_epoch_deadline(1);
        let call = async {
            let module = pre.instantiate_async(&mut store).await?;
            module
                .modrun_plugin_plugin()
                .call_describe(&mut store)
                .await
        };
        match tokio::time::timeout(DESCRIBE_TIMEOUT, call).await {
            Err(_) => Err(format!("describe() took longer than {DESCRIBE_TIMEOUT:?}")),
            Ok(Err(e)) => Err(format!("describe() failed: {e:#}")),
            Ok(Ok(info)) => Ok(info),
        }
    }

    /// The current version of a module, if loaded.
    pub(crate) fn get(&self, module_id: &str) -> Option<Arc<LoadedModule>> {
        self.inner
            .modules
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(module_id)
            .cloned()
    }

    /// One loaded module.
    #[must_use]
    pub fn module(&self, module_id: &str) -> Option<ModuleSummary> {
        self.get(module_id).map(|module| module.summary.clone())
    }

    /// Every loaded module, by id.
    #[must_use]
    pub fn modules(&self) -> Vec<ModuleSummary> {
        let modules = self.inner.modules.read().unwrap_or_else(|e| e.into_inner());
        let mut summaries: Vec<_> = modules.values().map(|m| m.summary.clone()).collect();
        summaries.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        summaries
    }

    /// The ids of the loaded modules, sorted.
    #[must_use]
    pub fn module_ids(&self) -> Vec<String> {
        self.modules().into_iter().map(|m| m.info.id).collect()
    }

    /// Files whose last load failed, with the reasons.
    #[must_use]
    pub fn failures(&self) -> Vec<LoadFailure> {
        self.inner
            .failures
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Stops offering a module for new runs (runs in flight finish).
    /// Returns whether it was loaded.
    pub fn retire(&self, module_id: &str) -> bool {
        self.inner
            .modules
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(module_id)
            .is_some()
    }
}

/// Whether `id` is a safe module name: 1 to 64 of lowercase ASCII letters,
/// digits, `-` and `_`, starting with a letter or digit.
#[must_use]
pub fn is_safe_module_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && id.as_bytes()[0].is_ascii_alphanumeric()
}

/// The module id a component file is named for.
fn module_id_of(path: &Path) -> std::result::Result<String, String> {
    let stem = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .ok_or("its file name is not valid text")?;
    if !is_safe_module_id(stem) {
        return Err(format!(
            "{stem:?} is not a module id: use 1 to 64 lowercase letters, digits, '-' or '_'"
        ));
    }
    Ok(stem.to_owned())
}
