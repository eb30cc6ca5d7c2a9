//! `countdown`, version 2 (built as countdown_v2.wasm, installed as countdown.wasm by the tests): runs for N seconds, reporting progress each step. It sleeps
//! through WASI clocks, so a waiting run holds no host thread: the demo of
//! watching and cancelling a run.

wit_bindgen::generate!({ path: "../../../wit", world: "module" });

use std::time::Duration;

use exports::modrun::plugin::plugin::{Guest, Info};
use modrun::plugin::host::{self, Level};
use serde_json::{Value, json};

struct Countdown;

impl Guest for Countdown {
    fn describe() -> Info {
        Info {
            id: "countdown".into(),
            name: "Countdown".into(),
            version: "2.0.0".into(),
            description: "Counts down for `seconds` seconds, one progress report per `step_ms`."
                .into(),
            parameters_schema: json!({
                "type": "object",
                "properties": {
                    "seconds": {"type": "number", "minimum": 0, "maximum": 86400},
                    "step_ms": {"type": "integer", "minimum": 1, "maximum": 60000}
                },
                "required": ["seconds"],
                "additionalProperties": false
            })
            .to_string(),
        }
    }

    fn run(parameters: String) -> Result<String, String> {
        let parameters: Value = serde_json::from_str(&parameters).map_err(|e| e.to_string())?;
        let total = Duration::from_secs_f64(parameters["seconds"].as_f64().unwrap_or(0.0));
        let step = Duration::from_millis(parameters["step_ms"].as_u64().unwrap_or(1000));
        let steps = total.as_nanos().div_ceil(step.as_nanos().max(1)).max(1) as u32;
        host::log(Level::Info, &format!("counting down {total:?} in {steps} steps"));
        for done in 1..=steps {
            std::thread::sleep(step.min(total));
            host::progress(done as f64 / steps as f64, &format!("{} left", steps - done));
        }
        Ok(json!({"counted_ms": total.as_millis() as u64, "steps": steps, "edition": 2}).to_string())
    }
}

export!(Countdown);
