//! `hello`: greets whoever its parameters name, logging and reporting progress.

wit_bindgen::generate!({ path: "../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};
use modrun::plugin::host::{self, Level};
use serde_json::{Value, json};

struct Hello;

impl Guest for Hello {
    fn describe() -> Info {
        Info {
            id: "hello".into(),
            name: "Hello".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Greets whoever its parameters name.".into(),
            parameters_schema: json!({
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 200},
                    "times": {"type": "integer", "minimum": 1, "maximum": 10}
                },
                "additionalProperties": false
            })
            .to_string(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        let parameters: Value = serde_json::from_str(&parameters).map_err(|e| e.to_string())?;
        let name = parameters["name"].as_str().unwrap_or("world");
        let times = parameters["times"].as_u64().unwrap_or(1);
        host::log(Level::Info, &format!("greeting {name}"));
        let mut greetings = Vec::new();
        for done in 1..=times {
            greetings.push(format!("Hello, {name}!"));
            host::progress(done as f64 / times as f64, &format!("{done} of {times}"));
        }
        println!("said hello {times} time(s)");
        Ok(json!({"greeting": greetings.join(" ")}).to_string())
    }
}

export!(Hello);
