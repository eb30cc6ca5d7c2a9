//! `panic`: Panics with a message.

hostile::plugin!(|parameters| {
    panic!("the plugin gave up on {parameters}")
});
