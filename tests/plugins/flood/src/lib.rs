//! `flood`: Writes 64 MiB to standard output, then succeeds.

hostile::plugin!(|parameters| {
    use std::io::Write;
    let _ = parameters;
    let block = vec![b'x'; 64 * 1024];
    let mut out = std::io::stdout();
    for _ in 0..1024 {
        out.write_all(&block).map_err(|e| e.to_string())?;
    }
    eprintln!("flooded");
    Ok("\"flooded\"".into())
});
