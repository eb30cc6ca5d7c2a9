//! `trap`: Executes an unreachable instruction.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            id: "trap".into(),
            name: "trap".into(),
            version: "0.1.0".into(),
            description: "Executes an unreachable instruction.".into(),
            parameters_schema: r#"{"type": "object"}"#.into(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        let _ = parameters;
        core::arch::wasm32::unreachable()
    }
}

export!(Plugin);
