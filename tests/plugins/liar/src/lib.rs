//! `liar`: Describes a parameter schema that is not a valid JSON Schema.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            id: "liar".into(),
            name: "liar".into(),
            version: "0.1.0".into(),
            description: "Describes a parameter schema that is not a valid JSON Schema.".into(),
            parameters_schema: r#"{"type": "object", "properties": {"n": {"type": "a number, honestly"}}}"#.into(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        Ok(parameters)
    }
}

export!(Plugin);
