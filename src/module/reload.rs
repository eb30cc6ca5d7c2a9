//! Hot reload: watches a plugins directory and keeps the host's modules in
//! step with its files. Runs in flight keep the version they started with
//! (they hold it); new runs get the new one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::RecursiveMode;
use notify::event::{AccessKind, AccessMode, EventKind};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use super::loader::ModuleHost;
use crate::error::{Error, Result};
use crate::sync::LockUnpoisoned;

/// How long a changed file must be quiet before it is reloaded: long enough
/// for a build tool or an editor to finish writing, short enough to feel live.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);

/// Watches a plugins directory for as long as it lives.
pub struct Reloader {
    _watcher: Watcher,
    task: tokio::task::JoinHandle<()>,
}

/// The watcher of a plugins directory, shared with the task that watches
/// the folders made in a watched tree.
type Watcher = Arc<Mutex<Debouncer<notify::RecommendedWatcher, RecommendedCache>>>;

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

    /// [`watch`](Self::watch), watching the tree under `dir` with the same
    /// one watcher: changes to anything but the modules' components and
    /// manifests (plugin sources, say) are handed to `others`, a batch of
    /// paths at a time, on the watcher's task (so it must not block); a
    /// folder made in the tree is watched too, and its files handed over.
    /// Build output (`target`), installed packages and toolchains
    /// (`node_modules`, `.venv`), caches and hidden folders are not
    /// watched: the system allows each user a limited number of watched
    /// folders, a `node_modules` alone can have thousands, and a build
    /// writes thousands of files. What `modrun dev` builds on.
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
        let debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| {
            let _ = sender.blocking_send(result);
        })
        .map_err(fail)?;
        let watcher: Watcher = Arc::new(Mutex::new(debouncer));
        let tree = match others {
            Some(others) => {
                watch_folders(&watcher, dir).map_err(fail)?;
                Some((others, watcher.clone()))
            }
            None => {
                watcher
                    .lock_unpoisoned()
                    .watch(dir, RecursiveMode::NonRecursive)
                    .map_err(fail)?;
                None
            }
        };
        let task = tokio::spawn(reload_loop(self.clone(), dir.to_path_buf(), events, tree));
        Ok(Reloader {
            _watcher: watcher,
            task,
        })
    }
}

/// Debounced batches of changes waiting for the reload task, at most.
const RELOAD_BATCHES: usize = 64;

/// Where changes to files that are not modules' go, when anyone wants them.
type OtherChanges = Box<dyn Fn(Vec<PathBuf>) + Send + Sync>;

/// Watches `folder` and every folder under it that is not build output,
/// a toolchain, a cache or hidden, each on its own; answers the files
/// found in them. Links to folders are followed (a plugin folder may be
/// one), each folder watched once however many links lead to it.
fn watch_folders(watcher: &Watcher, folder: &Path) -> notify::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut pending = vec![folder.to_path_buf()];
    while let Some(folder) = pending.pop() {
        if !seen.insert(folder.canonicalize().unwrap_or_else(|_| folder.clone())) {
            continue;
        }
        watcher
            .lock_unpoisoned()
            .watch(&folder, RecursiveMode::NonRecursive)?;
        for entry in std::fs::read_dir(&folder)
            .into_iter()
            .flatten()
            .filter_map(std::result::Result::ok)
        {
            let path = entry.path();
            // A link is what it leads to.
            let is_dir = match entry.file_type() {
                Ok(kind) if kind.is_symlink() => path.is_dir(),
                Ok(kind) => kind.is_dir(),
                Err(_) => continue,
            };
            if is_dir {
                if !left_out(Path::new(&entry.file_name())) {
                    pending.push(path);
                }
            } else if path.is_file() {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// Whether a tree watch leaves out what is at `relative` (a path under
/// the watched folder, or a name in it): it is, or is in, build output, a
/// toolchain, a cache or a hidden folder (see [`ModuleHost::watch_tree`]).
fn left_out(relative: &Path) -> bool {
    relative.components().any(|part| {
        part.as_os_str()
            .to_str()
            .is_none_or(super::build::is_ignored)
    })
}

/// Starts watching a folder made in a watched tree (`root`) and answers
/// its files, which may have been written before the watch began. Not a
/// folder, one left out, or one under a folder left out: nothing.
fn watch_new_folder(watcher: &Watcher, root: &Path, path: &Path) -> Vec<PathBuf> {
    let Ok(relative) = path.strip_prefix(root) else {
        return Vec::new();
    };
    if left_out(relative) || relative.as_os_str().is_empty() || !path.is_dir() {
        return Vec::new();
    }
    match watch_folders(watcher, path) {
        Ok(files) => files,
        Err(error) => {
            tracing::warn!(folder = %path.display(), %error, "cannot watch a new plugin folder; restart to watch it");
            Vec::new()
        }
    }
}

async fn reload_loop(
    host: ModuleHost,
    dir: PathBuf,
    mut events: mpsc::Receiver<DebounceEventResult>,
    tree: Option<(OtherChanges, Watcher)>,
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
                            if let Some((_, watcher)) = &tree {
                                other_paths.extend(watch_new_folder(watcher, &dir, path));
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
            if let Some((_, watcher)) = &tree {
                match watch_folders(watcher, &dir) {
                    Ok(files) => other_paths.extend(files),
                    Err(error) => {
                        tracing::warn!(dir = %dir.display(), %error, "watching plugins");
                    }
                }
            }
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
        if let Some((others, _)) = &tree
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
