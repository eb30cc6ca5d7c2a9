//! A module's manifest, `plugins/<id>.toml` beside its component: the limits
//! it runs under and the capabilities it is granted. Without one, a module
//! gets the host's defaults and no capabilities at all.
//!
//! ```toml
//! [limits]
//! timeout_secs = 30          # a run over this fails, "timed out"
//! memory_mib = 128           # linear memory a run may use
//! max_concurrent = 4         # runs of this module at once; more wait, queued
//!
//! [grants]
//! env = ["LANG"]             # host environment variables passed through
//!
//! [[grants.dirs]]
//! host = "/srv/reports"      # a host directory...
//! guest = "/data"            # ...seen by the module as this path
//! writable = false           # read-only unless true
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a run of a module may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleLimits {
    /// A run that takes longer fails with "timed out".
    pub timeout: Duration,
    /// The most linear memory a run may grow to, in bytes.
    pub memory_bytes: usize,
    /// The most runs of this module at once (the rest wait, queued).
    pub max_concurrent: Option<usize>,
}

impl Default for ModuleLimits {
    fn default() -> ModuleLimits {
        ModuleLimits {
            timeout: Duration::from_secs(60),
            memory_bytes: 64 << 20,
            max_concurrent: None,
        }
    }
}

/// A host directory a module may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the module sees it.
    pub guest: String,
    /// Whether the module may write there.
    #[serde(default)]
    pub writable: bool,
}

/// The capabilities a module is granted beyond the sandbox's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Directories it may use.
    #[serde(default)]
    pub dirs: Vec<DirGrant>,
    /// Host environment variables it may read (by name; unset ones are skipped).
    #[serde(default)]
    pub env: Vec<String>,
}

/// A parsed manifest: limits and grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Limits, with the host's defaults filled in.
    pub limits: ModuleLimits,
    /// Capabilities granted.
    pub grants: Grants,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    grants: Grants,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    timeout_secs: Option<f64>,
    memory_mib: Option<u64>,
    max_concurrent: Option<usize>,
}

impl Manifest {
    /// Reads the manifest beside `component` (`<dir>/<stem>.toml`), or the
    /// defaults when there is none. `ceiling` bounds the memory a manifest
    /// may ask for (the engine cannot give more).
    pub fn for_component(
        component: &Path,
        defaults: &ModuleLimits,
        ceiling: usize,
    ) -> Result<Manifest, String> {
        let path = component.with_extension("toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => Manifest::parse(&text, defaults, ceiling)
                .map_err(|e| format!("manifest {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest {
                limits: defaults.clone(),
                grants: Grants::default(),
            }),
            Err(e) => Err(format!("cannot read manifest {}: {e}", path.display())),
        }
    }

    /// Parses manifest text; unknown keys and out-of-range values are errors.
    pub fn parse(text: &str, defaults: &ModuleLimits, ceiling: usize) -> Result<Manifest, String> {
        let file: ManifestFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut limits = defaults.clone();
        if let Some(secs) = file.limits.timeout_secs {
            if !(secs > 0.0 && secs <= 7.0 * 86_400.0) {
                return Err(format!(
                    "limits.timeout_secs must be above 0 and at most a week, not {secs}"
                ));
            }
            limits.timeout = Duration::from_secs_f64(secs);
        }
        if let Some(mib) = file.limits.memory_mib {
            let bytes = usize::try_from(mib)
                .ok()
                .and_then(|mib| mib.checked_mul(1 << 20))
                .filter(|&bytes| bytes > 0 && bytes <= ceiling)
                .ok_or_else(|| {
                    format!(
                        "limits.memory_mib must be from 1 to {} (the host's ceiling), not {mib}",
                        ceiling >> 20
                    )
                })?;
            limits.memory_bytes = bytes;
        }
        if let Some(max) = file.limits.max_concurrent {
            if max == 0 {
                return Err("limits.max_concurrent must be at least 1".into());
            }
            limits.max_concurrent = Some(max);
        }
        for dir in &file.grants.dirs {
            if !dir.host.is_absolute() {
                return Err(format!(
                    "grants.dirs: host directory {} must be an absolute path",
                    dir.host.display()
                ));
            }
            if !dir.host.is_dir() {
                return Err(format!(
                    "grants.dirs: host directory {} does not exist",
                    dir.host.display()
                ));
            }
            if !dir.guest.starts_with('/') || dir.guest.split('/').any(|part| part == "..") {
                return Err(format!(
                    "grants.dirs: guest path {:?} must be absolute, without '..'",
                    dir.guest
                ));
            }
        }
        if let Some(name) = file
            .grants
            .env
            .iter()
            .find(|name| name.is_empty() || name.contains('=') || name.contains('\0'))
        {
            return Err(format!("grants.env: {name:?} is not a variable name"));
        }
        Ok(Manifest {
            limits,
            grants: file.grants,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CEILING: usize = 1 << 30;

    #[test]
    fn an_empty_manifest_keeps_the_defaults() {
        let manifest = Manifest::parse("", &ModuleLimits::default(), CEILING).unwrap();
        assert_eq!(manifest.limits, ModuleLimits::default());
        assert_eq!(manifest.grants, Grants::default());
    }

    #[test]
    fn limits_and_grants_are_read() {
        let text = "[limits]\ntimeout_secs = 2.5\nmemory_mib = 16\nmax_concurrent = 3\n\
                    [grants]\nenv = [\"LANG\"]\n[[grants.dirs]]\nhost = \"/tmp\"\nguest = \"/data\"\n";
        let manifest = Manifest::parse(text, &ModuleLimits::default(), CEILING).unwrap();
        assert_eq!(manifest.limits.timeout, Duration::from_millis(2500));
        assert_eq!(manifest.limits.memory_bytes, 16 << 20);
        assert_eq!(manifest.limits.max_concurrent, Some(3));
        assert_eq!(manifest.grants.env, ["LANG"]);
        assert!(!manifest.grants.dirs[0].writable);
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        for (text, expected) in [
            ("[limits]\ntimeout_secs = -1\n", "timeout_secs"),
            ("[limits]\nmemory_mib = 4096\n", "ceiling"),
            ("[limits]\nmax_concurrent = 0\n", "max_concurrent"),
            ("[limits]\nmemory = 3\n", "unknown field"),
            ("[grants]\nenv = [\"A=B\"]\n", "not a variable name"),
            (
                "[[grants.dirs]]\nhost = \"relative\"\nguest = \"/d\"\n",
                "absolute",
            ),
            (
                "[[grants.dirs]]\nhost = \"/tmp\"\nguest = \"/d/../..\"\n",
                "without '..'",
            ),
            (
                "[[grants.dirs]]\nhost = \"/no/such/dir\"\nguest = \"/d\"\n",
                "does not exist",
            ),
            ("this is = not toml [", ""),
        ] {
            let error = Manifest::parse(text, &ModuleLimits::default(), CEILING).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
