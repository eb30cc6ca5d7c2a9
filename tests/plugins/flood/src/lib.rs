//! `flood`: Writes 64 MiB to standard output, then succeeds.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use exports::modrun::plugin::plugin::{Guest, Info};

struct Plugin;

impl Guest for Plugin {
    fn describe() -> Info {
        Info {
            id: "flood".into(),
            name: "flood".into(),
            version: "0.1.0".into(),
            description: "Writes 64 MiB to standard output, then succeeds.".into(),
            parameters_schema: r#"{"type": "object"}"#.into(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        use std::io::Write;
        let _ = parameters;
        let block = vec![b'x'; 64 * 1024];
        let mut out = std::io::stdout();
        for _ in 0..1024 {
            out.write_all(&block).map_err(|e| e.to_string())?;
        }
        eprintln!("flooded");
        Ok("\"flooded\"".into())
    }
}

export!(Plugin);
