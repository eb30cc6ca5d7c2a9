//! `panic`: Panics with a message.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            id: "panic".into(),
            name: "panic".into(),
            version: "0.1.0".into(),
            description: "Panics with a message.".into(),
            parameters_schema: r#"{"type": "object"}"#.into(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        panic!("the plugin gave up on {parameters}")
    }
}

export!(Plugin);
