//! The embedding application's own host functions: WIT interfaces it
//! implements in Rust and offers its plugins, beside modrun's `host` and
//! WASI. The sandbox stays deny-all: a plugin reaches only the interfaces
//! the application links here, and a plugin that imports one it does not
//! link fails to load, naming it.

use std::fmt;
use std::sync::Arc;

use wasmtime::component::{Linker, LinkerInstance};

use super::host::HostState;
use crate::error::{Error, Result};

/// Defines an interface's functions in the linker instance it is given.
type Define = Arc<dyn Fn(&mut LinkerInstance<'_, HostState>) -> wasmtime::Result<()> + Send + Sync>;

/// WIT interfaces the application implements for its plugins.
///
/// Each interface is defined by its full name, as plugins import it
/// (`acme:app/orders`, with `@version` when its package has one), and a
/// function that defines its functions with
/// [`LinkerInstance::func_wrap`] or [`LinkerInstance::func_wrap_async`].
/// Their first argument is the plugin's store, whose [`HostState`] says
/// which run is calling.
///
/// # Examples
///
/// An interface `acme:app/kv` with one function,
/// `get: func(key: string) -> option<string>`:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Arc;
/// use modrun::module::{HostFunctions, HostState};
/// use wasmtime::StoreContextMut;
///
/// let table = Arc::new(HashMap::from([("answer".to_string(), "42".to_string())]));
/// let functions = HostFunctions::new().interface("acme:app/kv", move |kv| {
///     let table = table.clone();
///     kv.func_wrap(
///         "get",
///         move |_store: StoreContextMut<'_, HostState>, (key,): (String,)| {
///             Ok((table.get(&key).cloned(),))
///         },
///     )
/// });
/// assert_eq!(functions.interfaces().collect::<Vec<_>>(), ["acme:app/kv"]);
/// ```
#[derive(Clone, Default)]
pub struct HostFunctions {
    interfaces: Vec<(String, Define)>,
}

impl fmt::Debug for HostFunctions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.interfaces()).finish()
    }
}

impl HostFunctions {
    /// No host functions: plugins get modrun's `host` and WASI only.
    #[must_use]
    pub fn new() -> HostFunctions {
        HostFunctions::default()
    }

    /// Adds the interface `name`, whose functions `define` defines.
    ///
    /// The name is checked when a [`ModuleHost`](super::ModuleHost) is made
    /// with these functions: it must be `namespace:package/interface`
    /// (optionally `@version`), and not in the `wasi` or `modrun`
    /// namespaces, which modrun provides itself.
    #[must_use]
    pub fn interface(
        mut self,
        name: impl Into<String>,
        define: impl Fn(&mut LinkerInstance<'_, HostState>) -> wasmtime::Result<()>
        + Send
        + Sync
        + 'static,
    ) -> HostFunctions {
        self.interfaces.push((name.into(), Arc::new(define)));
        self
    }

    /// The names of the interfaces offered, in the order they were added.
    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.interfaces.iter().map(|(name, _)| name.as_str())
    }

    /// Defines every interface in `linker`.
    pub(crate) fn link(&self, linker: &mut Linker<HostState>) -> Result<()> {
        for (name, define) in &self.interfaces {
            check_interface_name(name)?;
            let fail = |source: wasmtime::Error| Error::HostFunctions {
                interface: name.clone(),
                source,
            };
            let mut instance = linker.instance(name).map_err(fail)?;
            define(&mut instance).map_err(fail)?;
        }
        Ok(())
    }
}

/// Refuses a name that is not a WIT interface's full name, or that is one
/// of the interfaces modrun provides itself.
fn check_interface_name(name: &str) -> Result<()> {
    let refuse = |why: &str| Error::HostFunctions {
        interface: name.to_owned(),
        source: wasmtime::Error::msg(why.to_owned()),
    };
    let unversioned = name.split_once('@').map_or(name, |(name, _)| name);
    let Some((package, interface)) = unversioned.split_once('/') else {
        return Err(refuse(
            "not an interface name: write it as namespace:package/interface, as plugins import it",
        ));
    };
    let Some((namespace, package_name)) = package.split_once(':') else {
        return Err(refuse(
            "not an interface name: its package needs a namespace, as in acme:app/orders",
        ));
    };
    let is_identifier = |part: &str| {
        !part.is_empty()
            && part
                .split('-')
                .all(|word| !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric()))
    };
    if ![namespace, package_name, interface]
        .into_iter()
        .all(is_identifier)
    {
        return Err(refuse(
            "not an interface name: use lowercase words joined by '-', as in acme:app/orders",
        ));
    }
    if is_modruns_own(name) {
        return Err(refuse(
            "modrun provides the wasi and modrun interfaces itself; name yours in your own namespace",
        ));
    }
    Ok(())
}

/// Whether an interface is in a namespace modrun provides itself (`wasi`,
/// `modrun`), which an application may not define.
pub(crate) fn is_modruns_own(interface: &str) -> bool {
    interface.starts_with("wasi:") || interface.starts_with("modrun:")
}

#[cfg(test)]
mod tests {
    use super::check_interface_name;

    #[test]
    fn interface_names() {
        for good in [
            "acme:app/orders",
            "acme:app/kv@0.1.0",
            "my-org:my-app/order-book",
        ] {
            assert!(check_interface_name(good).is_ok(), "{good}");
        }
        for bad in [
            "orders",
            "acme/orders",
            "acme:app",
            "acme:app/",
            "acme:app/Or ders",
            "wasi:cli/environment@0.2.0",
            "modrun:plugin/host@0.1.0",
        ] {
            assert!(check_interface_name(bad).is_err(), "{bad}");
        }
    }
}
