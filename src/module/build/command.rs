//! Plugins that declare their own build: a `build.toml` in the plugin's
//! folder names the command and the component it leaves.
//!
//! ```toml
//! command = "make component"   # run by sh in the plugin's folder
//! output = "out/plugin.wasm"   # the component it leaves, in the folder
//! ```
//!
//! The command gets `MODRUN_WIT`, the folder of the plugin contract to build
//! against.

use std::path::{Component, Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::{PluginSource, run_step, step_errors};
use crate::error::{Error, Result};

/// A plugin's `build.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildFile {
    command: String,
    output: PathBuf,
}

/// Reads the plugin's `build.toml`.
fn declared(dir: &Path) -> Result<BuildFile> {
    let path = dir.join("build.toml");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::Build(format!("cannot read {}: {e}", path.display())))?;
    let declared: BuildFile = toml::from_str(&text)
        .map_err(|e| Error::Build(format!("{}: {}", path.display(), e.message())))?;
    let inside = declared
        .output
        .components()
        .all(|part| matches!(part, Component::Normal(_)));
    if declared.command.trim().is_empty() || !inside {
        return Err(Error::Build(format!(
            "{}: `command` must not be empty, and `output` must be a path inside the plugin's \
             folder",
            path.display()
        )));
    }
    Ok(declared)
}

/// Checks the declaration; there is nothing to install.
pub(super) fn prepare(source: &PluginSource) -> Result<()> {
    declared(&source.dir).map(drop)
}

/// The declared output, which the inputs' digest leaves out.
pub(super) fn output_of(source: &PluginSource) -> Option<PathBuf> {
    declared(&source.dir)
        .ok()
        .map(|d| source.dir.join(d.output))
}

/// Runs the declared command and takes its component to `output`.
pub(super) fn build(source: &PluginSource, wit: &Path, output: &Path) -> Result<()> {
    let build = declared(&source.dir)?;
    let made = source.dir.join(&build.output);
    let _ = std::fs::remove_file(&made);
    let ran = run_step(
        Command::new("sh")
            .arg("-c")
            .arg(&build.command)
            .env("MODRUN_WIT", wit)
            .current_dir(&source.dir),
        "sh",
        "a POSIX shell runs build commands",
    )?;
    if !ran.status.success() {
        return Err(Error::Build(format!(
            "the build command `{}` failed ({}):\n{}",
            build.command,
            ran.status,
            step_errors(&ran)
        )));
    }
    std::fs::copy(&made, output).map_err(|e| {
        Error::Build(format!(
            "the build command `{}` left no component at {}: {e}",
            build.command,
            made.display()
        ))
    })?;
    Ok(())
}
