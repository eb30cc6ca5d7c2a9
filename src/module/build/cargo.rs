//! Builds plugin sources (a Cargo workspace of guest crates) into components
//! for `wasm32-wasip2`, and puts them into a plugins directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::error::{Error, Result};

/// A component built from a plugin crate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BuiltPlugin {
    /// The module id (the component's file name, without `.wasm`).
    pub id: String,
    /// Where it was put.
    pub path: PathBuf,
    /// Whether its content changed (a new or rebuilt module).
    pub changed: bool,
}

/// Builds the plugin workspace at `workspace` (its `Cargo.toml`) in release
/// mode for `wasm32-wasip2`, with build files in `target_dir`, and places
/// each component in `out_dir` as `<id>.wasm` — by an atomic rename, so a
/// watcher never sees half a file. Unchanged components are left untouched.
///
/// Compiler errors come back readable in [`Error::Build`].
pub fn build_plugins(
    workspace: &Path,
    target_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<BuiltPlugin>> {
    let manifest = workspace.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(Error::Build(format!(
            "{} is not a Cargo workspace of plugins (no Cargo.toml)",
            workspace.display()
        )));
    }
    let mut output = cargo_build(&manifest, target_dir)?;
    if !output.status.success() && missing_target(&output.stderr) && add_target(workspace) {
        output = cargo_build(&manifest, target_dir)?;
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if missing_target(&output.stderr) {
            "\nInstall the target with: rustup target add wasm32-wasip2"
        } else {
            ""
        };
        return Err(Error::Build(format!(
            "cargo build failed:\n{}{hint}",
            stderr.trim_end()
        )));
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::Build(format!("cannot create {}: {e}", out_dir.display())))?;
    let mut built = Vec::new();
    for line in output.stdout.split(|&b| b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let wasm = message["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|name| name.as_str())
            .filter(|name| name.ends_with(".wasm"));
        for artifact in wasm {
            built.push(place(Path::new(artifact), out_dir)?);
        }
    }
    built.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(built)
}

fn cargo_build(manifest: &Path, target_dir: &Path) -> Result<std::process::Output> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| Error::Build(format!("cannot run cargo: {e}")))
}

/// Whether cargo failed because the toolchain lacks the `wasm32-wasip2` target.
fn missing_target(stderr: &[u8]) -> bool {
    let stderr = String::from_utf8_lossy(stderr);
    (stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed"))
        || stderr.contains("can't find crate for `core`")
}

/// Adds the `wasm32-wasip2` target with rustup, for the toolchain that
/// builds `workspace`. A toolchain that was already installed when the
/// project's `rust-toolchain.toml` first met it does not get the target by
/// itself; without rustup this is the user's step, and the error says so.
fn add_target(workspace: &Path) -> bool {
    tracing::info!("the wasm32-wasip2 target is missing; adding it with rustup");
    Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .current_dir(workspace)
        .status()
        .is_ok_and(|status| status.success())
}

/// Copies a built component into `out_dir` unless it is already there.
fn place(artifact: &Path, out_dir: &Path) -> Result<BuiltPlugin> {
    let fail =
        |e: std::io::Error| Error::Build(format!("cannot place {}: {e}", artifact.display()));
    let id = artifact
        .file_stem()
        .and_then(|stem| stem.to_str())
        .ok_or_else(|| Error::Build(format!("odd artifact name {}", artifact.display())))?
        .to_owned();
    let path = out_dir.join(format!("{id}.wasm"));
    let bytes = std::fs::read(artifact).map_err(fail)?;
    let changed = std::fs::read(&path).map_or(true, |old| old != bytes);
    if changed {
        let partial = out_dir.join(format!(".{id}.wasm.partial"));
        std::fs::write(&partial, &bytes).map_err(fail)?;
        std::fs::rename(&partial, &path).map_err(fail)?;
    }
    Ok(BuiltPlugin { id, path, changed })
}
