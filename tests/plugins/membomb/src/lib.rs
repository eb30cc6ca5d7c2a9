//! `membomb`: Allocates memory, a mebibyte at a time, until something stops it.

hostile::plugin!(|parameters| {
    let _ = parameters;
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![0xAB; 1 << 20]);
        std::hint::black_box(&hoard);
    }
});
