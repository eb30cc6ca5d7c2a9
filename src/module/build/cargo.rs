//! Rust plugins: crates built with cargo for `wasm32-wasip2`.

use std::path::Path;
use std::process::Command;

use super::{BuiltPlugin, Language, PluginSource, place};
use crate::error::{Error, Result};

/// Whether `source` is built as a member of the Cargo workspace of
/// `plugins`: there is one, and the crate is no workspace of its own.
pub(super) fn in_workspace(plugins: &Path, source: &PluginSource) -> bool {
    plugins.join("Cargo.toml").is_file()
        && std::fs::read_to_string(source.dir.join("Cargo.toml"))
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .is_some_and(|manifest| !manifest.contains_key("workspace"))
}

/// Builds the crate or workspace of `manifest` in release mode for
/// `wasm32-wasip2`, with build files in `target_dir`, and places each
/// component in `out_dir`. Compiler errors come back readable.
pub(super) fn build(
    manifest: &Path,
    target_dir: &Path,
    out_dir: &Path,
) -> Result<Vec<BuiltPlugin>> {
    let workspace = manifest.parent().unwrap_or(Path::new("."));
    let mut output = cargo_build(manifest, target_dir)?;
    if !output.status.success() && missing_target(&output.stderr) && add_target(workspace) {
        output = cargo_build(manifest, target_dir)?;
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
            let artifact = Path::new(artifact);
            let id = artifact
                .file_stem()
                .and_then(|stem| stem.to_str())
                .ok_or_else(|| Error::Build(format!("odd artifact name {}", artifact.display())))?;
            built.push(place(artifact, id, Language::Rust, out_dir)?);
        }
    }
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
