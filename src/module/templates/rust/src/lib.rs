//! `{{id}}`: a modrun plugin that greets whoever its parameters name, and
//! logs and reports its progress as it goes.

wit_bindgen::generate!({ path: "wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};
use modrun::plugin::host::{self, Level};
use serde_json::{Value, json};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            // The id must be the component's file name: {{id}}.wasm.
            id: "{{id}}".into(),
            name: "{{title}}".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            // modrun checks every start's parameters against this schema
            // before the plugin runs.
            parameters_schema: json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 100},
                    "times": {"type": "integer", "minimum": 1, "maximum": 5}
                },
                "additionalProperties": false
            })
            .to_string(),
        }
    }

    /// An `Err` ends the run `Failed` with its message; a panic ends it
    /// `Failed` too, with the panic's message and place.
    fn run(parameters: String) -> Result<String, String> {
        let parameters: Value = serde_json::from_str(&parameters)
            .map_err(|e| format!("the parameters are not JSON: {e}"))?;
        let name = parameters["name"].as_str().unwrap_or("world");
        let times = parameters["times"].as_u64().unwrap_or(1);
        if name.trim().is_empty() {
            return Err("name must not be blank".into());
        }
        host::log(Level::Info, &format!("greeting {name} {times} time(s)"));
        let mut greetings = Vec::new();
        for done in 1..=times {
            greetings.push(format!("Hello, {name}!"));
            host::progress(done as f64 / times as f64, &format!("{done} of {times}"));
        }
        Ok(json!({"greeting": greetings.join(" ")}).to_string())
    }
}

export!(Plugin);
