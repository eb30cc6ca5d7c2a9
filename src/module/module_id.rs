//! [`ModuleId`]: a module's id, checked once where it enters.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// A module's id: 1 to 64 lowercase ASCII letters, digits, `-` and `_`,
/// starting with a letter or digit. A component file is named for it
/// (`<id>.wasm`), so an id is also always a safe file name. Checked once,
/// when it is made; it reads as a `&str` after.
///
/// # Examples
///
/// ```
/// use modrun::module::ModuleId;
///
/// let id: ModuleId = "hello".parse()?;
/// assert_eq!(id, "hello");
/// assert!("../etc/passwd".parse::<ModuleId>().is_err());
/// # Ok::<(), modrun::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ModuleId(String);

impl ModuleId {
    /// The most bytes (ASCII characters) a module id has.
    pub const MAX_LEN: usize = 64;

    /// `id`, if it is a module id; else [`Error::InvalidModuleId`].
    pub fn new(id: impl Into<String>) -> Result<ModuleId> {
        let id = id.into();
        if ModuleId::is_valid(&id) {
            Ok(ModuleId(id))
        } else {
            Err(Error::InvalidModuleId(id))
        }
    }

    /// Whether `id` is a module id.
    #[must_use]
    pub fn is_valid(id: &str) -> bool {
        (1..=ModuleId::MAX_LEN).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && id.as_bytes()[0].is_ascii_alphanumeric()
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The component file a plugins directory holds for this module.
    #[must_use]
    pub fn file_name(&self) -> String {
        format!("{}.wasm", self.0)
    }
}

impl Deref for ModuleId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ModuleId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ModuleId {
    type Err = Error;

    fn from_str(id: &str) -> Result<ModuleId> {
        ModuleId::new(id)
    }
}

impl From<ModuleId> for String {
    fn from(id: ModuleId) -> String {
        id.0
    }
}

impl PartialEq<str> for ModuleId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ModuleId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl<'de> Deserialize<'de> for ModuleId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ModuleId, D::Error> {
        let id = String::deserialize(deserializer)?;
        ModuleId::new(id).map_err(serde::de::Error::custom)
    }
}
