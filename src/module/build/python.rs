//! Python plugins: an `app.py` built with componentize-py, which the build
//! installs into a virtualenv in the plugin's folder (`.venv`), at the
//! version its `requirements.txt` pins.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{PluginSource, run_step, step_errors};
use crate::error::{Error, Result};

/// The toolchain a Python plugin without a `requirements.txt` gets, and the
/// pin `modrun new --lang python` writes.
pub(crate) const TOOLCHAIN: &str = "componentize-py==0.25.1";

/// Makes sure the plugin's virtualenv holds the toolchain it pins.
pub(super) fn prepare(source: &PluginSource) -> Result<()> {
    toolchain(&source.dir).map(drop)
}

/// Builds `app.py` into the component `output`, against the WIT in `wit`.
pub(super) fn build(source: &PluginSource, wit: &Path, output: &Path) -> Result<()> {
    let tool = toolchain(&source.dir)?;
    let built = run_step(
        Command::new(&tool)
            .arg("-d")
            .arg(wit)
            .args(["-w", "module", "componentize", "app", "-o"])
            .arg(output)
            .current_dir(&source.dir),
        "componentize-py",
        "its virtualenv is incomplete; remove it and build again",
    )?;
    if !built.status.success() {
        return Err(Error::Build(format!(
            "componentize-py could not build {}:\n{}",
            source.dir.display(),
            step_errors(&built)
        )));
    }
    Ok(())
}

/// The plugin's componentize-py, installed first where it is missing or its
/// pin changed.
fn toolchain(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join(".venv");
    let tool = venv.join("bin").join("componentize-py");
    let requirements = dir.join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).unwrap_or_else(|_| TOOLCHAIN.to_owned());
    let record = venv.join(".modrun-installed");
    if tool.is_file() && std::fs::read_to_string(&record).ok().as_deref() == Some(&wanted) {
        return Ok(tool);
    }
    let python = venv.join("bin").join("python");
    if !python.exists() {
        tracing::info!(venv = %venv.display(), "creating the plugin's Python virtualenv");
        let interpreter = std::env::var_os("MODRUN_PYTHON").unwrap_or_else(|| "python3".into());
        let created = run_step(
            Command::new(&interpreter).args(["-m", "venv"]).arg(&venv),
            "python3",
            "Python plugins are built with componentize-py in a virtualenv; install Python 3.10 \
             or later with its venv module (Debian: apt-get install python3 python3-venv), or \
             name an interpreter in MODRUN_PYTHON",
        )?;
        if !created.status.success() {
            return Err(Error::Build(format!(
                "cannot create the virtualenv {}:\n{}\nFix: install Python's venv module (Debian: \
                 apt-get install python3-venv), or run: python3 -m venv {}",
                venv.display(),
                step_errors(&created),
                venv.display()
            )));
        }
    }
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--quiet",
    ]);
    if requirements.is_file() {
        pip.arg("-r").arg(&requirements);
    } else {
        pip.arg(TOOLCHAIN);
    }
    tracing::info!(venv = %venv.display(), "installing the Python guest toolchain with pip");
    let installed = run_step(
        &mut pip,
        "the virtualenv's python",
        "remove the virtualenv and build again",
    )?;
    if !installed.status.success() {
        let fix = if requirements.is_file() {
            format!("-r {}", requirements.display())
        } else {
            TOOLCHAIN.to_owned()
        };
        return Err(Error::Build(format!(
            "installing the Python guest toolchain into {} failed:\n{}\nFix: {} -m pip install {fix}",
            venv.display(),
            step_errors(&installed),
            python.display()
        )));
    }
    if !tool.is_file() {
        return Err(Error::Build(format!(
            "{} does not install componentize-py: add the line `{TOOLCHAIN}`",
            requirements.display()
        )));
    }
    std::fs::write(&record, &wanted)
        .map_err(|e| Error::Build(format!("cannot write {}: {e}", record.display())))?;
    Ok(tool)
}
