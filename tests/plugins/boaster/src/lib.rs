//! `boaster`: Describes itself with a name a mebibyte long.

hostile::plugin!(name: "boaster ".repeat(1 << 17), |parameters| {
    Ok(parameters)
});
