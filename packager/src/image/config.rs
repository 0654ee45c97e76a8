//! What an image records of its app's configuration (`fuse.toml`, parsed by
//! `crate::build::config`): serde types only, read back by `fuse run` without the app's files.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Variables fuse sets itself from the selected environment; the config cannot set them.
pub(crate) const RESERVED_ENV: &[&str] = &["FUSE_ENV"];

/// What a health check probes (ports resolved to guest port numbers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum HealthProbe {
    /// An HTTP GET of `path` that must answer `status` (default: any 2xx).
    Http {
        path: String,
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
    /// A TCP connection that must be accepted.
    Tcp { port: u16 },
}

/// `healthcheck = { ... }`, as baked into the image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Healthcheck {
    pub(crate) probe: HealthProbe,
    pub(crate) timeout_secs: u64,
}

/// The parts of a configuration an image carries (in its manifest), so `fuse run IMAGE` knows
/// them without the app's files. Empty for images built without a configuration, which keeps
/// their manifests (and digests) as they were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImageConfig {
    /// The baked environments, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) environments: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) default_environment: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) ports: BTreeMap<String, u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) memory: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cpus: Option<u32>,
    /// `[deploy] protected`: the environments `fuse deploy` sends this image to only with a
    /// passing `fuse test` result for its digest (or `--force`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) protected: Vec<String>,
}

impl ImageConfig {
    pub(crate) fn is_empty(&self) -> bool {
        *self == ImageConfig::default()
    }
}

/// Checks an environment variable name: what a process environment can hold, without the
/// surprises (no `=`, whitespace or NUL).
pub(crate) fn check_env_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the variable name is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '=' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("variable name '{name}' contains {c:?}"));
    }
    if RESERVED_ENV.contains(&name) {
        return Err(format!(
            "{name} is set by fuse from the selected environment: select it with --env"
        ));
    }
    Ok(())
}
