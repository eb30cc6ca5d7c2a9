//! `membomb`: Allocates memory, a mebibyte at a time, until something stops it.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            id: "membomb".into(),
            name: "membomb".into(),
            version: "0.1.0".into(),
            description: "Allocates memory, a mebibyte at a time, until something stops it.".into(),
            parameters_schema: r#"{"type": "object"}"#.into(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        let _ = parameters;
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xAB; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

export!(Plugin);
