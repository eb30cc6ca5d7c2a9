//! `recurse`: Recurses without end.

hostile::plugin!(|parameters| {
    let _ = parameters;
    // Endless on purpose: the host must stop it.
    #[allow(unconditional_recursion)]
    fn deeper(depth: u64) -> u64 {
        std::hint::black_box(deeper(std::hint::black_box(depth + 1))) + 1
    }
    Ok(deeper(0).to_string())
});
