//! Builds plugin sources into components and puts them into a plugins
//! directory as `<id>.wasm`. Each folder of the plugins directory is one
//! plugin source, its language told by what it holds:
//!
//! - `build.toml`: a build command the plugin declares (any language);
//! - `Cargo.toml`: Rust, built with cargo for `wasm32-wasip2` (a member of
//!   the plugins directory's Cargo workspace, or a crate of its own);
//! - `package.json`: JavaScript, built with componentize-js from
//!   `node_modules` (`npm ci` installs it);
//! - `app.py`: Python, built with componentize-py from a virtualenv in the
//!   plugin's folder (`.venv`, made and filled by the build).
//!
//! A folder's module id is its name with `-` read as `_`. Builds are
//! incremental: cargo's own, and for the others a record of what the last
//! build was made from, so an unchanged plugin is not built again.

mod cargo;
mod command;
pub(super) mod javascript;
pub(super) mod python;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The plugin contract modrun hosts, for plugin sources that carry no
/// `wit/` folder of their own.
pub(crate) const PLUGIN_WIT: &str = include_str!("../../../wit/plugin.wit");

/// A component built from a plugin source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuiltPlugin {
    /// The module id (the component's file name, without `.wasm`).
    pub id: String,
    /// The language of its source.
    pub language: Language,
    /// Where it was put.
    pub path: PathBuf,
    /// Whether its content changed (a new or rebuilt module).
    pub changed: bool,
}

/// The language a plugin source is written in, as its folder tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// A cargo crate (`Cargo.toml`).
    Rust,
    /// A Python app (`app.py`), built with componentize-py.
    Python,
    /// A JavaScript package (`package.json`), built with componentize-js.
    #[serde(rename = "js")]
    JavaScript,
    /// A build command the plugin declares (`build.toml`).
    Command,
}

impl Language {
    /// Its name in commands and listings: `rust`, `python`, `js`, `command`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::JavaScript => "js",
            Language::Command => "command",
        }
    }
}

impl std::fmt::Display for Language {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Language {
    type Err = String;

    /// `rust`, `python` (or `py`), `js` (or `javascript`); a declared
    /// command is no language one picks.
    fn from_str(name: &str) -> std::result::Result<Language, String> {
        match name {
            "rust" => Ok(Language::Rust),
            "python" | "py" => Ok(Language::Python),
            "js" | "javascript" => Ok(Language::JavaScript),
            other => Err(format!(
                "{other:?} is not a plugin language: rust, python or js"
            )),
        }
    }
}

/// One plugin source: a folder of the plugins directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PluginSource {
    /// The module id its component gets.
    pub id: String,
    /// Its folder.
    pub dir: PathBuf,
    /// Its language.
    pub language: Language,
}

impl PluginSource {
    /// The newest modification time of its source files (build output,
    /// installed toolchains and hidden files aside).
    #[must_use]
    pub fn newest_change(&self) -> Option<SystemTime> {
        let mut newest = None;
        for file in source_files(&self.dir) {
            let changed = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
            newest = newest.max(changed);
        }
        newest
    }
}

/// The plugin sources of `plugins`, by id. Folders that hold none, and
/// folders whose name is no module id, are not sources.
#[must_use]
pub fn plugin_sources(plugins: &Path) -> Vec<PluginSource> {
    let mut sources: Vec<PluginSource> = std::fs::read_dir(plugins)
        .into_iter()
        .flatten()
        .filter_map(std::result::Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|entry| {
            let dir = entry.path();
            let name = entry.file_name().to_str()?.to_owned();
            if is_ignored(&name) {
                return None;
            }
            let language = detect(&dir)?;
            let id = name.replace('-', "_");
            super::ModuleId::is_valid(&id).then_some(PluginSource { id, dir, language })
        })
        .collect();
    sources.sort_by(|a, b| a.id.cmp(&b.id));
    sources
}

/// A folder's language, from what it holds; a declared command wins.
fn detect(dir: &Path) -> Option<Language> {
    [
        ("build.toml", Language::Command),
        ("Cargo.toml", Language::Rust),
        ("package.json", Language::JavaScript),
        ("app.py", Language::Python),
    ]
    .into_iter()
    .find(|(file, _)| dir.join(file).is_file())
    .map(|(_, language)| language)
}

/// What is never source: build output, installed toolchains and packages,
/// caches, anything hidden, and documentation (`*.md`: a changed README
/// builds nothing).
pub(crate) fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with(".md")
        || ["target", "node_modules", "__pycache__"].contains(&name)
}

/// The source files under `dir`, sorted, build output and toolchains aside.
pub(crate) fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder)
            .into_iter()
            .flatten()
            .filter_map(std::result::Result::ok)
        {
            if entry.file_name().to_str().is_none_or(is_ignored) {
                continue;
            }
            match entry.file_type() {
                Ok(kind) if kind.is_dir() => pending.push(entry.path()),
                Ok(kind) if kind.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files.sort();
    files
}

/// Whether `path` is a plugin source file of the plugins directory
/// `plugins`: a file in a plugin's folder (build output, toolchains and
/// hidden files aside), or the plugins workspace's `Cargo.toml`.
#[must_use]
pub fn is_source_path(plugins: &Path, path: &Path) -> bool {
    let Ok(relative) = path.strip_prefix(plugins) else {
        return false;
    };
    let parts: Vec<&str> = relative
        .components()
        .filter_map(|part| part.as_os_str().to_str())
        .collect();
    match parts.as_slice() {
        [file] => *file == "Cargo.toml",
        [folder, rest @ ..] => {
            !rest.is_empty()
                && !parts.iter().any(|part| is_ignored(part))
                && detect(&plugins.join(folder)).is_some()
        }
        [] => false,
    }
}

/// Builds every plugin source of `plugins`, with build files in
/// `target_dir`, and places each component in `out_dir` as `<id>.wasm` —
/// by an atomic rename, so a watcher never sees half a file. Unchanged
/// components are left untouched, and unchanged sources are not built
/// again. Missing guest toolchains are installed where the language has a
/// project-local place for them.
///
/// Every source is built even when one fails; then the error names each
/// failure, readable, with the command that fixes a missing toolchain.
pub fn build_plugins(
    plugins: &Path,
    target_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<BuiltPlugin>> {
    let sources = plugin_sources(plugins);
    if sources.is_empty() && !plugins.join("Cargo.toml").is_file() {
        return Err(Error::Build(format!(
            "{} holds no plugin sources: a plugin is a folder with a Cargo.toml, a package.json, \
             an app.py or a build.toml (`modrun new NAME --lang rust|python|js` makes one)",
            plugins.display()
        )));
    }
    build_sources(plugins, &sources, target_dir, out_dir)
}

/// Builds the plugin source of module `id` only (for a member of the
/// plugins Cargo workspace, the workspace: cargo builds what changed), as
/// [`build_plugins`] does.
pub fn build_plugin(
    plugins: &Path,
    id: &str,
    target_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<BuiltPlugin>> {
    let sources: Vec<PluginSource> = plugin_sources(plugins)
        .into_iter()
        .filter(|source| source.id == id)
        .collect();
    if sources.is_empty() {
        return Err(Error::Build(format!(
            "{} holds no plugin source for module {id}",
            plugins.display()
        )));
    }
    build_sources(plugins, &sources, target_dir, out_dir)
}

fn build_sources(
    plugins: &Path,
    sources: &[PluginSource],
    target_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<BuiltPlugin>> {
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::Build(format!("cannot create {}: {e}", out_dir.display())))?;
    let mut built = Vec::new();
    let mut failures = Vec::new();
    let (members, others): (Vec<&PluginSource>, Vec<&PluginSource>) =
        sources.iter().partition(|source| {
            source.language == Language::Rust && cargo::in_workspace(plugins, source)
        });
    if !members.is_empty() || (sources.is_empty() && plugins.join("Cargo.toml").is_file()) {
        match cargo::build(&plugins.join("Cargo.toml"), target_dir, out_dir) {
            Ok(components) => built.extend(components),
            Err(Error::Build(e)) => failures.push(e),
            Err(e) => failures.push(e.to_string()),
        }
    }
    for source in others {
        let result = match source.language {
            Language::Rust => cargo::build(&source.dir.join("Cargo.toml"), target_dir, out_dir),
            Language::Python | Language::JavaScript | Language::Command => {
                build_guest(source, target_dir, out_dir).map(|component| vec![component])
            }
        };
        match result {
            Ok(components) => built.extend(components),
            Err(Error::Build(e)) => {
                failures.push(format!("{} ({}): {e}", source.id, source.language))
            }
            Err(e) => failures.push(format!("{} ({}): {e}", source.id, source.language)),
        }
    }
    if !failures.is_empty() {
        return Err(Error::Build(failures.join("\n\n")));
    }
    built.sort_by(|a, b| a.id.cmp(&b.id));
    built.dedup_by(|a, b| a.id == b.id);
    Ok(built)
}

/// Builds a Python, JavaScript or declared-command plugin, unless what it
/// is made from is what the component in `out_dir` was last built from.
fn build_guest(source: &PluginSource, target_dir: &Path, out_dir: &Path) -> Result<BuiltPlugin> {
    // The tools run in the plugin's folder: every path they get is absolute.
    let absolute = |path: &Path| {
        std::path::absolute(path)
            .map_err(|e| Error::Build(format!("cannot resolve {}: {e}", path.display())))
    };
    let source = &PluginSource {
        dir: absolute(&source.dir)?,
        ..source.clone()
    };
    let shown = out_dir.join(format!("{}.wasm", source.id));
    let (target_dir, out_dir) = (&absolute(target_dir)?, &absolute(out_dir)?);
    let work = target_dir.join("modrun-build");
    std::fs::create_dir_all(&work)
        .map_err(|e| Error::Build(format!("cannot create {}: {e}", work.display())))?;
    let wit = contract_dir(&source.dir, &work)?;
    // Toolchains first: an install may write a lock file among the sources.
    match source.language {
        Language::Python => python::prepare(source)?,
        Language::JavaScript => javascript::prepare(source)?,
        Language::Command => command::prepare(source)?,
        Language::Rust => unreachable!("cargo builds Rust plugins"),
    }
    let inputs = inputs_digest(source, &wit);
    let stamp = work.join(format!("{}.stamp", source.id));
    let component = out_dir.join(format!("{}.wasm", source.id));
    if let (Ok(recorded), Ok(current)) =
        (std::fs::read_to_string(&stamp), std::fs::read(&component))
        && recorded == format!("{inputs} {}", hex(&Sha256::digest(&current)))
    {
        return Ok(BuiltPlugin {
            id: source.id.clone(),
            language: source.language,
            path: shown,
            changed: false,
        });
    }
    let output = work.join(format!("{}.wasm", source.id));
    let _ = std::fs::remove_file(&output);
    match source.language {
        Language::Python => python::build(source, &wit, &output)?,
        Language::JavaScript => javascript::build(source, &wit, &output)?,
        Language::Command => command::build(source, &wit, &output)?,
        Language::Rust => unreachable!("cargo builds Rust plugins"),
    }
    let placed = place(&output, &source.id, source.language, out_dir)?;
    let bytes = std::fs::read(&placed.path)
        .map_err(|e| Error::Build(format!("cannot read {}: {e}", placed.path.display())))?;
    let _ = std::fs::write(&stamp, format!("{inputs} {}", hex(&Sha256::digest(&bytes))));
    Ok(BuiltPlugin {
        path: shown,
        ..placed
    })
}

/// The WIT folder a plugin is built against: its own `wit/`, or the
/// contract this modrun hosts, written into `work`.
fn contract_dir(dir: &Path, work: &Path) -> Result<PathBuf> {
    let own = dir.join("wit");
    if own.is_dir() {
        return Ok(own);
    }
    let hosted = work.join("wit");
    let file = hosted.join("plugin.wit");
    if std::fs::read_to_string(&file).ok().as_deref() != Some(PLUGIN_WIT) {
        std::fs::create_dir_all(&hosted)
            .and_then(|()| std::fs::write(&file, PLUGIN_WIT))
            .map_err(|e| Error::Build(format!("cannot write {}: {e}", file.display())))?;
    }
    Ok(hosted)
}

/// A digest of everything a guest build is made from: its source files
/// (names and contents), the contract, and the language; a declared
/// build's own output aside.
fn inputs_digest(source: &PluginSource, wit: &Path) -> String {
    let output = match source.language {
        Language::Command => command::output_of(source),
        _ => None,
    };
    let mut digest = Sha256::new();
    digest.update(source.language.name());
    for root in [source.dir.as_path(), wit] {
        for file in source_files(root) {
            if output.as_deref() == Some(file.as_path()) {
                continue;
            }
            let name = file.strip_prefix(root).unwrap_or(&file);
            digest.update(name.to_string_lossy().as_bytes());
            digest.update([0]);
            digest.update(std::fs::read(&file).unwrap_or_default());
            digest.update([0]);
        }
    }
    hex(&digest.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies a built component into `out_dir` as `<id>.wasm` unless it is
/// already there.
fn place(artifact: &Path, id: &str, language: Language, out_dir: &Path) -> Result<BuiltPlugin> {
    let fail =
        |e: std::io::Error| Error::Build(format!("cannot place {}: {e}", artifact.display()));
    let path = out_dir.join(format!("{id}.wasm"));
    let bytes = std::fs::read(artifact).map_err(fail)?;
    let changed = std::fs::read(&path).map_or(true, |old| old != bytes);
    if changed {
        let partial = out_dir.join(format!(".{id}.wasm.partial"));
        std::fs::write(&partial, &bytes).map_err(fail)?;
        std::fs::rename(&partial, &path).map_err(fail)?;
    }
    Ok(BuiltPlugin {
        id: id.to_owned(),
        language,
        path,
        changed,
    })
}

/// Runs a build step, its output captured. `what` names the program for
/// the error when it cannot be started, and `missing` says how to get it.
fn run_step(command: &mut Command, what: &str, missing: &str) -> Result<Output> {
    command
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::Build(format!("{what} was not found: {missing}"))
            }
            _ => Error::Build(format!("cannot run {what}: {e}")),
        })
}

/// What a failed step printed, readable: standard error (or output when
/// that is empty), without the backtraces of the tool itself, at most its
/// last 60 lines.
fn step_errors(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    if let Some(at) = text.find("\nStack backtrace:") {
        text.truncate(at);
    }
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let tail = lines.len().saturating_sub(60);
    lines[tail..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::{Language, is_source_path, plugin_sources};

    #[test]
    fn sources_are_the_files_of_plugin_folders() {
        let root = tempfile::tempdir().unwrap();
        let plugins = root.path();
        for (file, text) in [
            ("Cargo.toml", "[workspace]"),
            ("hello/Cargo.toml", "[package]"),
            ("hello/src/lib.rs", ""),
            ("greet-py/app.py", ""),
            ("greet-js/package.json", "{}"),
            ("made/build.toml", ""),
            ("made/Cargo.toml", ""),
            ("notes/todo.txt", ""),
            ("Bad Name/app.py", ""),
        ] {
            let path = plugins.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let found: Vec<(String, Language)> = plugin_sources(plugins)
            .into_iter()
            .map(|source| (source.id, source.language))
            .collect();
        assert_eq!(
            found,
            [
                ("greet_js".to_owned(), Language::JavaScript),
                ("greet_py".to_owned(), Language::Python),
                ("hello".to_owned(), Language::Rust),
                ("made".to_owned(), Language::Command),
            ]
        );
        let source = |p: &str| is_source_path(plugins, &plugins.join(p));
        assert!(source("hello/src/lib.rs"));
        assert!(source("hello/src/deep/mod.rs"));
        assert!(source("hello/Cargo.toml"));
        assert!(source("greet-py/app.py"));
        assert!(source("greet-py/lib/util.py"));
        assert!(source("greet-js/app.js"));
        assert!(source("Cargo.toml"));
        assert!(!source("hello.wasm"));
        assert!(!source("hello.toml"));
        assert!(!source("target/wasm32-wasip2/release/hello.wasm"));
        assert!(!source("hello/README.md"));
        assert!(!source("greet-py/.venv/bin/python"));
        assert!(!source("greet-py/__pycache__/app.pyc"));
        assert!(!source("greet-js/node_modules/x/index.js"));
        assert!(!source("greet-js/.modrun-entry.js"));
        assert!(!source("notes/todo.txt"));
    }
}
