//! `fuse.toml`: the optional configuration file of an app (reference: `docs/config.md`).
//!
//! Where it is: beside a file input (`dir/app` reads `dir/fuse.toml`), inside a directory
//! input (`dir/fuse.toml`), or wherever `--config PATH` says. Layering, lowest first:
//!
//! 1. `fuse.toml` (the main file);
//! 2. `fuse-<env>.toml` beside it (for `--config dir/x.toml`: `dir/x-<env>.toml`): the
//!    settings of environment `<env>`, with the schema of an `[environments.<env>]` table
//!    (`env`, `files`, `args`), merged over it key by key; such a file alone defines `<env>`.
//!    They are read only when the main file exists;
//! 3. command-line flags (`--name`, `--memory`, `-e`...), applied by their commands.
//!
//! Every error names the file and, when it is about a place in it, `file:line:column`.
//! Unknown keys are errors: a typo must not silently do nothing.

use crate::build::compression::RootfsCompression;
use crate::build::layout::{self, Accounts, AppUser};
use crate::image::config::{check_env_name, HealthProbe, Healthcheck, ImageConfig};
use crate::image::naming::{self, ImageName};
use anyhow::{bail, Context, Result};
use fuse_boot::spec::validate_environment_name;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// The main configuration file's name.
pub(crate) const FILE_NAME: &str = "fuse.toml";
/// How long a health check waits by default.
pub(crate) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// A place in a configuration file, `file:line:column`, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin(pub String);

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A file of the image that comes from the host: `image path = "host path"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigFile {
    /// Resolved against the directory of the file that named it.
    pub(crate) host: PathBuf,
    pub(crate) origin: Origin,
}

/// One environment's settings (`[environments.<name>]` merged with `fuse-<name>.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Environment {
    /// Variables set in this environment, over the top-level `[env]`.
    pub(crate) env: BTreeMap<String, String>,
    /// Config files by absolute image path.
    pub(crate) files: BTreeMap<String, ConfigFile>,
    /// Arguments replacing the image's `args` in this environment.
    pub(crate) args: Option<Vec<String>>,
}

/// The `[test]` table: what `fuse test` checks when no expectation flag is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TestConfig {
    pub(crate) exit_code: Option<i32>,
    /// Regular expressions the output must match.
    pub(crate) output: Vec<String>,
    /// Substrings the output must contain.
    pub(crate) contains: Vec<String>,
    /// `GET path` must answer this status.
    pub(crate) http: Option<TestHttp>,
    pub(crate) environment: Option<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) timeout: Option<Duration>,
}

/// `[test] http = { path = "/health", status = 200, port = "http" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestHttp {
    pub(crate) path: String,
    pub(crate) status: u16,
    /// Guest port; `None`: the health check's port, else the only named port.
    pub(crate) port: Option<u16>,
}

/// A loaded, validated configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct Config {
    /// The main file (the directory of relative paths in it).
    pub(crate) path: PathBuf,
    /// The `fuse-<env>.toml` files that were merged, in order.
    pub(crate) layers: Vec<PathBuf>,
    pub(crate) name: Option<String>,
    pub(crate) version: Option<String>,
    /// `repository`: where `fuse push IMAGE` sends an image of this name never pushed yet
    /// (`registry/repository`, checked; the tag is the image's version).
    pub(crate) repository: Option<String>,
    pub(crate) kind: Option<(String, Origin)>,
    /// Root filesystem compression (`--compression` wins).
    pub(crate) compression: Option<RootfsCompression>,
    /// Arguments after argv\[0\], replacing the runtime's.
    pub(crate) args: Option<Vec<String>>,
    /// Named guest ports.
    pub(crate) ports: BTreeMap<String, u16>,
    pub(crate) healthcheck: Option<Healthcheck>,
    pub(crate) memory: Option<u32>,
    pub(crate) cpus: Option<u32>,
    /// `user`: who the app runs as; `None`: [`AppUser::NONROOT`].
    pub(crate) user: Option<AppUser>,
    /// `capabilities` (with `user = "root"` only): the few root keeps, by number; `None`:
    /// every one.
    pub(crate) capabilities: Option<Capabilities>,
    /// `[users]` and `[groups]`: more names in the image's `/etc/passwd` and `/etc/group`.
    pub(crate) accounts: Accounts,
    /// Variables for every environment (and for images without environments).
    pub(crate) env: BTreeMap<String, String>,
    /// Files for every environment, at their path in the image.
    pub(crate) files: BTreeMap<String, ConfigFile>,
    pub(crate) environments: BTreeMap<String, Environment>,
    /// Resolved: the configured one, else `dev` if defined, else the only one.
    pub(crate) default_environment: Option<String>,
    /// `[jvm]`, `[node]`, `[python]`: left for the runtime of that kind to read.
    pub(crate) runtime: BTreeMap<String, toml::Table>,
    /// `[sysroot] packages`: Debian packages fuse adds to its sysroot of a foreign arch.
    pub(crate) sysroot_packages: Vec<String>,
    pub(crate) test: TestConfig,
    /// `[deploy] protected`, sorted.
    pub(crate) protected: Vec<String>,
    /// Where `default_environment` was set, for the message when it names no environment.
    default_origin: Option<Origin>,
}

impl Config {
    /// Finds and loads the configuration of `input`: `explicit` (`--config`) if given, else
    /// `fuse.toml` beside a file input or inside a directory input. `None` when there is none.
    pub(crate) fn discover(input: &Path, explicit: Option<&Path>) -> Result<Option<Config>> {
        if let Some(path) = explicit {
            if !path.is_file() {
                bail!(
                    "Configuration file {} not found: check the --config path",
                    path.display()
                );
            }
            return Config::load(path).map(Some);
        }
        let dir = if input.is_dir() {
            input.to_path_buf()
        } else {
            match input.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            }
        };
        let path = dir.join(FILE_NAME);
        if path.is_file() {
            Config::load(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Loads `path` and its `<stem>-<env>.toml` layers.
    pub(crate) fn load(path: &Path) -> Result<Config> {
        let text = read(path)?;
        let raw: RawConfig = parse(path, &text)?;
        let mut config = Config::from_raw(path, &text, raw)?;
        for (env_name, layer) in layer_files(path)? {
            let text = read(&layer)?;
            let raw: RawEnvironment = parse(&layer, &text)?;
            let src = Source::new(&layer, &text);
            let section = format!("[env] of environment {env_name}");
            let target = config.environments.entry(env_name.clone()).or_default();
            merge_environment(&src, &section, target, raw)?;
            config.layers.push(layer);
        }
        config.finish()?;
        Ok(config)
    }

    /// Parses a configuration from text (for tests; `path` names it in messages and anchors
    /// relative paths). No layers are read.
    #[cfg(test)]
    pub(crate) fn from_str(path: &Path, text: &str) -> Result<Config> {
        let raw: RawConfig = parse(path, text)?;
        let mut config = Config::from_raw(path, text, raw)?;
        config.finish()?;
        Ok(config)
    }

    fn from_raw(path: &Path, text: &str, raw: RawConfig) -> Result<Config> {
        let src = Source::new(path, text);
        let mut config = Config {
            path: path.to_path_buf(),
            ..Config::default()
        };
        if let Some(name) = raw.name {
            let origin = src.origin(name.span());
            let checked =
                naming::parse(name.get_ref()).with_context(|| format!("{origin}: invalid name"))?;
            if name.get_ref().contains(':') {
                bail!(
                    "{origin}: name '{}' has a version: put it in `version = \"{}\"`",
                    name.get_ref(),
                    checked.version
                );
            }
            config.name = Some(checked.name);
        }
        if let Some(version) = raw.version {
            let origin = src.origin(version.span());
            let probe = format!("x:{}", version.get_ref());
            naming::parse(&probe).with_context(|| format!("{origin}: invalid version"))?;
            config.version = Some(version.into_inner());
        }
        if let Some(repository) = raw.repository {
            let origin = src.origin(repository.span());
            let text = repository.into_inner();
            if let Err(why) = check_repository(&text) {
                bail!("{origin}: repository '{text}' {why}: write HOST[:PORT]/REPOSITORY, e.g. registry.example.com:5000/team/app (the image's version is the tag)");
            }
            config.repository = Some(text);
        }
        config.kind = raw.kind.map(|k| {
            let origin = src.origin(k.span());
            (k.into_inner(), origin)
        });
        if let Some(c) = raw.compression {
            let origin = src.origin(c.span());
            let parsed = c.get_ref().parse::<RootfsCompression>().map_err(|_| {
                anyhow::anyhow!(
                    "{origin}: unknown compression '{}': use \"fast\" (zstd), \"balanced\" (zstd 19) or \"small\" (xz)",
                    c.get_ref()
                )
            })?;
            config.compression = Some(parsed);
        }
        config.args = raw.args;
        for (name, port) in raw.ports {
            let origin = src.origin(name.span());
            check_identifier(&origin, "port name", name.get_ref())?;
            if *port.get_ref() == 0 {
                bail!(
                    "{}: port {} must be 1 to 65535",
                    src.origin(port.span()),
                    name.get_ref()
                );
            }
            config.ports.insert(name.into_inner(), port.into_inner());
        }
        config.memory = positive(&src, "memory", raw.memory)?;
        config.cpus = positive(&src, "cpus", raw.cpus)?;
        let mut origins = BTreeMap::new();
        config.accounts = accounts_from(&src, raw.users, raw.groups, &mut origins)?;
        if let Some(user) = raw.user {
            config.user = Some(user_from(&src, user, &config.accounts)?);
        }
        if let Some(caps) = raw.capabilities {
            config.capabilities = Some(capabilities_from(&src, caps, config.user)?);
        }
        // Collisions with root, the app's user and each other: what the image would get.
        let app = config.user.unwrap_or(AppUser::NONROOT);
        if let Err(e) = layout::etc(app, &config.accounts) {
            let origin = origins
                .get(&(e.table, e.entry))
                .cloned()
                .unwrap_or_else(|| Origin(path.display().to_string()));
            bail!("{origin}: {}", e.message);
        }
        config.env = env_table(&src, "[env]", raw.env)?;
        config.files = files_table(&src, raw.files)?;
        for (name, table) in raw.environments {
            let origin = src.origin(name.span());
            validate_environment_name(name.get_ref()).with_context(|| origin.to_string())?;
            let section = format!("[environments.{}.env]", name.get_ref());
            let target = config.environments.entry(name.into_inner()).or_default();
            merge_environment(&src, &section, target, table)?;
        }
        if let Some(healthcheck) = raw.healthcheck {
            config.healthcheck = Some(healthcheck_from(&src, &config.ports, healthcheck)?);
        }
        if let Some(default) = raw.default_environment {
            // Checked against the environments in finish(), after the layers are read.
            config.default_origin = Some(src.origin(default.span()));
            config.default_environment = Some(default.into_inner());
        }
        for (table, value) in [("jvm", raw.jvm), ("node", raw.node), ("python", raw.python)] {
            if let Some(value) = value {
                config.runtime.insert(table.to_string(), value);
            }
        }
        if let Some(test) = raw.test {
            config.test = test_from(&src, &config.ports, test)?;
        }
        if let Some(deploy) = raw.deploy {
            for name in deploy.protected {
                let origin = src.origin(name.span());
                validate_environment_name(name.get_ref()).with_context(|| origin.to_string())?;
                config.protected.push(name.into_inner());
            }
            config.protected.sort();
            config.protected.dedup();
        }
        if let Some(sysroot) = raw.sysroot {
            for name in sysroot.packages {
                let origin = src.origin(name.span());
                check_package_name(name.get_ref()).with_context(|| origin.to_string())?;
                config.sysroot_packages.push(name.into_inner());
            }
        }
        Ok(config)
    }

    /// Checks what needs the whole picture and resolves the default environment.
    fn finish(&mut self) -> Result<()> {
        let origin = self
            .default_origin
            .clone()
            .unwrap_or_else(|| Origin(self.path.display().to_string()));
        let names = self.environment_names();
        self.default_environment = match self.default_environment.take() {
            Some(name) if self.environments.contains_key(&name) => Some(name),
            Some(name) => bail!(
                "{origin}: default_environment '{name}' is not defined (defined: {}): add [environments.{name}]",
                list_or_none(&names)
            ),
            None if self.environments.is_empty() => None,
            None if self.environments.contains_key("dev") => Some("dev".into()),
            None if self.environments.len() == 1 => Some(names[0].clone()),
            // No default to guess: every run names one (`fuse run` refuses without --env).
            None => None,
        };
        if let Some(env) = &self.test.environment {
            if !self.environments.contains_key(env) {
                bail!(
                    "{}: [test] environment '{env}' is not defined (defined: {})",
                    self.path.display(),
                    list_or_none(&names)
                );
            }
        }
        Ok(())
    }

    /// The environment names, sorted.
    pub(crate) fn environment_names(&self) -> Vec<String> {
        self.environments.keys().cloned().collect()
    }

    /// `name:version` from the configuration, for images built without `--name`: each part
    /// configured, else derived from the input.
    pub(crate) fn image_name(&self, derived: &ImageName) -> Option<ImageName> {
        if self.name.is_none() && self.version.is_none() {
            return None;
        }
        Some(ImageName {
            name: self.name.clone().unwrap_or_else(|| derived.name.clone()),
            version: self
                .version
                .clone()
                .unwrap_or_else(|| derived.version.clone()),
        })
    }

    /// A runtime's option table (`[jvm]`...), if the configuration has one.
    pub(crate) fn runtime_table(&self, runtime: &str) -> Option<&toml::Table> {
        self.runtime.get(runtime)
    }

    /// A string setting of a runtime's table (`[jvm] main_class = "org.h2.tools.Server"`).
    pub(crate) fn runtime_string(&self, runtime: &str, key: &str) -> Result<Option<String>> {
        let Some(value) = self.runtime_table(runtime).and_then(|t| t.get(key)) else {
            return Ok(None);
        };
        match value.as_str() {
            Some(text) if !text.trim().is_empty() => Ok(Some(text.to_string())),
            _ => bail!(
                "{}: [{runtime}] {key} must be a non-empty string",
                self.path.display()
            ),
        }
    }

    /// A true/false setting of a runtime's table (`[jvm] cds = true`); `None` when absent.
    pub(crate) fn runtime_bool(&self, runtime: &str, key: &str) -> Result<Option<bool>> {
        let Some(value) = self.runtime_table(runtime).and_then(|t| t.get(key)) else {
            return Ok(None);
        };
        match value.as_bool() {
            Some(b) => Ok(Some(b)),
            None => bail!(
                "{}: [{runtime}] {key} must be true or false",
                self.path.display()
            ),
        }
    }

    /// The `options = [...]` of a runtime's table (`[jvm] options = ["-Xmx256m"]`).
    pub(crate) fn runtime_options(&self, runtime: &str) -> Result<Vec<String>> {
        let Some(value) = self.runtime_table(runtime).and_then(|t| t.get("options")) else {
            return Ok(Vec::new());
        };
        let items = value.as_array().map(|a| {
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        });
        match items {
            Some(Some(options)) => Ok(options),
            _ => bail!(
                "{}: [{runtime}] options must be a list of strings",
                self.path.display()
            ),
        }
    }

    /// What the image records of this configuration.
    pub(crate) fn image_config(&self) -> ImageConfig {
        ImageConfig {
            environments: self.environment_names(),
            default_environment: self.default_environment.clone(),
            ports: self.ports.clone(),
            healthcheck: self.healthcheck.clone(),
            memory: self.memory,
            cpus: self.cpus,
            protected: self.protected.clone(),
        }
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// What is wrong with a `repository` (`HOST[:PORT]/PATH`, no tag), if anything; `fuse push`
/// parses it fully as a registry reference (a room `build` does not use).
fn check_repository(text: &str) -> std::result::Result<(), &'static str> {
    let Some((host, path)) = text.split_once('/') else {
        return Err("names no registry host");
    };
    if !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err("names no registry host (one with a '.' or a ':', or localhost)");
    }
    if text.contains('@') || path.rsplit('/').next().is_some_and(|l| l.contains(':')) {
        return Err("has a tag or digest");
    }
    let component = |c: &str| {
        !c.is_empty()
            && c.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    };
    if !path.split('/').all(component) {
        return Err("has an invalid repository name (lowercase letters, digits, '.', '_', '-')");
    }
    Ok(())
}

/// Parses a duration: `30s`, `2m`, `500ms`, or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    match unit.trim() {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" | "min" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

// ---- raw schema (what serde reads; spans kept where messages need them) ----------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Option<Spanned<String>>,
    version: Option<Spanned<String>>,
    repository: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    compression: Option<Spanned<String>>,
    args: Option<Vec<String>>,
    #[serde(default)]
    ports: BTreeMap<Spanned<String>, Spanned<u16>>,
    healthcheck: Option<Spanned<RawHealthcheck>>,
    memory: Option<Spanned<u32>>,
    cpus: Option<Spanned<u32>>,
    user: Option<Spanned<UserValue>>,
    capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    users: BTreeMap<Spanned<String>, Spanned<UserValue>>,
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, Spanned<UserValue>>,
    default_environment: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<EnvValue>>,
    #[serde(default)]
    files: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    environments: BTreeMap<Spanned<String>, RawEnvironment>,
    jvm: Option<toml::Table>,
    node: Option<toml::Table>,
    python: Option<toml::Table>,
    sysroot: Option<RawSysroot>,
    test: Option<RawTest>,
    deploy: Option<RawDeploy>,
}

/// `[deploy]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeploy {
    #[serde(default)]
    protected: Vec<Spanned<String>>,
}

/// `[sysroot]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSysroot {
    #[serde(default)]
    packages: Vec<Spanned<String>>,
}

/// `[environments.<name>]`, and the whole of a `fuse-<name>.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<EnvValue>>,
    #[serde(default)]
    files: BTreeMap<Spanned<String>, Spanned<String>>,
    args: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthcheck {
    http: Option<String>,
    tcp: Option<PortRef>,
    port: Option<PortRef>,
    status: Option<u16>,
    timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    exit_code: Option<i32>,
    output: Option<OneOrMany>,
    contains: Option<OneOrMany>,
    http: Option<Spanned<RawTestHttp>>,
    environment: Option<String>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<EnvValue>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTestHttp {
    path: String,
    #[serde(default = "ok_status")]
    status: u16,
    port: Option<PortRef>,
}

fn ok_status() -> u16 {
    200
}

/// A port by name (`"http"`, from `[ports]`) or number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PortRef {
    Number(u16),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `user = "root"`, `"nonroot"`, `1000`, `"1000"` or `"1000:1000"`; in `[users]` and `[groups]`,
/// the ids alone.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum UserValue {
    Id(i64),
    Name(String),
}

/// An environment value: a string, or a number, boolean or date written without quotes. Read as
/// any TOML value so that a wrong one is reported with its key and place (see `env_table`),
/// not as serde's "did not match any variant".
type EnvValue = toml::Value;

/// The text of an environment value, or what it wrongly is.
fn env_text(value: EnvValue) -> Result<String, &'static str> {
    match value {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) => Err("an array"),
        toml::Value::Table(_) => Err("a table"),
    }
}

// ---- from raw to checked -----------------------------------------------------------------------

/// A file's text, to turn byte spans into `file:line:column`.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl<'a> Source<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        Source { path, text }
    }

    fn origin(&self, span: Range<usize>) -> Origin {
        let (line, column) = line_column(self.text, span.start);
        Origin(format!("{}:{line}:{column}", self.path.display()))
    }

    /// Where relative paths in this file are resolved.
    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("Cannot read the configuration file {}", path.display()))
}

/// Deserializes with errors as one line: `file:line:column: message`.
fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                anyhow::anyhow!("{}:{line}:{column}: {message}", path.display())
            }
            None => anyhow::anyhow!("{}: {message}", path.display()),
        }
    })
}

/// The `<stem>-<env>.toml` files beside `main`, sorted by environment name.
fn layer_files(main: &Path) -> Result<Vec<(String, PathBuf)>> {
    let Some(stem) = main.file_stem().and_then(|s| s.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match main.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{stem}-");
    let mut layers = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .with_context(|| format!("Cannot list {} for {prefix}<env>.toml", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(env_name) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".toml"))
        else {
            continue;
        };
        let path = entry.path();
        validate_environment_name(env_name).with_context(|| {
            format!(
                "{}: the file name gives environment '{env_name}'",
                path.display()
            )
        })?;
        layers.push((env_name.to_string(), path));
    }
    layers.sort();
    Ok(layers)
}

fn positive(src: &Source<'_>, key: &str, value: Option<Spanned<u32>>) -> Result<Option<u32>> {
    match value {
        Some(v) => match at_least_one(key, *v.get_ref()) {
            Ok(n) => Ok(Some(n)),
            Err(e) => bail!("{}: {e}", src.origin(v.span())),
        },
        None => Ok(None),
    }
}

/// The least guest memory, in MiB, `fuse run` accepts: a static hello boots with 22 on both
/// arches (README, Figures), 24 keeps a margin. Below 22 the kernel does not even print.
pub(crate) const MIN_MEMORY_MIB: u32 = 24;

/// The one check on `memory` and `cpus`, from fuse.toml or a flag: 0 would let QEMU pick its
/// own default silently, and too little memory boots a VM that dies without a word.
pub(crate) fn at_least_one(key: &str, n: u32) -> std::result::Result<u32, String> {
    if key == "memory" && n < MIN_MEMORY_MIB {
        return Err(format!(
            "memory must be at least {MIN_MEMORY_MIB} (MiB): fuse's machines need that much to boot"
        ));
    }
    if n == 0 {
        return Err(format!("{key} must be at least 1"));
    }
    Ok(n)
}

/// An id `setuid(2)` can take: u32::MAX is its "no change".
fn id_number(n: i64) -> Option<u32> {
    u32::try_from(n).ok().filter(|&n| n != u32::MAX)
}

fn id_text(text: &str) -> Option<u32> {
    text.parse::<u32>().ok().filter(|&n| n != u32::MAX)
}

/// `UID`, `"UID"` or `"UID:GID"` (the gid is the uid when not given).
fn user_ids(value: &UserValue) -> Option<AppUser> {
    match value {
        UserValue::Id(n) => id_number(*n).map(|uid| AppUser { uid, gid: uid }),
        UserValue::Name(text) => match text.split_once(':') {
            Some((uid, gid)) => id_text(uid)
                .zip(id_text(gid))
                .map(|(uid, gid)| AppUser { uid, gid }),
            None => id_text(text).map(|uid| AppUser { uid, gid: uid }),
        },
    }
}

fn user_from(src: &Source<'_>, user: Spanned<UserValue>, accounts: &Accounts) -> Result<AppUser> {
    let origin = src.origin(user.span());
    let value = user.into_inner();
    let parsed = match &value {
        UserValue::Name(name) if name == "root" => Some(AppUser::ROOT),
        UserValue::Name(name) if name == "nonroot" => Some(AppUser::NONROOT),
        UserValue::Name(name) => match accounts.users.get(name) {
            Some(&(uid, gid)) => Some(AppUser { uid, gid }),
            None => user_ids(&value),
        },
        UserValue::Id(_) => user_ids(&value),
    };
    parsed.with_context(|| {
        format!("{origin}: invalid user: use \"nonroot\" (the default), \"root\", a name from [users], a uid (1000) or \"UID:GID\"")
    })
}

/// The capabilities a root app keeps (`capabilities = ["setuid", "setgid", "chown"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Capabilities {
    /// Bit N: capability N (`<linux/capability.h>`), as the app spec carries it.
    pub(crate) mask: u64,
    /// Their names, by number.
    pub(crate) names: Vec<&'static str>,
}

/// capabilities(7)'s names without `CAP_`, lowercase, by number (Linux 6.12: 0 to 40).
const CAPABILITY_NAMES: &[&str] = &[
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

fn capabilities_from(
    src: &Source<'_>,
    caps: Spanned<Vec<Spanned<String>>>,
    user: Option<AppUser>,
) -> Result<Capabilities> {
    if user.is_none_or(|u| u.uid != 0) {
        bail!(
            "{}: capabilities are what a root app keeps: they need user = \"root\" (any other user has none)",
            src.origin(caps.span())
        );
    }
    let mut mask = 0u64;
    for name in caps.into_inner() {
        // `CAP_SETUID` and `setuid` alike: the names of capabilities(7) and of capsh.
        let wanted = name.get_ref().to_ascii_lowercase();
        let wanted = wanted.strip_prefix("cap_").unwrap_or(&wanted);
        let Some(bit) = CAPABILITY_NAMES.iter().position(|n| *n == wanted) else {
            bail!(
                "{}: unknown capability '{}': use the names of capabilities(7) (setuid, setgid, chown, net_bind_service...)",
                src.origin(name.span()),
                name.get_ref()
            );
        };
        mask |= 1 << bit;
    }
    let names = CAPABILITY_NAMES
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, name)| *name)
        .collect();
    Ok(Capabilities { mask, names })
}

/// A user or group name as `useradd` takes it by default: what every tool reading
/// `/etc/passwd` copes with.
fn check_account_name(origin: &Origin, table: &str, name: &str) -> Result<()> {
    let ok = name.len() <= 32
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !ok {
        bail!("{origin}: invalid name '{name}' in [{table}]: use at most 32 lowercase letters, digits, '_' and '-', starting with a letter or '_'");
    }
    if name == "root" || name == "nonroot" {
        bail!("{origin}: [{table}] cannot define {name}, fuse's own (`user = \"{name}\"` runs the app as it)");
    }
    Ok(())
}

/// A Debian package name (policy 5.6.1: lower-case letters, digits, `+`, `-`, `.`, at least two
/// characters, starting with a letter or digit); refused before anything reaches apt.
pub(crate) fn check_package_name(name: &str) -> Result<()> {
    let ok = name.len() >= 2
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if !ok {
        bail!("invalid Debian package name '{name}': use lower-case letters, digits, '+', '-' and '.' (e.g. libssl3)");
    }
    Ok(())
}

/// `[users] www-data = 33` (or `"33:33"`), `[groups] adm = 4`: each entry's name and ids;
/// `origins` gets each entry's place, for the collisions [`layout::etc`] finds.
fn accounts_from(
    src: &Source<'_>,
    users: BTreeMap<Spanned<String>, Spanned<UserValue>>,
    groups: BTreeMap<Spanned<String>, Spanned<UserValue>>,
    origins: &mut BTreeMap<(layout::Table, String), Origin>,
) -> Result<Accounts> {
    let mut accounts = Accounts::default();
    for (name, value) in users {
        let origin = src.origin(name.span());
        check_account_name(&origin, "users", name.get_ref())?;
        let ids = user_ids(value.get_ref()).with_context(|| {
            format!(
                "{}: invalid ids for user {}: use a uid (33) or \"UID:GID\" (\"33:33\")",
                src.origin(value.span()),
                name.get_ref()
            )
        })?;
        origins.insert((layout::Table::Users, name.get_ref().clone()), origin);
        accounts.users.insert(name.into_inner(), (ids.uid, ids.gid));
    }
    for (name, value) in groups {
        let origin = src.origin(name.span());
        check_account_name(&origin, "groups", name.get_ref())?;
        let gid = match value.get_ref() {
            UserValue::Id(n) => id_number(*n),
            UserValue::Name(text) => id_text(text),
        }
        .with_context(|| {
            format!(
                "{}: invalid gid for group {}: use a number (4)",
                src.origin(value.span()),
                name.get_ref()
            )
        })?;
        origins.insert((layout::Table::Groups, name.get_ref().clone()), origin);
        accounts.groups.insert(name.into_inner(), gid);
    }
    Ok(accounts)
}

fn check_identifier(origin: &Origin, what: &str, name: &str) -> Result<()> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        bail!("{origin}: invalid {what} '{name}': use letters, digits, '_' and '-'");
    }
    Ok(())
}

/// The variables of an env table: `section` is where it is (`[env]`, `[test.env]`, …).
fn env_table(
    src: &Source<'_>,
    section: &str,
    table: BTreeMap<Spanned<String>, Spanned<EnvValue>>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (name, value) in table {
        let value_origin = src.origin(value.span());
        let value = match env_text(value.into_inner()) {
            Ok(text) => text,
            // `[env.prod]` for `[environments.prod.env]`: say where that goes.
            Err("a table") if section == "[env]" => bail!(
                "{value_origin}: [env] holds variables (NAME = a string, number or boolean), and {0} is a table: variables of environment {0} go in [environments.{0}.env]",
                name.get_ref()
            ),
            Err(kind) => bail!(
                "{value_origin}: {section} {} must be a string, number or boolean, not {kind}",
                name.get_ref()
            ),
        };
        if let Err(why) = check_env_name(name.get_ref()) {
            bail!("{}: {why}", src.origin(name.span()));
        }
        if value.contains('\0') {
            bail!(
                "{value_origin}: the value of {} contains a NUL byte",
                name.get_ref()
            );
        }
        out.insert(name.into_inner(), value);
    }
    Ok(out)
}

/// Image paths where a config file would be hidden or would break the image.
const FORBIDDEN_PREFIXES: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/etc/fuse",
    "/app/.fuse",
];

fn files_table(
    src: &Source<'_>,
    table: BTreeMap<Spanned<String>, Spanned<String>>,
) -> Result<BTreeMap<String, ConfigFile>> {
    let mut out = BTreeMap::new();
    for (image_path, host) in table {
        let origin = src.origin(image_path.span());
        let path = image_path.get_ref();
        fuse_rootfs::tree::validate_path(path)
            .map_err(|e| anyhow::anyhow!("{origin}: invalid image path '{path}': {e}"))?;
        if path == "/"
            || FORBIDDEN_PREFIXES
                .iter()
                .any(|p| path == p || path.starts_with(&format!("{p}/")))
        {
            bail!("{origin}: a config file cannot go to {path}: /proc, /sys, /dev, /run, /tmp, /etc/fuse and /app/.fuse are not part of the image's files");
        }
        if path == "/etc/passwd" || path == "/etc/group" {
            bail!("{origin}: fuse writes {path} (root and the app's user): add users in [users] (www-data = 33) and groups in [groups]");
        }
        let host_origin = src.origin(host.span());
        let host_path = src.dir().join(host.get_ref());
        if !host_path.is_file() {
            bail!(
                "{host_origin}: file {} not found (paths are relative to {})",
                host_path.display(),
                src.dir().display()
            );
        }
        out.insert(
            path.clone(),
            ConfigFile {
                host: host_path,
                origin: host_origin,
            },
        );
    }
    Ok(out)
}

fn merge_environment(
    src: &Source<'_>,
    env_section: &str,
    target: &mut Environment,
    raw: RawEnvironment,
) -> Result<()> {
    target.env.extend(env_table(src, env_section, raw.env)?);
    target.files.extend(files_table(src, raw.files)?);
    if raw.args.is_some() {
        target.args = raw.args;
    }
    Ok(())
}

fn resolve_port(
    src: &Source<'_>,
    span: Range<usize>,
    ports: &BTreeMap<String, u16>,
    port: &PortRef,
) -> Result<u16> {
    match port {
        PortRef::Number(0) => bail!("{}: port 0 is not a port", src.origin(span)),
        PortRef::Number(n) => Ok(*n),
        PortRef::Name(name) => ports.get(name).copied().with_context(|| {
            format!(
                "{}: port '{name}' is not in [ports] (defined: {})",
                src.origin(span),
                list_or_none(&ports.keys().cloned().collect::<Vec<_>>())
            )
        }),
    }
}

/// The port a check uses when none is named: the only named port.
fn only_port(ports: &BTreeMap<String, u16>) -> Option<u16> {
    (ports.len() == 1).then(|| *ports.values().next().expect("one port"))
}

fn healthcheck_from(
    src: &Source<'_>,
    ports: &BTreeMap<String, u16>,
    raw: Spanned<RawHealthcheck>,
) -> Result<Healthcheck> {
    let span = raw.span();
    let origin = src.origin(span.clone());
    let raw = raw.into_inner();
    let timeout = match &raw.timeout {
        None => DEFAULT_HEALTH_TIMEOUT,
        Some(t) => parse_duration(t).with_context(|| {
            format!("{origin}: healthcheck timeout '{t}' is not a duration like 30s or 2m")
        })?,
    };
    let probe = match (raw.http, raw.tcp) {
        (Some(path), None) => {
            if !path.starts_with('/') {
                bail!("{origin}: healthcheck http path '{path}' must start with /");
            }
            let port = match &raw.port {
                Some(p) => resolve_port(src, span.clone(), ports, p)?,
                None => only_port(ports).with_context(|| {
                    format!("{origin}: healthcheck needs `port = \"NAME\"` (one of [ports])")
                })?,
            };
            HealthProbe::Http {
                path,
                port,
                status: raw.status,
            }
        }
        (None, Some(port)) => {
            if raw.port.is_some() || raw.status.is_some() {
                bail!("{origin}: a tcp healthcheck takes only `tcp = PORT` and `timeout`");
            }
            HealthProbe::Tcp {
                port: resolve_port(src, span.clone(), ports, &port)?,
            }
        }
        _ => bail!(
            "{origin}: healthcheck needs exactly one of `http = \"/path\"` or `tcp = \"PORT\"`"
        ),
    };
    Ok(Healthcheck {
        probe,
        timeout_secs: timeout.as_secs().max(1),
    })
}

fn test_from(src: &Source<'_>, ports: &BTreeMap<String, u16>, raw: RawTest) -> Result<TestConfig> {
    let output = raw.output.map(OneOrMany::into_vec).unwrap_or_default();
    for pattern in &output {
        regex::Regex::new(pattern).with_context(|| {
            format!(
                "{}: [test] output '{pattern}' is not a valid regular expression",
                src.path.display()
            )
        })?;
    }
    let http = match raw.http {
        None => None,
        Some(h) => {
            let span = h.span();
            let h = h.into_inner();
            if !h.path.starts_with('/') {
                bail!(
                    "{}: [test] http path '{}' must start with /",
                    src.origin(span),
                    h.path
                );
            }
            let port = match &h.port {
                Some(p) => Some(resolve_port(src, span, ports, p)?),
                None => None,
            };
            Some(TestHttp {
                path: h.path,
                status: h.status,
                port,
            })
        }
    };
    let timeout = match raw.timeout {
        None => None,
        Some(t) => Some(parse_duration(t.get_ref()).with_context(|| {
            format!(
                "{}: [test] timeout '{}' is not a duration like 30s or 2m",
                src.origin(t.span()),
                t.get_ref()
            )
        })?),
    };
    Ok(TestConfig {
        exit_code: raw.exit_code,
        output,
        contains: raw.contains.map(OneOrMany::into_vec).unwrap_or_default(),
        http,
        environment: raw.environment,
        env: env_table(src, "[test.env]", raw.env)?,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        dir
    }

    fn load_err(files: &[(&str, &str)]) -> String {
        let dir = dir_with(files);
        format!(
            "{:#}",
            Config::load(&dir.path().join(FILE_NAME)).unwrap_err()
        )
    }

    const FULL: &str = r#"
name = "shop"
version = "2.1"
kind = "native"
compression = "small"
args = ["--serve"]
memory = 512
cpus = 2
default_environment = "prod"

[ports]
http = 8080
admin = 9090

[healthcheck]
http = "/health"
port = "http"
timeout = "30s"

[env]
LOG_LEVEL = "info"
WORKERS = 4
DEBUG = false

[files]
"/etc/shop/common.conf" = "conf/common.conf"

[environments.dev.env]
LOG_LEVEL = "debug"

[environments.prod]
args = ["--serve", "--fast"]
env = { DB_URL = "postgres://db/shop" }
files = { "/etc/shop/app.conf" = "conf/prod.conf" }

[jvm]
options = ["-Xmx256m"]

[test]
exit_code = 0
output = "listening on \\d+"
contains = ["ready"]
http = { path = "/health", status = 200, port = "http" }
environment = "dev"
timeout = "2m"
"#;

    #[test]
    fn full_file_parses() {
        let dir = dir_with(&[
            ("fuse.toml", FULL),
            ("conf/common.conf", "c"),
            ("conf/prod.conf", "p"),
        ]);
        let c = Config::load(&dir.path().join("fuse.toml")).unwrap();
        assert_eq!(c.name.as_deref(), Some("shop"));
        assert_eq!(c.version.as_deref(), Some("2.1"));
        assert_eq!(c.kind.as_ref().unwrap().0, "native");
        assert_eq!(c.compression, Some(RootfsCompression::Small));
        assert_eq!(c.args, Some(vec!["--serve".to_string()]));
        assert_eq!((c.memory, c.cpus), (Some(512), Some(2)));
        assert_eq!(c.ports["admin"], 9090);
        assert_eq!(
            c.healthcheck,
            Some(Healthcheck {
                probe: HealthProbe::Http {
                    path: "/health".into(),
                    port: 8080,
                    status: None
                },
                timeout_secs: 30
            })
        );
        assert_eq!(c.env["WORKERS"], "4");
        assert_eq!(c.env["DEBUG"], "false");
        assert_eq!(
            c.files["/etc/shop/common.conf"].host,
            dir.path().join("conf/common.conf")
        );
        assert_eq!(c.environment_names(), vec!["dev", "prod"]);
        assert_eq!(c.environments["dev"].env["LOG_LEVEL"], "debug");
        let prod = &c.environments["prod"];
        assert_eq!(prod.env["DB_URL"], "postgres://db/shop");
        assert_eq!(prod.args.as_ref().unwrap()[1], "--fast");
        assert!(prod.files.contains_key("/etc/shop/app.conf"));
        assert_eq!(c.default_environment.as_deref(), Some("prod"));
        assert_eq!(c.runtime_options("jvm").unwrap(), vec!["-Xmx256m"]);
        assert!(c.runtime_options("node").unwrap().is_empty());
        assert_eq!(c.test.exit_code, Some(0));
        assert_eq!(c.test.output, vec!["listening on \\d+"]);
        assert_eq!(c.test.http.as_ref().unwrap().port, Some(8080));
        assert_eq!(c.test.timeout, Some(Duration::from_secs(120)));
        let image = c.image_config();
        assert_eq!(image.environments, vec!["dev", "prod"]);
        assert!(!image.is_empty());
    }

    #[test]
    fn protected_environments_are_baked() {
        let dir = dir_with(&[(
            "fuse.toml",
            "[deploy]\nprotected = [\"prod\", \"eu-prod\", \"prod\"]\n",
        )]);
        let c = Config::load(&dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(c.image_config().protected, vec!["eu-prod", "prod"]);
        let dir = dir_with(&[("fuse.toml", "[deploy]\nprotected = [\"a b\"]\n")]);
        let err = format!(
            "{:#}",
            Config::load(&dir.path().join(FILE_NAME)).unwrap_err()
        );
        assert!(err.contains("fuse.toml:2"), "{err}");
    }

    #[test]
    fn repository_is_where_a_push_goes_without_a_tag() {
        let dir = dir_with(&[(
            "fuse.toml",
            "repository = \"reg.example.com:5000/team/shop\"\n",
        )]);
        let c = Config::load(&dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(
            c.repository.as_deref(),
            Some("reg.example.com:5000/team/shop")
        );
        let err = load_err(&[("fuse.toml", "repository = \"reg.example.com/shop:1.0\"\n")]);
        assert!(
            err.contains("fuse.toml:1:14: repository 'reg.example.com/shop:1.0' has a tag"),
            "{err}"
        );
        for (bad, why) in [
            ("shop", "names no registry host"),
            ("team/shop", "names no registry host"),
            ("reg.io/Team/shop", "has an invalid repository name"),
            ("reg.io/shop@sha256:00", "has a tag or digest"),
        ] {
            let err = load_err(&[("fuse.toml", &format!("repository = \"{bad}\"\n"))]);
            assert!(
                err.contains(&format!("fuse.toml:1:14: repository '{bad}' {why}")),
                "{err}"
            );
            assert!(err.contains("write HOST[:PORT]/REPOSITORY"), "{err}");
        }
    }

    #[test]
    fn layers_merge_over_the_main_file() {
        let dir = dir_with(&[
            (
                "fuse.toml",
                "default_environment = \"prod\"\n[env]\nA = \"1\"\n[environments.prod.env]\nX = \"main\"\nY = \"main\"\n",
            ),
            ("fuse-prod.toml", "args = [\"--prod\"]\n[env]\nY = \"layer\"\n"),
            ("fuse-staging.toml", "[files]\n\"/etc/a.conf\" = \"a.conf\"\n"),
            ("a.conf", "staging"),
            ("other-dev.toml", "bogus = 1\n"),
        ]);
        let c = Config::load(&dir.path().join("fuse.toml")).unwrap();
        assert_eq!(c.environment_names(), vec!["prod", "staging"]);
        let prod = &c.environments["prod"];
        assert_eq!(prod.env["X"], "main");
        assert_eq!(prod.env["Y"], "layer", "the layer wins");
        assert_eq!(prod.args, Some(vec!["--prod".to_string()]));
        assert!(c.environments["staging"].files.contains_key("/etc/a.conf"));
        assert_eq!(c.layers.len(), 2);
    }

    #[test]
    fn a_wrong_env_value_says_what_the_key_expects_and_where() {
        let load = |text: &str| {
            format!(
                "{:#}",
                Config::from_str(Path::new("/x/fuse.toml"), text).unwrap_err()
            )
        };
        let err = load("name = \"a\"\n[env.prod]\nTOKEN = \"p\"\n");
        assert!(
            err.starts_with("/x/fuse.toml:2:1: [env] holds variables")
                && err.contains("prod is a table")
                && err.contains("[environments.prod.env]")
                && !err.contains("untagged"),
            "{err}"
        );
        let err = load("[environments.qa.env]\nPORTS = [1, 2]\n");
        assert!(
            err.starts_with("/x/fuse.toml:2:9: [environments.qa.env] PORTS must be a string, number or boolean, not an array"),
            "{err}"
        );
        let err = load("[test.env]\nX = { a = 1 }\n");
        assert!(err.contains("[test.env] X must be"), "{err}");
        // Numbers, booleans and dates are written as text.
        let c = Config::from_str(
            Path::new("/x/fuse.toml"),
            "[env]\nN = 3\nB = true\nD = 2024-01-02\n",
        )
        .unwrap();
        assert_eq!(c.env["N"], "3");
        assert_eq!(c.env["B"], "true");
        assert_eq!(c.env["D"], "2024-01-02");
    }

    #[test]
    fn default_environment_rules() {
        let load = |text: &str| Config::from_str(Path::new("/x/fuse.toml"), text);
        assert_eq!(load("").unwrap().default_environment, None);
        let err = format!("{:#}", load("compression = \"tiny\"\n").unwrap_err());
        assert!(
            err.contains("fuse.toml:1:15: unknown compression 'tiny'") && err.contains("\"small\""),
            "{err}"
        );
        let one = load("[environments.prod.env]\nA = \"1\"\n").unwrap();
        assert_eq!(one.default_environment.as_deref(), Some("prod"));
        let dev = load("[environments.prod]\n[environments.dev]\n").unwrap();
        assert_eq!(dev.default_environment.as_deref(), Some("dev"));
        let none = load("[environments.prod]\n[environments.qa]\n").unwrap();
        assert_eq!(none.default_environment, None);
        let err = format!(
            "{:#}",
            load("default_environment = \"live\"\n[environments.prod]\n").unwrap_err()
        );
        assert!(
            err.contains("/x/fuse.toml:1:23") && err.contains("defined: prod"),
            "{err}"
        );
    }

    #[test]
    fn user_takes_names_and_ids() {
        let user = |text: &str| {
            Config::from_str(Path::new("/x/fuse.toml"), &format!("user = {text}\n")).map(|c| c.user)
        };
        assert_eq!(user("\"root\"").unwrap(), Some(AppUser::ROOT));
        assert_eq!(user("\"nonroot\"").unwrap(), Some(AppUser::NONROOT));
        let id = |uid, gid| Some(AppUser { uid, gid });
        assert_eq!(user("1000").unwrap(), id(1000, 1000));
        assert_eq!(user("\"1000\"").unwrap(), id(1000, 1000));
        assert_eq!(user("\"1000:50\"").unwrap(), id(1000, 50));
        assert_eq!(
            Config::from_str(Path::new("/x/fuse.toml"), "")
                .unwrap()
                .user,
            None
        );
        for bad in ["\"admin\"", "-1", "4294967295", "\"1:\"", "\"a:b\""] {
            let err = format!("{:#}", user(bad).unwrap_err());
            assert!(
                err.starts_with("/x/fuse.toml:1:8: invalid user"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn users_and_groups_tables() {
        let load = |text: &str| Config::from_str(Path::new("/x/fuse.toml"), text);
        let c = load(
            "user = \"root\"\n[users]\nwww-data = 33\nbackup = \"34:4\"\nmail = \"8\"\n[groups]\nadm = 4\nstaff = \"50\"\n",
        )
        .unwrap();
        assert_eq!(
            c.accounts.users,
            BTreeMap::from([
                ("backup".into(), (34, 4)),
                ("mail".into(), (8, 8)),
                ("www-data".into(), (33, 33)),
            ])
        );
        assert_eq!(
            c.accounts.groups,
            BTreeMap::from([("adm".into(), 4), ("staff".into(), 50)])
        );
        assert_eq!(c.user, Some(AppUser::ROOT));
        assert_eq!(load("").unwrap().accounts, Accounts::default());

        // `user` may name a [users] entry (written before or after it).
        let c = load("user = \"www-data\"\n[users]\nwww-data = \"33:34\"\n").unwrap();
        assert_eq!(c.user, Some(AppUser { uid: 33, gid: 34 }));
        let err = format!(
            "{:#}",
            load("user = \"www\"\n[users]\nwww-data = 33\n").unwrap_err()
        );
        assert!(
            err.starts_with("/x/fuse.toml:1:8: invalid user")
                && err.contains("a name from [users]"),
            "{err}"
        );
    }

    #[test]
    fn capabilities_for_root() {
        let load = |text: &str| Config::from_str(Path::new("/x/fuse.toml"), text);
        let c = load(
            "user = \"root\"\ncapabilities = [\"setuid\", \"CAP_SETGID\", \"chown\", \"setuid\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.capabilities,
            Some(Capabilities {
                mask: 0xc1,
                names: vec!["chown", "setgid", "setuid"],
            })
        );
        let c = load("user = \"0:50\"\ncapabilities = [\"checkpoint_restore\"]\n").unwrap();
        assert_eq!(c.capabilities.unwrap().mask, 1 << 40);
        let c = load("user = \"root\"\ncapabilities = []\n").unwrap();
        assert_eq!(c.capabilities.unwrap().mask, 0);
        assert_eq!(load("user = \"root\"\n").unwrap().capabilities, None);

        for (text, needle) in [
            (
                "capabilities = [\"chown\"]\n",
                "/x/fuse.toml:1:16: capabilities are what a root app keeps: they need user = \"root\"",
            ),
            (
                "user = 1000\ncapabilities = [\"chown\"]\n",
                "/x/fuse.toml:2:16: capabilities are what a root app keeps",
            ),
            (
                "user = \"root\"\ncapabilities = [\"chown\", \"setuidd\"]\n",
                "/x/fuse.toml:2:26: unknown capability 'setuidd': use the names of capabilities(7)",
            ),
        ] {
            let err = format!("{:#}", load(text).unwrap_err());
            assert!(err.starts_with(needle), "{text:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn users_and_groups_errors_point_at_the_entry() {
        let cases: &[(&str, &str)] = &[
            (
                "[users]\nWWW = 33\n",
                ":2:1: invalid name 'WWW' in [users]: use at most 32 lowercase",
            ),
            (
                "[users]\n1www = 33\n",
                ":2:1: invalid name '1www' in [users]",
            ),
            (
                "[groups]\n\"a b\" = 3\n",
                ":2:1: invalid name 'a b' in [groups]",
            ),
            (
                "[users]\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa = 3\n",
                "invalid name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'",
            ),
            (
                "[users]\nroot = 5\n",
                ":2:1: [users] cannot define root, fuse's own",
            ),
            (
                "[groups]\nnonroot = 5\n",
                ":2:1: [groups] cannot define nonroot",
            ),
            (
                "[users]\nweb = -1\n",
                ":2:7: invalid ids for user web: use a uid (33) or \"UID:GID\"",
            ),
            ("[users]\nweb = \"33:\"\n", ":2:7: invalid ids for user web"),
            (
                "[users]\nweb = 4294967295\n",
                ":2:7: invalid ids for user web",
            ),
            ("[users]\nweb = \"www\"\n", ":2:7: invalid ids for user web"),
            (
                "[groups]\nweb = \"4:4\"\n",
                ":2:7: invalid gid for group web",
            ),
            // Collisions, at the entry to change.
            (
                "[users]\nadmin = 0\n",
                ":2:1: user admin: uid 0 is already root's",
            ),
            (
                "[users]\na = 40\nb = 40\n",
                ":3:1: user b: uid 40 is already a's: choose another",
            ),
            (
                "user = 1000\n[users]\nweb = \"1000:1\"\n",
                ":3:1: user web has the app's uid 1000 but gid 1",
            ),
            (
                "[users]\nweb = 65532\n",
                ":2:1: user web: uid 65532 is already nonroot's",
            ),
            (
                "[groups]\nwheel = 0\n",
                ":2:1: group wheel: gid 0 is already root's",
            ),
            (
                "[groups]\nother = 65532\n",
                ":2:1: group other: gid 65532 is already nonroot's",
            ),
            (
                "[users]\nwww-data = 33\n[groups]\nwww-data = 34\n",
                ":4:1: group www-data: the name is already gid 33's",
            ),
            (
                "user = 1000\n[users]\napp = 2000\n",
                ":3:1: user app: name app is already app's",
            ),
            // fuse writes these two files.
            (
                "[files]\n\"/etc/passwd\" = \"passwd\"\n",
                ":2:1: fuse writes /etc/passwd (root and the app's user): add users in [users]",
            ),
            (
                "[environments.prod.files]\n\"/etc/group\" = \"group\"\n",
                ":2:1: fuse writes /etc/group",
            ),
        ];
        for (text, needle) in cases {
            let err = match Config::from_str(Path::new("/x/fuse.toml"), text) {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.starts_with("/x/fuse.toml:"), "names the place: {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }

    #[test]
    fn syntax_errors_give_file_line_column() {
        let err = load_err(&[("fuse.toml", "name = \"a\"\nmemory = = 3\n")]);
        assert!(err.contains("fuse.toml:2:10:"), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_place() {
        let err = load_err(&[("fuse.toml", "name = \"a\"\nmemroy = 3\n")]);
        assert!(
            err.contains("fuse.toml:2:1:") && err.contains("unknown field `memroy`"),
            "{err}"
        );
        let err = load_err(&[("fuse.toml", "[environments.prod]\nenvs = {}\n")]);
        assert!(
            err.contains("fuse.toml:2:1:") && err.contains("`envs`"),
            "{err}"
        );
        let err = load_err(&[("fuse.toml", ""), ("fuse-prod.toml", "\nmemory = 1\n")]);
        assert!(
            err.contains("fuse-prod.toml:2:1:") && err.contains("`memory`"),
            "{err}"
        );
        let err = load_err(&[("fuse.toml", "[healthcheck]\nhttp = \"/\"\npath = \"/x\"\n")]);
        assert!(
            err.contains("fuse.toml:3:1:") && err.contains("`path`"),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let cases: &[(&str, &str)] = &[
            ("[env]\nFUSE_ENV = \"x\"\n", ":2:1: FUSE_ENV is set by fuse"),
            (
                "[environments.\"../x\"]\n",
                ":1:15: Invalid environment name '../x'",
            ),
            (
                "[files]\n\"/etc/a.conf\" = \"missing.conf\"\n",
                ":2:17: file ",
            ),
            ("[files]\n\"etc/a.conf\" = \"x\"\n", "invalid image path"),
            (
                "[files]\n\"/run/a.conf\" = \"x\"\n",
                "cannot go to /run/a.conf",
            ),
            ("memory = 0\n", ":1:10: memory must be at least 24 (MiB)"),
            ("memory = 23\n", ":1:10: memory must be at least 24 (MiB)"),
            ("[ports]\nhttp = 0\n", "port http must be 1 to 65535"),
            ("[ports]\nhttp = 70000\n", ":2:8:"),
            (
                "healthcheck = { http = \"/h\", port = \"web\" }\n",
                "port 'web' is not in [ports]",
            ),
            (
                "[ports]\na = 1\nb = 2\n[healthcheck]\nhttp = \"/h\"\n",
                "needs `port",
            ),
            (
                "healthcheck = { tcp = 80, timeout = \"soon\" }\n",
                "not a duration",
            ),
            ("name = \"a:1\"\n", "put it in `version"),
            ("[test]\noutput = \"(\"\n", "not a valid regular expression"),
            (
                "[test]\nenvironment = \"prod\"\n",
                "[test] environment 'prod' is not defined",
            ),
        ];
        for (text, needle) in cases {
            let err = match Config::from_str(Path::new("/x/fuse.toml"), text) {
                Ok(_) => panic!("accepted: {text}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains("/x/fuse.toml"), "names the file: {err}");
        }
    }

    #[test]
    fn discovery_beside_a_file_or_inside_a_directory() {
        let dir = dir_with(&[("fuse.toml", "name = \"found\"\n"), ("app", "x")]);
        let from_file = Config::discover(&dir.path().join("app"), None)
            .unwrap()
            .unwrap();
        assert_eq!(from_file.name.as_deref(), Some("found"));
        let from_dir = Config::discover(dir.path(), None).unwrap().unwrap();
        assert_eq!(from_dir.name.as_deref(), Some("found"));
        let empty = tempfile::tempdir().unwrap();
        assert!(Config::discover(&empty.path().join("app"), None)
            .unwrap()
            .is_none());
        let err = Config::discover(Path::new("/x/app"), Some(Path::new("/nope/fuse.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nope/fuse.toml not found"), "{err}");
    }

    #[test]
    fn image_name_from_config() {
        let derived = ImageName {
            name: "hello".into(),
            version: "1.0".into(),
        };
        let c = Config::from_str(Path::new("fuse.toml"), "version = \"3\"\n").unwrap();
        assert_eq!(c.image_name(&derived).unwrap().to_string(), "hello:3");
        let c = Config::from_str(Path::new("fuse.toml"), "name = \"web\"\n").unwrap();
        assert_eq!(c.image_name(&derived).unwrap().to_string(), "web:1.0");
        let c = Config::from_str(Path::new("fuse.toml"), "").unwrap();
        assert!(c.image_name(&derived).is_none());
    }

    #[test]
    fn sysroot_packages_are_debian_names() {
        let load = |text: &str| Config::from_str(Path::new("/x/fuse.toml"), text);
        let c =
            load("[sysroot]\npackages = [\"libssl3\", \"libstdc++6\", \"liblua5.1-0\"]\n").unwrap();
        assert_eq!(c.sysroot_packages, ["libssl3", "libstdc++6", "liblua5.1-0"]);
        assert!(load("").unwrap().sysroot_packages.is_empty());
        let err = format!(
            "{:#}",
            load("[sysroot]\npackages = [\"libssl3\", \"Lib_SSL\"]\n").unwrap_err()
        );
        assert!(
            err.starts_with("/x/fuse.toml:2:24: invalid Debian package name 'Lib_SSL'"),
            "{err}"
        );
        let err = format!("{:#}", load("[sysroot]\npath = \"/\"\n").unwrap_err());
        assert!(err.contains("unknown field `path`"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
