//! `lookup`: looks keys up in the key-value table of the application that
//! embeds modrun, through the application's own host function
//! `acme:app/kv.get`, and returns what it found.

wit_bindgen::generate!({
    path: ["../../../wit", "wit"],
    world: "acme:app/lookup",
    generate_all,
});

use acme::app::kv;
use exports::modrun::plugin::plugin::{Guest, Info};
use modrun::plugin::host::{self, Level};
use serde_json::{Map, Value, json};

struct Lookup;

impl Guest for Lookup {
    fn describe() -> Info {
        Info {
            id: "lookup".into(),
            name: "Lookup".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: env!("CARGO_PKG_DESCRIPTION").into(),
            parameters_schema: json!({
                "type": "object",
                "properties": {
                    "keys": {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": 100
                    }
                },
                "required": ["keys"],
                "additionalProperties": false
            })
            .to_string(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        let parameters: Value = serde_json::from_str(&parameters).map_err(|e| e.to_string())?;
        let keys: Vec<&str> = parameters["keys"]
            .as_array()
            .map(|keys| keys.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut found = Map::new();
        for (done, key) in keys.iter().enumerate() {
            let value = kv::get(key);
            host::log(
                Level::Info,
                &format!("{key}: {}", value.as_deref().unwrap_or("(none)")),
            );
            found.insert((*key).to_owned(), value.map_or(Value::Null, Value::String));
            host::progress((done + 1) as f64 / keys.len() as f64, key);
        }
        Ok(Value::Object(found).to_string())
    }
}

export!(Lookup);
