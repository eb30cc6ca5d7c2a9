//! What every hostile test plugin shares: the bindings, a `describe()` made
//! from the plugin crate's own name and description, and the exports. Each
//! plugin then writes only the way it misbehaves:
//!
//! ```ignore
//! hostile::plugin!(|parameters| { Err(parameters) });
//! hostile::plugin!(schema: r#"{"type": "object"}"#, |parameters| { Ok(parameters) });
//! hostile::plugin!(name: "Another name", |parameters| { Ok(parameters) });
//! ```

/// Defines the plugin: `run` is the body given, with the parameters (a JSON
/// string) bound to the name given. The schema defaults to any object, the
/// name it describes to the crate's.
#[macro_export]
macro_rules! plugin {
    (|$parameters:ident| $body:block) => {
        $crate::plugin!(schema: r#"{"type": "object"}"#, |$parameters| $body);
    };
    (schema: $schema:literal, |$parameters:ident| $body:block) => {
        $crate::plugin!(
            name: env!("CARGO_PKG_NAME"),
            schema: $schema,
            |$parameters| $body
        );
    };
    (name: $name:expr, |$parameters:ident| $body:block) => {
        $crate::plugin!(name: $name, schema: r#"{"type": "object"}"#, |$parameters| $body);
    };
    (name: $name:expr, schema: $schema:literal, |$parameters:ident| $body:block) => {
        wit_bindgen::generate!({ path: "../../../wit", world: "module" });

        struct Plugin;

        impl exports::modrun::plugin::plugin::Guest for Plugin {
            fn describe() -> exports::modrun::plugin::plugin::Info {
                exports::modrun::plugin::plugin::Info {
                    id: env!("CARGO_PKG_NAME").into(),
                    name: $name.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    description: env!("CARGO_PKG_DESCRIPTION").into(),
                    parameters_schema: $schema.into(),
                }
            }

            fn run($parameters: String) -> Result<String, String> $body
        }

        export!(Plugin);
    };
}
