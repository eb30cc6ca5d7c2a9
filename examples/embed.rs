//! Embedding modrun in an application that offers its plugins a host
//! function of its own.
//!
//! The application owns a key-value table and offers it to plugins as the
//! WIT interface `acme:app/kv@0.1.0` (`examples/embed/lookup/wit/app.wit`):
//! `get: func(key: string) -> option<string>`. The plugin `lookup`
//! (`examples/embed/lookup/`) imports it, looks keys up, and returns what it
//! found. A host that does not link the interface refuses the plugin, and
//! says which interface it lacks: plugins reach only what the application
//! links.
//!
//! Run it with `cargo run --example embed`. It first builds the plugin
//! (quick when nothing changed); runs are kept in memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use modrun::error::LoadError;
use modrun::module::{HostFunctions, HostState, build_plugins};
use modrun::wasmtime::StoreContextMut;
use modrun::{Error, Modrun, RunStatus};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let plugins = root.join("examples/embed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("embed-plugins");
    println!("building the plugin…");
    build_plugins(&plugins, &target, &plugins)?;

    // The application's own data, and the host function that reads it.
    let table: Arc<HashMap<String, String>> = Arc::new(HashMap::from([
        ("ada".to_owned(), "Ada Lovelace".to_owned()),
        ("grace".to_owned(), "Grace Hopper".to_owned()),
    ]));
    let functions = HostFunctions::new().interface("acme:app/kv@0.1.0", move |kv| {
        let table = table.clone();
        kv.func_wrap(
            "get",
            move |store: StoreContextMut<'_, HostState>, (key,): (String,)| {
                let run_id = store.data().run_id().unwrap_or("(loading)");
                println!("  run {run_id} looks up {key:?}");
                Ok((table.get(&key).cloned(),))
            },
        )
    });

    let modrun = Modrun::builder()
        .plugins(&plugins)
        .host_functions(functions)
        .build()
        .await?;
    let run = modrun
        .run("lookup", json!({"keys": ["ada", "grace", "alan"]}))
        .await?;
    anyhow::ensure!(
        run.status == RunStatus::Completed,
        "lookup ended {}: {:?}",
        run.status,
        run.error_message
    );
    println!("lookup found: {}", run.output.unwrap_or_default());
    modrun.shutdown(std::time::Duration::from_secs(5)).await?;

    // The same plugin, on a host that does not offer the interface.
    let bare = Modrun::builder().build().await?;
    match bare.host().load_module(&plugins, "lookup").await {
        Err(Error::ModuleLoad {
            cause: LoadError::MissingImport { interface, .. },
            ..
        }) => println!("without the host function, lookup is refused: it imports {interface}"),
        other => anyhow::bail!("lookup loaded without its host function: {other:?}"),
    }
    Ok(())
}
