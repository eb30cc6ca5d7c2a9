//! `modrun new`: a new plugin source, in Rust, Python or JavaScript, that
//! builds and runs with no edits. It greets whoever its parameters name,
//! logs and reports progress, describes itself with its id and a JSON
//! Schema, and shows how a failure becomes a readable `Failed` run. Each
//! carries the contract it was written against (`wit/plugin.wit`) and pins
//! its toolchain exactly.

use std::path::{Path, PathBuf};

use super::ModuleId;
use super::build::{Language, PLUGIN_WIT, PluginSource, javascript, python};
use crate::error::{Error, Result};

/// The files of each language's template: path in the plugin's folder, text.
const RUST: &[(&str, &str)] = &[
    ("Cargo.toml", include_str!("templates/rust/Cargo.toml")),
    ("src/lib.rs", include_str!("templates/rust/src/lib.rs")),
    ("README.md", include_str!("templates/rust/README.md")),
    (".gitignore", include_str!("templates/rust/gitignore")),
];
const PYTHON: &[(&str, &str)] = &[
    ("app.py", include_str!("templates/python/app.py")),
    (
        "requirements.txt",
        include_str!("templates/python/requirements.txt"),
    ),
    ("README.md", include_str!("templates/python/README.md")),
    (".gitignore", include_str!("templates/python/gitignore")),
];
const JAVASCRIPT: &[(&str, &str)] = &[
    ("app.js", include_str!("templates/js/app.js")),
    ("package.json", include_str!("templates/js/package.json")),
    ("README.md", include_str!("templates/js/README.md")),
    (".gitignore", include_str!("templates/js/gitignore")),
];

/// Creates the plugin source `plugins/<name>/` in `language`. Its module id
/// is `name` with `-` read as `_`. Refuses a name that is no module id, a
/// folder that exists, and [`Language::Command`] (a declared build has no
/// template).
pub fn new_plugin(plugins: &Path, name: &str, language: Language) -> Result<PluginSource> {
    let id = name.replace('-', "_");
    if !ModuleId::is_valid(name) {
        return Err(Error::Build(format!(
            "{name:?} cannot name a plugin: use 1 to 64 lowercase letters, digits, `-` and `_`, \
             starting with a letter or digit"
        )));
    }
    let files = match language {
        Language::Rust => RUST,
        Language::Python => PYTHON,
        Language::JavaScript => JAVASCRIPT,
        Language::Command => {
            return Err(Error::Build(
                "there is no template for a declared build command: write its build.toml".into(),
            ));
        }
    };
    let dir = plugins.join(name);
    if dir.exists() {
        return Err(Error::Build(format!("{} already exists", dir.display())));
    }
    let fail = |path: &Path, e: std::io::Error| {
        Error::Build(format!("cannot write {}: {e}", path.display()))
    };
    let title = title(&id);
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{id}}", &id)
            .replace("{{title}}", &title)
            .replace("{{componentize_js}}", javascript::TOOLCHAIN[0].1)
            .replace("{{preview2_shim}}", javascript::TOOLCHAIN[1].1)
            .replace("componentize-py==0.25.1", python::TOOLCHAIN)
    };
    let written: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(path, text)| (dir.join(path), fill(text)))
        .chain([(dir.join("wit").join("plugin.wit"), PLUGIN_WIT.to_owned())])
        .collect();
    for (path, text) in &written {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
        }
        std::fs::write(path, text).map_err(|e| fail(path, e))?;
    }
    Ok(PluginSource { id, dir, language })
}

/// A human name from an id: `word_count` becomes "Word count".
fn title(id: &str) -> String {
    let words = id.replace('_', " ");
    let mut chars = words.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}
