//! `trap`: Executes an unreachable instruction.

hostile::plugin!(|parameters| {
    let _ = parameters;
    core::arch::wasm32::unreachable()
});
