//! `abuse`: does one abusive thing, named by `mode`:
//! - `progress`: `count` progress reports of `fraction` (a number, or one
//!   of "inf", "-inf", "nan", "-0");
//! - `log`: `count` log lines;
//! - `output` / `error`: returns an output / error message of `bytes` bytes;
//! - `open`: opens `path` for reading;
//! - `symlink`: creates the link `link` pointing at `target`;
//! - `exit`: prints a line, then calls `exit(code)` before `run` returns;
//! - `print`: logs `message` as it is, and prints `count` lines to stdout.

hostile::plugin!(|parameters| {
    let parameters: serde_json::Value =
        serde_json::from_str(&parameters).map_err(|e| e.to_string())?;
    let count = parameters["count"].as_u64().unwrap_or(1);
    let bytes = parameters["bytes"].as_u64().unwrap_or(0) as usize;
    let text = |name: &str| parameters[name].as_str().unwrap_or_default().to_owned();
    match parameters["mode"].as_str().unwrap_or_default() {
        "progress" => {
            let fraction = match &parameters["fraction"] {
                serde_json::Value::String(name) => match name.as_str() {
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    "nan" => f64::NAN,
                    "-0" => -0.0,
                    other => return Err(format!("unknown fraction {other}")),
                },
                value => value.as_f64().unwrap_or(0.5),
            };
            for _ in 0..count {
                modrun::plugin::host::progress(fraction, "abusing progress");
            }
            Ok(format!("{{\"reports\": {count}}}"))
        }
        "log" => {
            for i in 0..count {
                modrun::plugin::host::log(
                    modrun::plugin::host::Level::Info,
                    &format!("abusing the log, line {i}"),
                );
            }
            Ok(format!("{{\"lines\": {count}}}"))
        }
        "output" => Ok(format!("\"{}\"", "x".repeat(bytes.saturating_sub(2)))),
        "error" => Err("e".repeat(bytes)),
        "open" => Ok(match std::fs::File::open(text("path")) {
            Ok(_) => "{\"opened\": true}".to_owned(),
            Err(e) => format!("{{\"opened\": false, \"error\": {:?}}}", e.to_string()),
        }),
        // `soft_link` is the one stable way to make a link on WASI.
        #[allow(deprecated)]
        "symlink" => Ok(match std::fs::soft_link(text("target"), text("link")) {
            Ok(()) => "{\"created\": true}".to_owned(),
            Err(e) => format!("{{\"created\": false, \"error\": {:?}}}", e.to_string()),
        }),
        "exit" => {
            println!("about to exit");
            std::process::exit(parameters["code"].as_i64().unwrap_or(0) as i32)
        }
        "print" => {
            modrun::plugin::host::log(modrun::plugin::host::Level::Info, &text("message"));
            for i in 0..count {
                println!("line {i}");
            }
            eprint!("no newline at the end");
            Ok(format!("{{\"printed\": {count}}}"))
        }
        other => Err(format!("unknown mode {other:?}")),
    }
});
