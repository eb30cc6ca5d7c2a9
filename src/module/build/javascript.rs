//! JavaScript plugins: a package whose `package.json` pins componentize-js,
//! installed into its `node_modules` by npm, built from its main module
//! (`main` in `package.json`, else `app.js`).

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{PluginSource, hex, run_step, step_errors};
use crate::error::{Error, Result};

/// The packages a JavaScript plugin builds with, pinned exactly: what
/// `modrun new --lang js` writes. preview2-shim is pinned because newer
/// ones break componentize-js's file access during the build.
pub(crate) const TOOLCHAIN: [(&str, &str); 2] = [
    ("@bytecodealliance/componentize-js", "0.23.0"),
    ("@bytecodealliance/preview2-shim", "0.25.0"),
];

/// The module the build compiles: it wraps the plugin's own, so that a
/// thrown `Error` ends the run with its name and message and puts its stack
/// into the run's log (the bindings can carry only a string as the error).
const ENTRY: &str = ".modrun-entry.js";

/// Installs the plugin's packages where they are missing or changed.
pub(super) fn prepare(source: &PluginSource) -> Result<()> {
    let dir = &source.dir;
    let record = dir.join("node_modules").join(".modrun-installed");
    if std::fs::read_to_string(&record).ok() == Some(manifests_digest(dir)) {
        return Ok(());
    }
    let verb = if dir.join("package-lock.json").is_file() {
        "ci"
    } else {
        "install"
    };
    tracing::info!(dir = %dir.display(), "installing the plugin's packages with npm {verb}");
    let installed = run_step(
        Command::new("npm")
            .args([verb, "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir),
        "npm",
        "JavaScript plugins are built with componentize-js, installed by npm; install Node.js 20 \
         or later with npm (Debian: apt-get install nodejs npm)",
    )?;
    if !installed.status.success() {
        return Err(Error::Build(format!(
            "npm {verb} in {} failed:\n{}\nFix: cd {} && npm {verb}",
            dir.display(),
            step_errors(&installed),
            dir.display()
        )));
    }
    std::fs::write(&record, manifests_digest(dir))
        .map_err(|e| Error::Build(format!("cannot write {}: {e}", record.display())))
}

/// Builds the plugin's main module into the component `output`, against the
/// WIT in `wit`.
pub(super) fn build(source: &PluginSource, wit: &Path, output: &Path) -> Result<()> {
    let dir = &source.dir;
    prepare(source)?;
    let tool = dir
        .join("node_modules")
        .join(".bin")
        .join("componentize-js");
    if !tool.is_file() {
        let packages: Vec<String> = TOOLCHAIN
            .iter()
            .map(|(name, version)| format!("{name}@{version}"))
            .collect();
        return Err(Error::Build(format!(
            "{} does not depend on componentize-js: add it with `cd {} && npm install \
             --save-dev --save-exact {}`",
            dir.join("package.json").display(),
            dir.display(),
            packages.join(" ")
        )));
    }
    let main = main_module(dir)?;
    let entry = dir.join(ENTRY);
    std::fs::write(&entry, wrapper(&main))
        .map_err(|e| Error::Build(format!("cannot write {}: {e}", entry.display())))?;
    let built = run_step(
        Command::new(&tool)
            .arg(ENTRY)
            .arg("--wit")
            .arg(wit)
            .args(["--world-name", "module"])
            // Without these, the component imports wasi:http, which modrun
            // does not provide.
            .args(["--disable", "http", "fetch-event", "-o"])
            .arg(output)
            .current_dir(dir),
        "componentize-js",
        "its node_modules is incomplete; remove it and build again",
    );
    let _ = std::fs::remove_file(&entry);
    let built = built?;
    if !built.status.success() || !output.is_file() {
        return Err(Error::Build(format!(
            "componentize-js could not build {}:\n{}",
            dir.display(),
            step_errors(&built)
        )));
    }
    Ok(())
}

/// The plugin's main module, relative to its folder: `main` in its
/// `package.json`, else `app.js`.
fn main_module(dir: &Path) -> Result<String> {
    let manifest = dir.join("package.json");
    let text = std::fs::read_to_string(&manifest)
        .map_err(|e| Error::Build(format!("cannot read {}: {e}", manifest.display())))?;
    let package: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Build(format!("{} is not JSON: {e}", manifest.display())))?;
    let main = package["main"]
        .as_str()
        .unwrap_or("app.js")
        .trim_start_matches("./");
    if !dir.join(main).is_file() {
        return Err(Error::Build(format!(
            "{} has no main module {main}: write it, or name yours in package.json's \"main\"",
            dir.display()
        )));
    }
    Ok(main.to_owned())
}

/// The entry module that wraps the plugin's own `main`.
fn wrapper(main: &str) -> String {
    let main = serde_json::to_string(&format!("./{main}")).unwrap_or_default();
    format!(
        "import {{ plugin as inner }} from {main};
import {{ log }} from 'modrun:plugin/host@0.1.0';

export const plugin = {{
  describe() {{
    return inner.describe();
  }},
  run(parameters) {{
    try {{
      return inner.run(parameters);
    }} catch (e) {{
      if (typeof e === 'string') throw e;
      if (e !== null && typeof e === 'object' && 'message' in e) {{
        const name = e.name || 'Error';
        log('error', `${{name}}: ${{e.message}}\\n${{e.stack || ''}}`.trimEnd());
        throw `${{name}}: ${{e.message}}`;
      }}
      throw `the module threw ${{String(e)}}`;
    }}
  }},
}};
"
    )
}

/// A digest of the files npm installs from.
fn manifests_digest(dir: &Path) -> String {
    let mut digest = Sha256::new();
    for file in ["package.json", "package-lock.json"] {
        digest.update(std::fs::read(dir.join(file)).unwrap_or_default());
        digest.update([0]);
    }
    hex(&digest.finalize())
}
