//! `sandbox`: Tries to read a host file and the environment, and uses the directory it is given.

hostile::plugin!(|parameters| {
    let mut report = Vec::new();
    let passwd = match std::fs::read_to_string("/etc/passwd") {
        Ok(text) => format!("read {} bytes", text.len()),
        Err(e) => format!("denied: {e}"),
    };
    report.push(format!("\"passwd\": {passwd:?}"));
    let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    report.push(format!("\"env\": {vars:?}"));
    let home = match std::env::var("HOME") {
        Ok(home) => format!("{home:?}"),
        Err(_) => "null".to_owned(),
    };
    report.push(format!("\"home\": {home}"));
    if parameters.contains("\"dir\"") {
        let write = std::fs::write("/data/note.txt", "written by the plugin")
            .and_then(|()| std::fs::read_to_string("/data/note.txt"));
        let write = match write {
            Ok(text) => format!("ok: {text}"),
            Err(e) => format!("denied: {e}"),
        };
        report.push(format!("\"write\": {write:?}"));
        let read = match std::fs::read_to_string("/data/input.txt") {
            Ok(text) => format!("ok: {text}"),
            Err(e) => format!("denied: {e}"),
        };
        report.push(format!("\"read\": {read:?}"));
    }
    Ok(format!("{{{}}}", report.join(", ")))
});
