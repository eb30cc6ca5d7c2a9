//! The module host: loads the components of a plugins directory, checks each
//! one, and keeps the current version of every module.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};
use wasmtime_wasi::WasiCtx;

use super::bindings::{Module, ModulePre};
use super::engine::{HostConfig, Ticker, new_engine};
use super::host::HostState;
use super::host_functions::{HostFunctions, is_modruns_own};
use super::manifest::Manifest;
use super::module_id::ModuleId;
use crate::error::{Error, LoadError, Result};
use crate::sync::RwLockUnpoisoned;

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
    /// The last failed attempt to load a newer version of it, if that is
    /// the latest news: this version keeps serving meanwhile.
    pub last_error: Option<LoadFailure>,
    /// Where several nodes share a database: the node that published this
    /// version for all of them to run, when it is not this node's own file
    /// (whose version it replaces, under this node's manifest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_by: Option<String>,
}

impl LoadFailure {
    fn new(path: &Path, error: &Error) -> LoadFailure {
        LoadFailure {
            path: path.to_path_buf(),
            error: error.to_string(),
            at: Utc::now(),
        }
    }
}

/// What happened when the host (re)loaded a file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ReloadEvent {
    /// A version of a module is now current.
    Loaded {
        /// The module.
        module_id: String,
        /// The version now current.
        content_hash: String,
    },
    /// A file failed to load; any previous version keeps serving.
    Failed {
        /// The file.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// A module's file is gone: no new runs of it (runs in flight finish).
    Retired {
        /// The module.
        module_id: String,
    },
}

/// How many components were compiled, and how many came from the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CompileStats {
    /// Components compiled from WebAssembly.
    pub compiled: u64,
    /// Components loaded, already compiled, from the cache directory.
    pub cache_hits: u64,
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
    /// When the file this version was read from had last been modified, as
    /// seen just before it was read (`None` for a version that did not come
    /// from this node's file). Several nodes run the version from the
    /// newest file.
    pub(crate) modified: Option<DateTime<Utc>>,
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
    /// Ticks the engine's epoch while guest code may run.
    ticker: Ticker,
    /// Ties cached machine code to this engine's settings and this modrun.
    engine_key: String,
    linker: Linker<HostState>,
    /// The interfaces the application linked of its own.
    linked: Vec<String>,
    config: HostConfig,
    modules: RwLock<HashMap<String, Arc<LoadedModule>>>,
    failures: RwLock<BTreeMap<PathBuf, LoadFailure>>,
    compiled: AtomicU64,
    cache_hits: AtomicU64,
    events: broadcast::Sender<ReloadEvent>,
    /// One permit per run the engine's instance pool holds.
    instances: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for ModuleHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleHost")
            .field("modules", &self.module_ids())
            .finish_non_exhaustive()
    }
}

impl ModuleHost {
    /// A host with no modules yet, whose plugins get WASI and modrun's
    /// `host` interface.
    pub fn new(config: HostConfig) -> Result<ModuleHost> {
        ModuleHost::with_host_functions(config, &HostFunctions::new())
    }

    /// A host with no modules yet, whose plugins also get the
    /// application's own `functions`. Plugins that do not import them
    /// load as with [`new`](Self::new).
    pub fn with_host_functions(
        config: HostConfig,
        functions: &HostFunctions,
    ) -> Result<ModuleHost> {
        let (engine, ticker) = new_engine(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| super::filesystem::guard(&mut linker))
            .and_then(|()| Module::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s))
            .map_err(|e| Error::Engine(format!("cannot link the host functions: {e:#}")))?;
        functions.link(&mut linker)?;
        if let Some(cache) = &config.cache_dir {
            prepare_cache_dir(cache)?;
        }
        let max_instances = config.max_instances as usize;
        let engine_key = {
            let mut hasher = std::hash::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            env!("CARGO_PKG_VERSION").hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        };
        Ok(ModuleHost {
            inner: Arc::new(HostInner {
                engine,
                ticker,
                engine_key,
                linker,
                linked: functions.interfaces().map(str::to_owned).collect(),
                config,
                modules: RwLock::new(HashMap::new()),
                failures: RwLock::new(BTreeMap::new()),
                compiled: AtomicU64::new(0),
                cache_hits: AtomicU64::new(0),
                events: broadcast::channel(1024).0,
                instances: Arc::new(tokio::sync::Semaphore::new(max_instances)),
            }),
        })
    }

    /// How many components this host compiled, and how many it took from
    /// its cache instead.
    #[must_use]
    pub fn compile_stats(&self) -> CompileStats {
        CompileStats {
            compiled: self.inner.compiled.load(Ordering::Relaxed),
            cache_hits: self.inner.cache_hits.load(Ordering::Relaxed),
        }
    }

    /// A stream of what every (re)load does, from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<ReloadEvent> {
        self.inner.events.subscribe()
    }

    fn publish(&self, event: ReloadEvent) {
        let _ = self.inner.events.send(event);
    }

    /// The host's configuration.
    #[must_use]
    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// A fresh store for guest code, over `state`: held to its memory
    /// limit, yielding at every epoch tick (so that a timeout and a cancel
    /// act even while the guest spins without calling the host), and
    /// keeping the epoch ticking for as long as it lives.
    pub(crate) fn store(&self, mut state: HostState) -> Store<HostState> {
        state.ticking = Some(self.inner.ticker.ticking());
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|_| Ok(wasmtime::UpdateDeadline::Yield(1)));
        store.set_epoch_deadline(1);
        store
    }

    /// The permits of the engine's instance pool: a run holds one while it
    /// executes (loading a module does not need one; the pool keeps room
    /// for that beside [`HostConfig::max_instances`]).
    pub(crate) fn instance_pool(&self) -> Arc<tokio::sync::Semaphore> {
        self.inner.instances.clone()
    }

    /// Loads every `*.wasm` file in `dir`, compiling them in parallel off the
    /// async threads. A file that fails is reported and skipped; the others
    /// load.
    pub async fn load_dir(&self, dir: &Path) -> Result<LoadReport> {
        self.check_cache_outside(dir)?;
        let files = component_files(dir).map_err(|e| Error::PluginsDir {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
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
                Err(error) => report.failed.push(LoadFailure::new(&path, &error)),
            }
        }
        Ok(report)
    }

    /// Loads one module from a plugins directory, `<dir>/<module_id>.wasm`,
    /// and nothing else: what a command that runs one module needs.
    pub async fn load_module(&self, dir: &Path, module_id: &str) -> Result<ModuleSummary> {
        let module_id = ModuleId::new(module_id)?;
        self.check_cache_outside(dir)?;
        self.load_file(&dir.join(module_id.file_name())).await
    }

    /// Loads (or reloads) one component file, and makes it the current
    /// version of its module. On failure the module's previous version, if
    /// any, stays current and the failure is listed in [`failures`](Self::failures).
    pub async fn load_file(&self, path: &Path) -> Result<ModuleSummary> {
        let result = self.load(path).await;
        let mut failures = self.inner.failures.write_unpoisoned();
        match result {
            Ok(loaded) => {
                failures.remove(path);
                drop(failures);
                let summary = loaded.summary.clone();
                let mut modules = self.inner.modules.write_unpoisoned();
                if let Some(current) = modules.get(&summary.info.id).map(|m| &m.summary)
                    && current.content_hash == summary.content_hash
                    && current.manifest == summary.manifest
                    && current.path == summary.path
                {
                    // Touched, not changed: the running version stays, as it was.
                    return Ok(current.clone());
                }
                tracing::info!(
                    module_id = %summary.info.id,
                    version = %summary.content_hash,
                    path = %path.display(),
                    "module loaded"
                );
                modules.insert(summary.info.id.clone(), Arc::new(loaded));
                drop(modules);
                self.publish(ReloadEvent::Loaded {
                    module_id: summary.info.id.clone(),
                    content_hash: summary.content_hash.clone(),
                });
                Ok(summary)
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "module not loaded");
                failures.insert(path.to_path_buf(), LoadFailure::new(path, &error));
                drop(failures);
                self.publish(ReloadEvent::Failed {
                    path: path.to_path_buf(),
                    error: error.to_string(),
                });
                Err(error)
            }
        }
    }

    async fn load(&self, path: &Path) -> Result<LoadedModule> {
        let fail = |cause: LoadError| Error::ModuleLoad {
            path: path.to_path_buf(),
            cause,
        };
        let id = module_id_of(path).map_err(fail)?;
        let manifest = Manifest::for_component(
            path,
            &self.inner.config.default_limits,
            self.inner.config.memory_ceiling,
        )
        .map_err(|e| fail(LoadError::Manifest(e)))?;
        let host = self.clone();
        let file = path.to_path_buf();
        let follow_symlink = manifest.component.allow_symlink;
        let (component, content_hash, modified) =
            tokio::task::spawn_blocking(move || host.compile(&file, follow_symlink))
                .await
                .map_err(|e| fail(LoadError::Stopped(e.to_string())))?
                .map_err(fail)?;
        let mut loaded = self
            .finish(path, id, manifest, &component, content_hash)
            .await
            .map_err(fail)?;
        loaded.modified = modified;
        Ok(loaded)
    }

    /// The compiled component's module: instantiable with this host's
    /// imports, and describing itself as module `id`.
    async fn finish(
        &self,
        path: &Path,
        id: String,
        manifest: Manifest,
        component: &Component,
        content_hash: String,
    ) -> std::result::Result<LoadedModule, LoadError> {
        let pre = self
            .inner
            .linker
            .instantiate_pre(component)
            .map_err(|e| unlinked(e, &self.inner.linked))?;
        let pre = ModulePre::new(pre).map_err(LoadError::NotAModule)?;
        let info = self.describe(&pre, &manifest).await?;
        check_lengths(&info)?;
        if info.id != id {
            return Err(LoadError::IdMismatch {
                described: info.id,
                file: id,
            });
        }
        let schema: Value = serde_json::from_str(&info.parameters_schema)
            .map_err(|e| LoadError::Schema(format!("is not JSON: {e}")))?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| LoadError::Schema(format!("is not a valid JSON Schema: {e}")))?;
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
                last_error: None,
                published_by: None,
            },
            modified: None,
            pre,
            validator,
        })
    }

    /// The component bytes of a loaded module, read again from its file;
    /// an error if the file no longer holds that version.
    pub(crate) async fn version_bytes(&self, module: &LoadedModule) -> Result<Vec<u8>> {
        let summary = &module.summary;
        let (path, max) = (summary.path.clone(), self.inner.config.max_module_bytes);
        let follow_symlink = summary.manifest.component.allow_symlink;
        let fail = |cause: LoadError| Error::ModuleLoad {
            path: summary.path.clone(),
            cause,
        };
        let bytes = tokio::task::spawn_blocking(move || {
            super::plugin_file::read_regular(&path, max, follow_symlink)
        })
        .await
        .map_err(|e| fail(LoadError::Stopped(e.to_string())))?
        .map_err(|e| fail(e.into()))?;
        if format!("sha256:{}", sha256_hex(&bytes)) != summary.content_hash {
            return Err(fail(LoadError::Version {
                version: summary.content_hash.clone(),
                reason: "the file changed since this version was loaded".into(),
            }));
        }
        Ok(bytes)
    }

    /// Another version of a loaded module, from its component bytes (as
    /// another node stored them): checked against `content_hash` and the
    /// size limit, compiled (or taken from the cache by its hash), and run
    /// under this node's manifest for the module, whose grants and limits
    /// stay this node's to decide. It must describe itself as the module.
    pub(crate) async fn load_version(
        &self,
        module_id: &str,
        content_hash: &str,
        bytes: Vec<u8>,
    ) -> Result<LoadedModule> {
        let current = self
            .get(module_id)
            .ok_or_else(|| Error::UnknownModule(module_id.to_owned()))?;
        let path = current.summary.path.clone();
        let fail = |cause: LoadError| Error::ModuleLoad {
            path: path.clone(),
            cause,
        };
        let version = |reason: String| {
            fail(LoadError::Version {
                version: content_hash.to_owned(),
                reason,
            })
        };
        if bytes.len() as u64 > self.inner.config.max_module_bytes {
            return Err(version(format!(
                "it is {} bytes, over the limit of {}",
                bytes.len(),
                self.inner.config.max_module_bytes
            )));
        }
        let digest = sha256_hex(&bytes);
        if format!("sha256:{digest}") != content_hash {
            return Err(version(format!(
                "the bytes stored for it hash to sha256:{digest}"
            )));
        }
        check_component(&bytes).map_err(fail)?;
        let host = self.clone();
        let component = tokio::task::spawn_blocking(move || host.component(&bytes, &digest))
            .await
            .map_err(|e| fail(LoadError::Stopped(e.to_string())))?
            .map_err(fail)?;
        let mut loaded = self
            .finish(
                &path,
                module_id.to_owned(),
                current.summary.manifest.clone(),
                &component,
                content_hash.to_owned(),
            )
            .await
            .map_err(fail)?;
        loaded.summary.loaded_at = Utc::now();
        Ok(loaded)
    }

    /// Makes `version` (from [`load_version`](Self::load_version)), which
    /// node `node` published for every node to run, its module's current
    /// version in place of `replaced`. Changes nothing if the current
    /// version is no longer `replaced` (the file was reloaded meanwhile:
    /// the next look at the heads decides again).
    pub(crate) fn adopt(&self, replaced: &str, mut version: LoadedModule, node: &str) {
        version.summary.published_by = Some(node.to_owned());
        let summary = version.summary.clone();
        let mut modules = self.inner.modules.write_unpoisoned();
        let current = modules.get(&summary.info.id);
        if current.is_none_or(|current| current.summary.content_hash != replaced) {
            return;
        }
        tracing::info!(
            module_id = %summary.info.id,
            version = %summary.content_hash,
            published_by = node,
            "module version published by another node loaded"
        );
        modules.insert(summary.info.id.clone(), Arc::new(version));
        drop(modules);
        self.inner.failures.write_unpoisoned().remove(&summary.path);
        self.publish(ReloadEvent::Loaded {
            module_id: summary.info.id,
            content_hash: summary.content_hash,
        });
    }

    /// Records that a version of loaded module `module_id` that another
    /// node published could not be run here, and why: the module's
    /// [`last_error`](ModuleSummary::last_error) until a version loads.
    pub(crate) fn version_failed(&self, module_id: &str, error: &Error) {
        if let Some(current) = self.get(module_id) {
            let path = current.summary.path.clone();
            let failure = LoadFailure::new(&path, error);
            self.inner.failures.write_unpoisoned().insert(path, failure);
        }
    }

    /// Reads, checks and compiles a component file; with its content hash
    /// and when it had last been modified before it was read (a file
    /// written meanwhile is loaded again at its change). Blocking:
    /// CPU-heavy.
    fn compile(
        &self,
        path: &Path,
        follow_symlink: bool,
    ) -> std::result::Result<(Component, String, Option<DateTime<Utc>>), LoadError> {
        let max = self.inner.config.max_module_bytes;
        let modified = std::fs::metadata(path)
            .and_then(|metadata| metadata.modified())
            .ok()
            .map(DateTime::<Utc>::from);
        let bytes =
            super::plugin_file::read_regular(path, max, follow_symlink).map_err(LoadError::from)?;
        check_component(&bytes)?;
        let digest = sha256_hex(&bytes);
        let component = self.component(&bytes, &digest)?;
        Ok((component, format!("sha256:{digest}"), modified))
    }

    /// The compiled component for `bytes`: from the cache when it holds
    /// this content compiled by this engine, else compiled (and cached).
    fn component(&self, bytes: &[u8], digest: &str) -> std::result::Result<Component, LoadError> {
        let cached = self
            .inner
            .config
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{digest}-{}.cwasm", self.inner.engine_key)));
        if let Some(file) = cached.as_ref().filter(|file| file.is_file()) {
            // Read, not mapped: a file changed under a mapping would crash
            // the host (SIGBUS) the next time a run executes that code.
            let loaded = std::fs::read(file)
                .map_err(|e| e.to_string())
                .and_then(|code| {
                    // SAFETY: deserializing runs the bytes as machine code. Only
                    // `store_in_cache` writes this directory, with what this
                    // engine compiled; it is never the plugins directory
                    // (checked in `load_dir`) and is created private to this user.
                    unsafe { Component::deserialize(&self.inner.engine, &code) }
                        .map_err(|e| format!("{e:#}"))
                });
            match loaded {
                Ok(component) => {
                    self.inner.cache_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(component);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "dropping an unusable cache entry");
                    let _ = std::fs::remove_file(file);
                }
            }
        }
        let component = Component::new(&self.inner.engine, bytes).map_err(LoadError::Invalid)?;
        self.inner.compiled.fetch_add(1, Ordering::Relaxed);
        if let Some(file) = &cached
            && let Err(e) = store_in_cache(&component, file)
        {
            tracing::warn!(file = %file.display(), error = %e, "cannot cache a compiled module");
        }
        Ok(component)
    }

    /// Refuses a plugins directory that holds the cache: whoever can write
    /// plugins must not be able to plant machine code.
    fn check_cache_outside(&self, plugins: &Path) -> Result<()> {
        let Some(cache) = &self.inner.config.cache_dir else {
            return Ok(());
        };
        let (Ok(cache), Ok(plugins)) = (cache.canonicalize(), plugins.canonicalize()) else {
            return Ok(());
        };
        if cache.starts_with(&plugins) {
            return Err(Error::PluginsDir {
                path: plugins,
                message: format!(
                    "it contains the compiled-module cache {}; keep the cache elsewhere",
                    cache.display()
                ),
            });
        }
        Ok(())
    }

    /// Calls `describe` in a fresh, bounded sandbox.
    async fn describe(
        &self,
        pre: &ModulePre<HostState>,
        manifest: &Manifest,
    ) -> std::result::Result<super::bindings::Info, LoadError> {
        let state = HostState::new(
            WasiCtx::builder().build(),
            manifest.limits.memory_bytes,
            None,
        );
        let mut store = self.store(state);
        let call = async {
            let module = pre.instantiate_async(&mut store).await?;
            module
                .modrun_plugin_plugin()
                .call_describe(&mut store)
                .await
        };
        match tokio::time::timeout(DESCRIBE_TIMEOUT, call).await {
            Err(_) => Err(LoadError::DescribeTimedOut(DESCRIBE_TIMEOUT)),
            Ok(Err(e)) => Err(LoadError::DescribeFailed(e)),
            Ok(Ok(info)) => Ok(info),
        }
    }

    /// The current version of a module, if loaded.
    pub(crate) fn get(&self, module_id: &str) -> Option<Arc<LoadedModule>> {
        self.inner.modules.read_unpoisoned().get(module_id).cloned()
    }

    /// One loaded module.
    #[must_use]
    pub fn module(&self, module_id: &str) -> Option<ModuleSummary> {
        self.get(module_id)
            .map(|module| self.with_last_error(&module.summary))
    }

    /// Every loaded module, by id.
    #[must_use]
    pub fn modules(&self) -> Vec<ModuleSummary> {
        let modules = self.inner.modules.read_unpoisoned();
        let mut summaries: Vec<_> = modules
            .values()
            .map(|m| self.with_last_error(&m.summary))
            .collect();
        summaries.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        summaries
    }

    fn with_last_error(&self, summary: &ModuleSummary) -> ModuleSummary {
        let failures = self.inner.failures.read_unpoisoned();
        let mut summary = summary.clone();
        summary.last_error = failures.get(&summary.path).cloned();
        summary
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
            .read_unpoisoned()
            .values()
            .cloned()
            .collect()
    }

    /// Stops offering a module for new runs (runs in flight finish).
    /// Returns whether it was loaded.
    pub fn retire(&self, module_id: &str) -> bool {
        let retired = self
            .inner
            .modules
            .write_unpoisoned()
            .remove(module_id)
            .is_some();
        if retired {
            tracing::info!(module_id, "module retired");
            self.publish(ReloadEvent::Retired {
                module_id: module_id.to_owned(),
            });
        }
        retired
    }

    /// Brings module `id` of `dir` up to date with the files there: loads
    /// `<id>.wasm` if present (a failure keeps the previous version), or
    /// retires the module if its file is gone.
    pub async fn refresh(&self, dir: &Path, id: &str) {
        let wasm = dir.join(format!("{id}.wasm"));
        if wasm.is_file() {
            let _ = self.load_file(&wasm).await;
            return;
        }
        self.inner.failures.write_unpoisoned().remove(&wasm);
        let from_here = self.get(id).is_some_and(|m| m.summary.path == wasm);
        if from_here {
            self.retire(id);
        }
    }
}

/// Creates the cache directory, private to this user.
fn prepare_cache_dir(dir: &Path) -> Result<()> {
    let fail = |source: std::io::Error| Error::CacheDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    }
    Ok(())
}

/// Writes a compiled component into the cache: whole or not at all.
fn store_in_cache(component: &Component, file: &Path) -> std::result::Result<(), String> {
    let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
    let partial = file.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&partial, bytes).map_err(|e| e.to_string())?;
    std::fs::rename(&partial, file).map_err(|e| e.to_string())
}

/// The module id a component file is named for.
fn module_id_of(path: &Path) -> std::result::Result<String, LoadError> {
    let stem = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .ok_or_else(|| LoadError::FileName("its file name is not valid text".into()))?;
    ModuleId::new(stem)
        .map(String::from)
        .map_err(|e| LoadError::FileName(e.to_string()))
}

/// The SHA-256 of `bytes`, in hex: a component's content hash after `sha256:`.
fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Whether `bytes` look like a WebAssembly component (and not a core
/// module), in words when they do not.
fn check_component(bytes: &[u8]) -> std::result::Result<(), LoadError> {
    if bytes.len() < 8 || !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm);
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

/// Why the linker could not resolve a component's imports: an interface
/// the host does not provide (named), or any other mismatch. `linked`: the
/// application's own interfaces.
fn unlinked(error: wasmtime::Error, linked: &[String]) -> LoadError {
    // The linker names the import it could not satisfy in the context it
    // adds: "component imports instance `acme:app/kv`, but a matching…".
    let messages: Vec<String> = error.chain().map(ToString::to_string).collect();
    let named = messages.iter().enumerate().find_map(|(at, text)| {
        let rest = text.strip_prefix("component imports ")?;
        let (_, rest) = rest.split_once('`')?;
        let (name, _) = rest.split_once('`')?;
        Some((at, name.to_owned()))
    });
    match named {
        Some((at, interface)) => {
            let provided = is_modruns_own(&interface) || linked.contains(&interface);
            let reason = if provided {
                messages[at + 1..].join(": ")
            } else {
                "the application links no such interface".to_owned()
            };
            LoadError::MissingImport {
                interface,
                reason,
                source: error,
            }
        }
        None => LoadError::NotAModule(error),
    }
}

/// The component files of a plugins directory (`*.wasm`), in name order:
/// regular files and links (which a load accepts only where the manifest
/// allows); never a directory, a FIFO or a device.
pub fn component_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(std::result::Result::ok)
        .filter(|entry| {
            entry
                .file_type()
                .is_ok_and(|kind| kind.is_file() || kind.is_symlink())
        })
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm"))
        .collect();
    files.sort();
    Ok(files)
}

/// The most bytes of each field a module describes: what every run of it
/// records, and every listing of modules shows.
const DESCRIBED_MAX: [(&str, usize); 5] = [
    ("an id", ModuleId::MAX_LEN),
    ("a name", 200),
    ("a version", 100),
    ("a description", 4 << 10),
    ("a parameters schema", 256 << 10),
];

/// Refuses a module whose `describe` returned a field longer than
/// [`DESCRIBED_MAX`] allows.
fn check_lengths(info: &super::bindings::Info) -> std::result::Result<(), LoadError> {
    let lengths = [
        info.id.len(),
        info.name.len(),
        info.version.len(),
        info.description.len(),
        info.parameters_schema.len(),
    ];
    for ((field, max), bytes) in DESCRIBED_MAX.into_iter().zip(lengths) {
        if bytes > max {
            return Err(LoadError::DescribedTooLong { field, bytes, max });
        }
    }
    Ok(())
}
