//! `spin`: Spins in a tight loop that never calls the host.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            id: "spin".into(),
            name: "spin".into(),
            version: "0.1.0".into(),
            description: "Spins in a tight loop that never calls the host.".into(),
            parameters_schema: r#"{"type": "object"}"#.into(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        let _ = parameters;
        let mut turns: u64 = 0;
        loop {
            turns = std::hint::black_box(turns.wrapping_add(1));
        }
    }
}

export!(Plugin);
