//! `recurse`: Recurses without end.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            id: "recurse".into(),
            name: "recurse".into(),
            version: "0.1.0".into(),
            description: "Recurses without end.".into(),
            parameters_schema: r#"{"type": "object"}"#.into(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        let _ = parameters;
        fn deeper(depth: u64) -> u64 {
            std::hint::black_box(deeper(std::hint::black_box(depth + 1))) + 1
        }
        Ok(deeper(0).to_string())
    }
}

export!(Plugin);
