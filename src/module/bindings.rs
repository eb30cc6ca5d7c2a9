//! The host side of the plugin contract in `wit/`: the one `bindgen!` call.

wasmtime::component::bindgen!({
    path: "wit",
    world: "module",
    // Every import may await (progress writes to the registry), and every
    // export is called with `call_async`, so epochs can yield and a run can
    // be cancelled by dropping its future.
    imports: { default: async },
    exports: { default: async },
});

pub use self::exports::modrun::plugin::plugin::Info;
pub use self::modrun::plugin::host::{Host, Level};
