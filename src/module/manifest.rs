//! A module's manifest, `plugins/<id>.toml` beside its component: the limits
//! it runs under and the capabilities it is granted. Without one, a module
//! gets the host's defaults and no capabilities at all.
//!
//! ```toml
//! [limits]
//! timeout_secs = 30          # a run over this fails, "timed out" (0.001 to a week)
//! memory_mib = 128           # linear memory a run may use (up to the host's ceiling)
//! max_concurrent = 4         # runs of this module at once; more wait, queued (1 to 10000)
//! max_output_kib = 1024      # a run whose JSON output is larger fails (1 to 65536)
//! retry_on_node_loss = false # several nodes: a run whose node is lost runs again
//! max_attempts = 3           # ...at most this many times in all (1 to 10)
//!
//! [grants]
//! env = ["LANG"]             # host environment variables passed through
//! symlinks = false           # may the module create symbolic links in its directories
//!
//! [[grants.dirs]]
//! host = "/srv/reports"      # a host directory...
//! guest = "/data"            # ...seen by the module as this path
//! writable = false           # read-only unless true
//!
//! [component]
//! allow_symlink = false      # may plugins/<id>.wasm be a symbolic link
//!
//! [retention]                # instead of `serve --retain`, for this module
//! keep = "7d"                # its finished runs, this long after they end
//! keep_failed = "90d"        # its failed runs (wins over `keep`)
//! ```
//!
//! Whatever the grants, a module opens only regular files and directories
//! in its granted directories: a FIFO, a device or a socket there would let
//! it block a host thread or reach a device, so opening one is refused.

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
    /// The largest JSON output a run may return, in bytes; a larger one
    /// makes the run fail.
    pub max_output_bytes: usize,
    /// How many times in all a run may be executed, on a registry nodes
    /// share: a run whose node is lost mid-run is queued again while it
    /// has had fewer attempts (1: never; the manifest's
    /// `retry_on_node_loss = true` makes it 3 unless `max_attempts` says).
    pub max_attempts: u32,
}

/// The most attempts a manifest may allow a run.
pub const MAX_ATTEMPTS_CEILING: u64 = 10;

/// The most runs of one module at once a manifest may allow.
pub const MAX_CONCURRENT_CEILING: usize = 10_000;

/// The largest output limit a manifest may set, in KiB (64 MiB).
pub const MAX_OUTPUT_KIB_CEILING: u64 = 64 << 10;

impl Default for ModuleLimits {
    fn default() -> ModuleLimits {
        ModuleLimits {
            timeout: Duration::from_secs(60),
            memory_bytes: 64 << 20,
            max_concurrent: None,
            max_output_bytes: 1 << 20,
            max_attempts: 1,
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
    /// Whether it may create symbolic links in its writable directories
    /// (a link planted there could lead a host tool that follows it
    /// anywhere on the host).
    #[serde(default)]
    pub symlinks: bool,
}

/// How the component file itself may be found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentFile {
    /// Whether `<id>.wasm` may be a symbolic link (to a regular file,
    /// possibly outside the plugins directory). Off: only a regular file
    /// in the plugins directory loads.
    #[serde(default)]
    pub allow_symlink: bool,
}

/// How long a module's finished runs are kept, where it says (instead of
/// the server's `--retain`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Its finished runs, this long after they end.
    pub keep: Option<Duration>,
    /// Its failed runs (wins over `keep` for them).
    pub keep_failed: Option<Duration>,
}

/// A parsed manifest: limits and grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Limits, with the host's defaults filled in.
    pub limits: ModuleLimits,
    /// Capabilities granted.
    pub grants: Grants,
    /// How the component file may be found.
    pub component: ComponentFile,
    /// How long its finished runs are kept.
    pub retention: Retention,
}

/// The longest manifest read, in bytes.
const MAX_MANIFEST_BYTES: u64 = 64 << 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    grants: Grants,
    #[serde(default)]
    component: ComponentFile,
    #[serde(default)]
    retention: RetentionFile,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    keep: Option<String>,
    keep_failed: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    timeout_secs: Option<f64>,
    memory_mib: Option<u64>,
    max_concurrent: Option<u64>,
    max_output_kib: Option<u64>,
    retry_on_node_loss: Option<bool>,
    max_attempts: Option<u64>,
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
        use super::plugin_file::{Unread, read_regular};
        match read_regular(&path, MAX_MANIFEST_BYTES, false) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("manifest {}: it is not UTF-8 text", path.display()))?;
                Manifest::parse(&text, defaults, ceiling)
                    .map_err(|e| format!("manifest {}: {e}", path.display()))
            }
            Err(Unread::Missing) => Ok(Manifest {
                limits: defaults.clone(),
                ..Manifest::default()
            }),
            Err(Unread::Refused(why)) => Err(format!("manifest {}: {why}", path.display())),
        }
    }

    /// Parses manifest text; unknown keys and out-of-range values are errors.
    pub fn parse(text: &str, defaults: &ModuleLimits, ceiling: usize) -> Result<Manifest, String> {
        let file: ManifestFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut limits = defaults.clone();
        if let Some(secs) = file.limits.timeout_secs {
            if !(0.001..=7.0 * 86_400.0).contains(&secs) {
                return Err(format!(
                    "limits.timeout_secs must be from 0.001 to a week (604800), not {secs}"
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
            let max = usize::try_from(max)
                .ok()
                .filter(|max| (1..=MAX_CONCURRENT_CEILING).contains(max))
                .ok_or_else(|| {
                    format!(
                        "limits.max_concurrent must be from 1 to {MAX_CONCURRENT_CEILING}, not {max}"
                    )
                })?;
            limits.max_concurrent = Some(max);
        }
        if let Some(kib) = file.limits.max_output_kib {
            if !(1..=MAX_OUTPUT_KIB_CEILING).contains(&kib) {
                return Err(format!(
                    "limits.max_output_kib must be from 1 to {MAX_OUTPUT_KIB_CEILING}, not {kib}"
                ));
            }
            limits.max_output_bytes = usize::try_from(kib << 10).unwrap_or(usize::MAX);
        }
        match (file.limits.retry_on_node_loss, file.limits.max_attempts) {
            (Some(true), attempts) => {
                let attempts = attempts.unwrap_or(3);
                if !(2..=MAX_ATTEMPTS_CEILING).contains(&attempts) {
                    return Err(format!(
                        "limits.max_attempts must be from 2 to {MAX_ATTEMPTS_CEILING} with \
                         retry_on_node_loss, not {attempts}"
                    ));
                }
                limits.max_attempts = u32::try_from(attempts).unwrap_or(1);
            }
            (_, Some(attempts)) if attempts != 1 => {
                return Err(format!(
                    "limits.max_attempts = {attempts} needs retry_on_node_loss = true: a run is \
                     only executed again when its node is lost"
                ));
            }
            _ => limits.max_attempts = 1,
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
        let keep = |key: &str, value: &Option<String>| -> Result<Option<Duration>, String> {
            value
                .as_deref()
                .map(|text| parse_age(text).map_err(|e| format!("retention.{key}: {e}")))
                .transpose()
        };
        let retention = Retention {
            keep: keep("keep", &file.retention.keep)?,
            keep_failed: keep("keep_failed", &file.retention.keep_failed)?,
        };
        Ok(Manifest {
            limits,
            grants: file.grants,
            component: file.component,
            retention,
        })
    }
}

/// A delay such as `500ms`, `30s` or `10min`: how long a start waits.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration ({e}); write it like 500ms, 30s or 10min"))
}

/// A time such as `2026-11-26T18:00:00Z` (RFC 3339, any offset): when a
/// start may begin.
pub fn parse_start_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|at| at.with_timezone(&chrono::Utc))
        .map_err(|e| {
            format!("{text:?} is not an RFC 3339 time ({e}); write it like 2026-11-26T18:00:00Z")
        })
}

/// A retention age such as `30d`, `12h` or `90min`: at least a second.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let age = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write it like 30d, 12h or 90min")
    })?;
    if age < Duration::from_secs(1) {
        return Err(format!("{text:?} is shorter than a second"));
    }
    Ok(age)
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
        assert_eq!(manifest.limits.max_attempts, 1);
        assert_eq!(manifest.grants.env, ["LANG"]);
        assert!(!manifest.grants.dirs[0].writable);
        let retried = "[limits]\nretry_on_node_loss = true\n";
        let retried = Manifest::parse(retried, &ModuleLimits::default(), CEILING).unwrap();
        assert_eq!(retried.limits.max_attempts, 3);
        let kept = "[retention]\nkeep = \"7d\"\nkeep_failed = \"12h\"\n";
        let kept = Manifest::parse(kept, &ModuleLimits::default(), CEILING).unwrap();
        assert_eq!(kept.retention.keep, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(
            kept.retention.keep_failed,
            Some(Duration::from_secs(12 * 3600))
        );
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        for (text, expected) in [
            ("[limits]\ntimeout_secs = -1\n", "timeout_secs"),
            ("[limits]\nmemory_mib = 4096\n", "ceiling"),
            ("[limits]\nmax_concurrent = 0\n", "max_concurrent"),
            (
                "[limits]\nmax_concurrent = 9223372036854775807\n",
                "from 1 to 10000",
            ),
            ("[limits]\nmax_output_kib = 0\n", "max_output_kib"),
            ("[limits]\nmax_attempts = 3\n", "needs retry_on_node_loss"),
            ("[retention]\nkeep = \"soon\"\n", "retention.keep"),
            (
                "[retention]\nkeep_failed = \"0s\"\n",
                "shorter than a second",
            ),
            ("[retention]\nkeep_all = \"1d\"\n", "unknown field"),
            (
                "[limits]\nretry_on_node_loss = true\nmax_attempts = 11\n",
                "from 2 to 10",
            ),
            ("[limits]\nmax_output_kib = 65537\n", "max_output_kib"),
            ("[limits]\nmemory_mib = 0\n", "memory_mib"),
            ("[limits]\ntimeout_secs = inf\n", "timeout_secs"),
            ("[limits]\ntimeout_secs = nan\n", "timeout_secs"),
            ("[component]\nallow_symlink = 1\n", ""),
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
