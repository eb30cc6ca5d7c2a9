//! `spin`: Spins in a tight loop that never calls the host.

hostile::plugin!(|parameters| {
    let _ = parameters;
    let mut turns: u64 = 0;
    loop {
        turns = std::hint::black_box(turns.wrapping_add(1));
    }
});
