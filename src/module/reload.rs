//! Hot reload: watches a plugins directory and keeps the host's modules in
//! step with its files. Runs in flight keep the version they started with
//! (they hold it); new runs get the new one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use super::loader::ModuleHost;
use crate::error::{Error, Result};

/// How long a changed file must be quiet before it is reloaded: long enough
/// for a build tool or an editor to finish writing, short enough to feel live.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches a plugins directory for as long as it lives.
pub struct Reloader {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ModuleHost {
    /// Keeps the modules of `dir` up to date until the returned [`Reloader`]
    /// is dropped: a component written or renamed into place is (re)loaded
    /// once its file has been quiet for `debounce`; a deleted one is
    /// retired; a manifest change reloads its module. Hidden, backup and
    /// partial files are ignored. Call from within a tokio runtime.
    pub fn watch(&self, dir: &Path, debounce: Duration) -> Result<Reloader> {
        self.watch_with(dir, debounce, None)
    }

    /// [`watch`](Self::watch), watching the whole tree under `dir` with the
    /// same one watcher: changes to anything but the modules' components
    /// and manifests (plugin sources, say) are handed to `others`, a batch
    /// of paths at a time, on the watcher's task (so it must not block).
    /// What `modrun dev` builds on.
    pub fn watch_tree(
        &self,
        dir: &Path,
        debounce: Duration,
        others: impl Fn(Vec<PathBuf>) + Send + Sync + 'static,
    ) -> Result<Reloader> {
        self.watch_with(dir, debounce, Some(Box::new(others)))
    }

    fn watch_with(
        &self,
        dir: &Path,
        debounce: Duration,
        others: Option<OtherChanges>,
    ) -> Result<Reloader> {
        let fail = |e: notify::Error| Error::PluginsDir {
            path: dir.to_path_buf(),
            message: format!("cannot watch it: {e}"),
        };
        // Bounded: when the reload task falls behind, the debouncer's own
        // thread waits for it (never a runtime thread: `blocking_send` is
        // safe there), and nothing is dropped.
        let (sender, events) = mpsc::channel(RELOAD_BATCHES);
        let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            let _ = sender.blocking_send(result);
        })
        .map_err(fail)?;
        let mode = if others.is_some() {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        debouncer.watch(dir, mode).map_err(fail)?;
        let task = tokio::spawn(reload_loop(self.clone(), dir.to_path_buf(), events, others));
        Ok(Reloader {
            _debouncer: debouncer,
            task,
        })
    }
}

/// Debounced batches of changes waiting for the reload task, at most.
const RELOAD_BATCHES: usize = 64;

/// Where changes to files that are not modules' go, when anyone wants them.
type OtherChanges = Box<dyn Fn(Vec<PathBuf>) + Send + Sync>;

async fn reload_loop(
    host: ModuleHost,
    dir: PathBuf,
    mut events: mpsc::Receiver<DebounceEventResult>,
    others: Option<OtherChanges>,
) {
    while let Some(first) = events.recv().await {
        // Take everything already waiting: one pass serves them all.
        let mut batch = vec![first];
        while let Ok(more) = events.try_recv() {
            batch.push(more);
        }
        let mut ids = BTreeSet::new();
        let mut other_paths = Vec::new();
        let mut rescan = false;
        for result in batch {
            match result {
                Ok(events) => {
                    for event in events {
                        rescan |= event.need_rescan();
                        if !changes_content(&event.kind) {
                            continue;
                        }
                        for path in &event.paths {
                            match module_file_id(path).filter(|_| path.parent() == Some(&dir)) {
                                Some(id) => {
                                    ids.insert(id);
                                }
                                None => other_paths.push(path.clone()),
                            }
                        }
                    }
                }
                Err(errors) => {
                    for error in errors {
                        tracing::warn!(dir = %dir.display(), %error, "watching plugins");
                    }
                    rescan = true;
                }
            }
        }
        if rescan {
            // Events were lost: look at everything there is, and was.
            tracing::info!(dir = %dir.display(), "rescanning plugins");
            if let Ok(entries) = std::fs::read_dir(&dir) {
                ids.extend(entries.filter_map(|e| e.ok().and_then(|e| module_file_id(&e.path()))));
            }
            ids.extend(
                host.modules()
                    .into_iter()
                    .filter(|m| m.path.parent() == Some(dir.as_path()))
                    .map(|m| m.info.id),
            );
        }
        for id in ids {
            host.refresh(&dir, &id).await;
        }
        if let Some(others) = &others
            && !other_paths.is_empty()
        {
            others(other_paths);
        }
    }
}

/// Whether a file event can mean new content. Reads (including the host's
/// own, when it loads a file) are not: reacting to them would loop forever.
#[must_use]
pub fn changes_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// The module a changed file belongs to: `<id>.wasm` or `<id>.toml`, not
/// hidden, backup or partial files.
fn module_file_id(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') || name.ends_with('~') {
        return None;
    }
    let (stem, extension) = name.rsplit_once('.')?;
    matches!(extension, "wasm" | "toml").then(|| stem.to_owned())
}

#[cfg(test)]
mod tests {
    use super::module_file_id;
    use std::path::Path;

    #[test]
    fn only_components_and_manifests_count() {
        let id = |name: &str| module_file_id(Path::new("/plugins").join(name).as_path());
        assert_eq!(id("hello.wasm").as_deref(), Some("hello"));
        assert_eq!(id("hello.toml").as_deref(), Some("hello"));
        for ignored in [
            ".hello.wasm.swp",
            "hello.wasm~",
            ".hello.wasm.partial",
            "4913",
            "notes.txt",
            "hello.wasm.tmp",
        ] {
            assert_eq!(id(ignored), None, "{ignored}");
        }
    }
}
