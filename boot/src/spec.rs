//! The app spec: what the init runs. Baked into the image at [`SPEC_PATH`]; a [`RunOverlay`]
//! passed per run through QEMU's fw_cfg ([`RUN_OVERLAY_FW_CFG_NAME`]) changes the arguments and
//! environment without rebuilding the image.
//!
//! # Format
//!
//! Both are a sequence of NUL-terminated strings read as (key, value) pairs, the first pair
//! being `fuse-spec` = `1` (the format version). Keys of the spec:
//!
//! | key        | value                                                      |
//! |------------|------------------------------------------------------------|
//! | `exe`      | absolute path of the program to execute (once)             |
//! | `arg`      | argv entries in order, argv\[0\] first (repeated, ≥ 1)     |
//! | `env`      | `KEY=VALUE`: the app's whole environment (repeated)        |
//! | `cwd`      | absolute working directory (once, default `/`)             |
//! | `uid`      | decimal user id to run as (once, default 0)                |
//! | `gid`      | decimal group id to run as (once, default 0)               |
//! | `caps`     | decimal mask, bit N = capability N: all uid 0 keeps (once, uid 0 only; default every one) |
//! | `hostname` | the VM's host name (once, default `fuse`)                  |
//! | `fixed-args` | decimal count of argv\[1..\] entries that are the runtime launcher's own (`-jar /app/x.jar`): run-time arguments replace only what follows them (once, written only when > 0; default 0) |
//!
//! Keys of the overlay: `reset-args` = `1` (argv\[1..\] is cleared), `arg` (replaces
//! argv\[1..\]: the first one clears them; argv\[0\] stays), `env` (`KEY=VALUE`, added or
//! overriding the spec's `KEY`), `environment` (the baked environment to select: the init
//! applies `/etc/fuse/env/<name>` before the rest of the overlay, so run-time values win; see
//! [`ENV_DIR`]). Any other key is an error for the init: a change of meaning
//! takes a new version, it is never half-understood. The C side is `boot/init/spec.c`.

/// Where the init reads the app spec in the image.
pub const SPEC_PATH: &str = "/etc/fuse/spec";
/// The fw_cfg file name of the run overlay (`-fw_cfg name=opt/fuse/run,file=...`).
pub const RUN_OVERLAY_FW_CFG_NAME: &str = "opt/fuse/run";
/// Baked environments: `<ENV_DIR>/<name>` is an overlay (its `env`, maybe `arg` entries) the
/// init applies when `<name>` is selected (by the run overlay's `environment`, else the name in
/// [`DEFAULT_ENV_PATH`]). The init then links [`CURRENT_ENV_LINK`] to `<ENV_FILES_DIR>/<name>`.
/// Mirrors `boot/init/init.h`.
pub const ENV_DIR: &str = "/etc/fuse/env";
/// Holds the name of the environment selected when the run overlay names none.
pub const DEFAULT_ENV_PATH: &str = "/etc/fuse/environment";
/// Per-environment config files: `<ENV_FILES_DIR>/<name>/<path in the image>`.
pub const ENV_FILES_DIR: &str = "/etc/fuse/files";
/// The link to the selected environment's files directory, made by the init in `/run`.
pub const CURRENT_ENV_LINK: &str = "/run/fuse/current";
/// Longest environment name (it is a file name in the image).
pub const MAX_ENVIRONMENT_LEN: usize = 63;
/// The exit code the init reports for its own failures (`fuse-init: error: …`), as a POSIX
/// shell does.
pub const EXIT_INIT_FAILURE: u8 = 125;
/// The exit code the init reports when the app's program cannot be executed.
pub const EXIT_NOT_EXECUTABLE: u8 = 126;
/// The exit code the init reports when the app's program is not there.
pub const EXIT_NOT_FOUND: u8 = 127;
/// fuse's exit code when the image's root failed dm-verity verification at run time (the
/// kernel stopped the VM): sysexits' EX_IOERR (74), since a read of the image failed; not
/// 124 (timeout) nor 125-127 (the init's own failures, as a shell reports them), nor 128+
/// (signals), so a script can tell a corrupt image from those.
pub const EXIT_INTEGRITY: u8 = 74;
/// The format version this fuse writes and its init reads.
pub const SPEC_VERSION: &str = "1";
/// The most user-data the init reads from a cloud (`USERDATA_MAX` in boot/init/cloud.c); EC2
/// takes 16 KB.
pub const USER_DATA_MAX: usize = 64 * 1024;
/// The host name when the spec gives none.
pub const DEFAULT_HOSTNAME: &str = "fuse";
/// Longest host name Linux accepts.
pub const MAX_HOSTNAME_LEN: usize = 64;

const MAGIC_KEY: &str = "fuse-spec";

/// Why a spec or overlay is invalid, or could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("The app's {field} contains a NUL byte: {value:?}")]
    Nul { field: &'static str, value: String },
    #[error("The app's exe '{0}' is not an absolute path")]
    ExeNotAbsolute(String),
    #[error("The app spec has no exe")]
    NoExe,
    #[error("The app spec has no argv[0]: give at least the program name as first argument")]
    NoArgv0,
    #[error("The app's working directory '{0}' is not an absolute path")]
    CwdNotAbsolute(String),
    #[error("Invalid environment variable name '{0}': it must be non-empty and contain no '='")]
    BadEnvName(String),
    #[error("Invalid environment entry '{0}': it must be KEY=VALUE")]
    BadEnvEntry(String),
    #[error(
        "Invalid hostname '{0}': it must be 1 to {MAX_HOSTNAME_LEN} characters without whitespace"
    )]
    BadHostname(String),
    #[error("Invalid {key} '{value}': it must be a decimal id below 4294967295")]
    BadId { key: &'static str, value: String },
    #[error("The app's capabilities are for uid 0 only: uid {0} has none")]
    CapsNotRoot(u32),
    #[error("Invalid caps '{0}': it must be a decimal mask")]
    BadCaps(String),
    #[error("Invalid fixed-args '{0}': it must be a decimal count")]
    BadFixedArgs(String),
    #[error("The app spec keeps {fixed} launcher arguments but has only {args} arguments")]
    FixedArgs { fixed: usize, args: usize },
    #[error("The app spec is empty")]
    Empty,
    #[error("The app spec is truncated: it does not end with a NUL byte")]
    Truncated,
    #[error("The app spec is not UTF-8")]
    NotUtf8,
    #[error("Not a fuse app spec: it does not start with {MAGIC_KEY}")]
    NotASpec,
    #[error("Unsupported app spec version {0}: this fuse reads version {SPEC_VERSION}")]
    Version(String),
    #[error("Key '{0}' in the app spec has no value")]
    MissingValue(String),
    #[error("Key '{0}' is given twice in the app spec")]
    Duplicate(&'static str),
    #[error("Unknown key '{0}' in the app spec")]
    UnknownKey(String),
    #[error(
        "Invalid environment name '{0}': use 1 to {MAX_ENVIRONMENT_LEN} letters, digits, '-', '_' or '.', starting with a letter or digit"
    )]
    BadEnvironmentName(String),
    #[error("Invalid volume '{0}': it must be /dev/NAME:/PATH")]
    BadVolume(String),
}

/// Result of spec operations.
pub type Result<T> = std::result::Result<T, SpecError>;

/// What the init runs and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    /// Absolute path of the program in the image.
    pub exe: String,
    /// The full argv, argv\[0\] included.
    pub args: Vec<String>,
    /// The app's whole environment, in order (nothing else is inherited).
    pub env: Vec<(String, String)>,
    /// Absolute working directory.
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    /// For uid 0 only: the capabilities it keeps (bit N = capability N, as in
    /// `<linux/capability.h>`); `None`: every one.
    pub caps: Option<u64>,
    pub hostname: String,
    /// How many of argv\[1..\] are the runtime launcher's own arguments (`-jar /app/x.jar`,
    /// `/app/main.js`), kept in front when arguments come at run time from a source that
    /// does not know them (cloud user-data); 0 for a native app.
    pub fixed_args: usize,
}

impl AppSpec {
    /// A spec running `exe` with argv\[0\] = `exe`, no environment, as root in `/`.
    pub fn new(exe: impl Into<String>) -> Self {
        let exe = exe.into();
        AppSpec {
            args: vec![exe.clone()],
            exe,
            env: Vec::new(),
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            caps: None,
            hostname: DEFAULT_HOSTNAME.into(),
            fixed_args: 0,
        }
    }

    /// Checks everything the init checks, so a bad spec fails at build time, not at boot.
    pub fn validate(&self) -> Result<()> {
        no_nul("exe", &self.exe)?;
        if !self.exe.starts_with('/') {
            return Err(SpecError::ExeNotAbsolute(self.exe.clone()));
        }
        if self.args.is_empty() {
            return Err(SpecError::NoArgv0);
        }
        for arg in &self.args {
            no_nul("argument", arg)?;
        }
        validate_env(&self.env)?;
        no_nul("working directory", &self.cwd)?;
        if !self.cwd.starts_with('/') {
            return Err(SpecError::CwdNotAbsolute(self.cwd.clone()));
        }
        for (key, id) in [("uid", self.uid), ("gid", self.gid)] {
            if id == u32::MAX {
                return Err(SpecError::BadId {
                    key,
                    value: id.to_string(),
                });
            }
        }
        if self.caps.is_some() && self.uid != 0 {
            return Err(SpecError::CapsNotRoot(self.uid));
        }
        if self.fixed_args >= self.args.len() {
            return Err(SpecError::FixedArgs {
                fixed: self.fixed_args,
                args: self.args.len() - 1,
            });
        }
        validate_hostname(&self.hostname)
    }

    /// Validates and encodes the spec.
    pub fn try_encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        Ok(self.encode_unchecked())
    }

    /// Encodes the spec for `/etc/fuse/spec`.
    ///
    /// # Panics
    ///
    /// If the spec is invalid ([`AppSpec::validate`]): a NUL byte inside a value would shift
    /// the key/value framing. Use [`AppSpec::try_encode`] for specs built from untrusted input.
    pub fn encode(&self) -> Vec<u8> {
        match self.try_encode() {
            Ok(bytes) => bytes,
            Err(e) => panic!("AppSpec::encode on an invalid spec: {e}"),
        }
    }

    fn encode_unchecked(&self) -> Vec<u8> {
        let mut out = Writer::new();
        out.pair("exe", &self.exe);
        for arg in &self.args {
            out.pair("arg", arg);
        }
        for (k, v) in &self.env {
            out.pair("env", &format!("{k}={v}"));
        }
        out.pair("cwd", &self.cwd);
        out.pair("uid", &self.uid.to_string());
        out.pair("gid", &self.gid.to_string());
        if let Some(caps) = self.caps {
            out.pair("caps", &caps.to_string());
        }
        out.pair("hostname", &self.hostname);
        if self.fixed_args > 0 {
            out.pair("fixed-args", &self.fixed_args.to_string());
        }
        out.0
    }

    /// Reads a spec back, with the init's rules (defaults for cwd, ids and hostname).
    pub fn decode(bytes: &[u8]) -> Result<AppSpec> {
        let mut spec = AppSpec {
            exe: String::new(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: String::new(),
            uid: 0,
            gid: 0,
            caps: None,
            hostname: String::new(),
            fixed_args: 0,
        };
        let (mut have_uid, mut have_gid, mut have_fixed) = (false, false, false);
        for (key, value) in pairs(bytes)? {
            match key {
                "exe" => set_once(&mut spec.exe, "exe", value)?,
                "cwd" => set_once(&mut spec.cwd, "cwd", value)?,
                "hostname" => set_once(&mut spec.hostname, "hostname", value)?,
                "arg" => spec.args.push(value.to_string()),
                "env" => env_set(&mut spec.env, parse_env(value)?),
                "uid" | "gid" => {
                    let (seen, field, key) = if key == "uid" {
                        (&mut have_uid, &mut spec.uid, "uid")
                    } else {
                        (&mut have_gid, &mut spec.gid, "gid")
                    };
                    if std::mem::replace(seen, true) {
                        return Err(SpecError::Duplicate(key));
                    }
                    *field = parse_id(key, value)?;
                }
                "caps" => {
                    if spec.caps.is_some() {
                        return Err(SpecError::Duplicate("caps"));
                    }
                    let mask = value
                        .parse::<u64>()
                        .ok()
                        .filter(|_| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()));
                    spec.caps = Some(mask.ok_or_else(|| SpecError::BadCaps(value.to_string()))?);
                }
                "fixed-args" => {
                    if std::mem::replace(&mut have_fixed, true) {
                        return Err(SpecError::Duplicate("fixed-args"));
                    }
                    spec.fixed_args = value
                        .parse::<usize>()
                        .ok()
                        .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| SpecError::BadFixedArgs(value.to_string()))?;
                }
                other => return Err(SpecError::UnknownKey(other.to_string())),
            }
        }
        if spec.exe.is_empty() {
            return Err(SpecError::NoExe);
        }
        if spec.cwd.is_empty() {
            spec.cwd = "/".into();
        }
        if spec.hostname.is_empty() {
            spec.hostname = DEFAULT_HOSTNAME.into();
        }
        spec.validate()?;
        Ok(spec)
    }
}

/// Per-run changes to an image's spec, passed to the init through fw_cfg.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOverlay {
    /// Replacement for argv\[1..\] (argv\[0\] stays); `None` keeps the image's arguments,
    /// `Some(vec![])` runs without arguments.
    pub args: Option<Vec<String>>,
    /// Variables added to the image's environment or overriding it, by name.
    pub env: Vec<(String, String)>,
    /// The baked environment to select; `None` leaves the image's default.
    pub environment: Option<String>,
    /// Data disks the init mounts read-write (ext4): (`/dev/NAME`, absolute mount point).
    pub volumes: Vec<(String, String)>,
}

impl RunOverlay {
    /// True when the overlay changes nothing (only its version pair is encoded).
    pub fn is_empty(&self) -> bool {
        self.args.is_none()
            && self.env.is_empty()
            && self.environment.is_none()
            && self.volumes.is_empty()
    }

    /// Checks everything the init checks.
    pub fn validate(&self) -> Result<()> {
        for arg in self.args.iter().flatten() {
            no_nul("argument", arg)?;
        }
        if let Some(name) = &self.environment {
            validate_environment_name(name)?;
        }
        for (device, path) in &self.volumes {
            validate_volume(device, path)?;
        }
        validate_env(&self.env)
    }

    /// Validates and encodes the overlay.
    pub fn try_encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut out = Writer::new();
        if let Some(name) = &self.environment {
            out.pair("environment", name);
        }
        if let Some(args) = &self.args {
            out.pair("reset-args", "1");
            for arg in args {
                out.pair("arg", arg);
            }
        }
        for (k, v) in &self.env {
            out.pair("env", &format!("{k}={v}"));
        }
        for (device, path) in &self.volumes {
            out.pair("volume", &format!("{device}:{path}"));
        }
        Ok(out.0)
    }

    /// Encodes the overlay for `-fw_cfg name=opt/fuse/run,file=...`.
    ///
    /// # Panics
    ///
    /// If the overlay is invalid ([`RunOverlay::validate`]); see [`AppSpec::encode`].
    pub fn encode(&self) -> Vec<u8> {
        match self.try_encode() {
            Ok(bytes) => bytes,
            Err(e) => panic!("RunOverlay::encode on an invalid overlay: {e}"),
        }
    }

    /// Reads an overlay back, with the init's rules.
    pub fn decode(bytes: &[u8]) -> Result<RunOverlay> {
        let mut overlay = RunOverlay::default();
        for (key, value) in pairs(bytes)? {
            match (key, value) {
                ("reset-args", "1") => {
                    overlay.args.get_or_insert_with(Vec::new);
                }
                ("arg", value) => overlay
                    .args
                    .get_or_insert_with(Vec::new)
                    .push(value.to_string()),
                ("env", value) => env_set(&mut overlay.env, parse_env(value)?),
                ("environment", value) => {
                    if overlay.environment.is_some() {
                        return Err(SpecError::Duplicate("environment"));
                    }
                    validate_environment_name(value)?;
                    overlay.environment = Some(value.to_string());
                }
                ("volume", value) => {
                    let (device, path) = value
                        .split_once(':')
                        .ok_or_else(|| SpecError::BadVolume(value.to_string()))?;
                    validate_volume(device, path)?;
                    overlay.volumes.push((device.into(), path.into()));
                }
                (other, _) => return Err(SpecError::UnknownKey(other.to_string())),
            }
        }
        Ok(overlay)
    }

    /// The spec the init runs: `spec` with this overlay applied. The environment's own
    /// overlay (baked in the image) is not known here: apply it to `spec` first.
    pub fn apply(&self, spec: &AppSpec) -> AppSpec {
        let mut out = spec.clone();
        if let Some(args) = &self.args {
            out.args.truncate(1);
            out.args.extend(args.iter().cloned());
        }
        for kv in &self.env {
            env_set(&mut out.env, kv.clone());
        }
        out
    }
}

/// A volume as the init checks it: `/dev/NAME` (no `:`) and an absolute path, no NUL bytes.
fn validate_volume(device: &str, path: &str) -> Result<()> {
    let ok = device.starts_with("/dev/")
        && device.len() > 5
        && !device.contains([':', '\0'])
        && path.starts_with('/')
        && !path.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadVolume(format!("{device}:{path}")))
    }
}

/// Builds the NUL-separated pairs, starting with the version pair.
struct Writer(Vec<u8>);

impl Writer {
    fn new() -> Self {
        let mut w = Writer(Vec::new());
        w.pair(MAGIC_KEY, SPEC_VERSION);
        w
    }

    fn pair(&mut self, key: &str, value: &str) {
        for s in [key, value] {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
        }
    }
}

/// Splits encoded bytes into (key, value) pairs after checking the version pair.
fn pairs(bytes: &[u8]) -> Result<Vec<(&str, &str)>> {
    let body = match bytes.split_last() {
        None => return Err(SpecError::Empty),
        Some((0, body)) => body,
        Some(_) => return Err(SpecError::Truncated),
    };
    let text = std::str::from_utf8(body).map_err(|_| SpecError::NotUtf8)?;
    let mut strings = text.split('\0');
    let mut out = Vec::new();
    while let Some(key) = strings.next() {
        let value = strings
            .next()
            .ok_or_else(|| SpecError::MissingValue(key.to_string()))?;
        out.push((key, value));
    }
    match out.first() {
        Some(&(MAGIC_KEY, SPEC_VERSION)) => Ok(out.split_off(1)),
        Some(&(MAGIC_KEY, version)) => Err(SpecError::Version(version.to_string())),
        _ => Err(SpecError::NotASpec),
    }
}

fn no_nul(field: &'static str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(SpecError::Nul {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn validate_env(env: &[(String, String)]) -> Result<()> {
    for (k, v) in env {
        no_nul("environment variable name", k)?;
        no_nul("environment variable value", v)?;
        if k.is_empty() || k.contains('=') {
            return Err(SpecError::BadEnvName(k.clone()));
        }
    }
    Ok(())
}

/// The init's rule for environment names (they are file names in the image).
pub fn validate_environment_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ENVIRONMENT_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadEnvironmentName(name.to_string()))
    }
}

fn validate_hostname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_HOSTNAME_LEN
        || name.chars().any(|c| c.is_whitespace() || c == '\0')
    {
        return Err(SpecError::BadHostname(name.to_string()));
    }
    Ok(())
}

fn set_once(field: &mut String, key: &'static str, value: &str) -> Result<()> {
    if !field.is_empty() {
        return Err(SpecError::Duplicate(key));
    }
    *field = value.to_string();
    Ok(())
}

fn parse_env(entry: &str) -> Result<(String, String)> {
    match entry.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(SpecError::BadEnvEntry(entry.to_string())),
    }
}

/// Sets a variable, replacing an earlier one of the same name in place (the init's rule).
fn env_set(env: &mut Vec<(String, String)>, (key, value): (String, String)) {
    match env.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => env.push((key, value)),
    }
}

fn parse_id(key: &'static str, value: &str) -> Result<u32> {
    let bad = || SpecError::BadId {
        key,
        value: value.to_string(),
    };
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u64>() {
        Ok(n) if n < u64::from(u32::MAX) => Ok(n as u32),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AppSpec {
        AppSpec {
            exe: "/app/server".into(),
            args: vec!["server".into(), "--port".into(), "8080".into()],
            env: vec![
                ("PATH".into(), "/app:/usr/bin".into()),
                ("EMPTY".into(), String::new()),
                ("WITH_EQ".into(), "a=b".into()),
            ],
            cwd: "/app".into(),
            uid: 1000,
            gid: 100,
            caps: None,
            hostname: "server".into(),
            fixed_args: 0,
        }
    }

    #[test]
    fn caps_round_trip_for_root_only() {
        let mut spec = AppSpec::new("/app/nginx");
        // CAP_CHOWN, CAP_SETGID, CAP_SETUID.
        spec.caps = Some(1 | 1 << 6 | 1 << 7);
        let bytes = spec.encode();
        assert!(bytes.windows(9).any(|w| w == b"caps\x00193\x00"));
        assert_eq!(AppSpec::decode(&bytes).unwrap(), spec);
        spec.caps = Some(0);
        assert_eq!(AppSpec::decode(&spec.encode()).unwrap().caps, Some(0));
        assert_eq!(
            AppSpec::new("/a")
                .encode()
                .windows(4)
                .filter(|w| w == b"caps")
                .count(),
            0
        );

        spec.uid = 1000;
        assert_eq!(spec.validate(), Err(SpecError::CapsNotRoot(1000)));
        for bad in ["", "-1", "x", "18446744073709551616", "+1"] {
            let bytes = [
                &b"fuse-spec\x001\x00exe\x00/a\x00arg\x00a\x00caps\x00"[..],
                bad.as_bytes(),
                b"\x00",
            ]
            .concat();
            assert_eq!(
                AppSpec::decode(&bytes),
                Err(SpecError::BadCaps(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fixed_args_round_trip_only_when_set() {
        let mut spec = sample();
        assert!(!spec.encode().windows(10).any(|w| w == b"fixed-args"));
        spec.fixed_args = 2;
        let bytes = spec.encode();
        assert!(bytes.ends_with(b"fixed-args\x002\x00"));
        assert_eq!(AppSpec::decode(&bytes).unwrap(), spec);
        spec.fixed_args = 3;
        assert_eq!(
            spec.validate(),
            Err(SpecError::FixedArgs { fixed: 3, args: 2 })
        );
        for bad in ["", "-1", "x", "+1"] {
            let bytes = [
                &b"fuse-spec\x001\x00exe\x00/a\x00arg\x00a\x00fixed-args\x00"[..],
                bad.as_bytes(),
                b"\x00",
            ]
            .concat();
            assert_eq!(
                AppSpec::decode(&bytes),
                Err(SpecError::BadFixedArgs(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn round_trip() {
        let spec = sample();
        let bytes = spec.encode();
        assert!(bytes.starts_with(b"fuse-spec\x001\x00exe\x00/app/server\x00"));
        assert_eq!(AppSpec::decode(&bytes).unwrap(), spec);
    }

    #[test]
    fn new_has_defaults_and_round_trips() {
        let spec = AppSpec::new("/bin/hello");
        assert_eq!(spec.args, vec!["/bin/hello"]);
        assert_eq!(AppSpec::decode(&spec.encode()).unwrap(), spec);
    }

    #[test]
    fn decode_applies_defaults() {
        let bytes = b"fuse-spec\x001\x00exe\x00/a\x00arg\x00a\x00";
        let spec = AppSpec::decode(bytes).unwrap();
        assert_eq!(spec.cwd, "/");
        assert_eq!(spec.hostname, DEFAULT_HOSTNAME);
        assert_eq!((spec.uid, spec.gid), (0, 0));
    }

    #[test]
    fn rejects_nul_inside_values() {
        let mut spec = sample();
        spec.args.push("a\0exe".into());
        assert!(matches!(spec.validate(), Err(SpecError::Nul { .. })));
        assert!(spec.try_encode().is_err());

        let mut spec = sample();
        spec.env.push(("X".into(), "1\0env".into()));
        assert!(matches!(spec.try_encode(), Err(SpecError::Nul { .. })));

        let overlay = RunOverlay {
            args: Some(vec!["x\0y".into()]),
            ..RunOverlay::default()
        };
        assert!(overlay.try_encode().is_err());
    }

    #[test]
    #[should_panic(expected = "invalid spec")]
    fn encode_panics_on_invalid() {
        let mut spec = sample();
        spec.exe = "relative".into();
        spec.encode();
    }

    #[test]
    fn rejects_invalid_specs() {
        type Case = (fn(&mut AppSpec), fn(&SpecError) -> bool);
        let cases: Vec<Case> = vec![
            (
                |s| s.exe = "app".into(),
                |e| matches!(e, SpecError::ExeNotAbsolute(_)),
            ),
            (|s| s.args.clear(), |e| matches!(e, SpecError::NoArgv0)),
            (
                |s| s.cwd = "app".into(),
                |e| matches!(e, SpecError::CwdNotAbsolute(_)),
            ),
            (
                |s| s.env.push(("A=B".into(), "c".into())),
                |e| matches!(e, SpecError::BadEnvName(_)),
            ),
            (
                |s| s.env.push((String::new(), "c".into())),
                |e| matches!(e, SpecError::BadEnvName(_)),
            ),
            (
                |s| s.hostname = "two words".into(),
                |e| matches!(e, SpecError::BadHostname(_)),
            ),
            (
                |s| s.hostname = "x".repeat(65),
                |e| matches!(e, SpecError::BadHostname(_)),
            ),
            (
                |s| s.uid = u32::MAX,
                |e| matches!(e, SpecError::BadId { key: "uid", .. }),
            ),
        ];
        for (mutate, expected) in cases {
            let mut spec = sample();
            mutate(&mut spec);
            let err = spec.validate().unwrap_err();
            assert!(expected(&err), "unexpected error {err:?} for {spec:?}");
        }
    }

    #[test]
    fn decode_rejects_malformed_bytes() {
        let good = sample().encode();
        assert_eq!(AppSpec::decode(b""), Err(SpecError::Empty));
        assert_eq!(
            AppSpec::decode(&good[..good.len() - 1]),
            Err(SpecError::Truncated)
        );
        assert_eq!(
            AppSpec::decode(b"fuse-spec\x002\x00exe\x00/a\x00"),
            Err(SpecError::Version("2".into()))
        );
        assert_eq!(
            AppSpec::decode(b"exe\x00/a\x00fuse-spec\x001\x00"),
            Err(SpecError::NotASpec)
        );
        assert_eq!(
            AppSpec::decode(b"fuse-spec\x001\x00exe\x00"),
            Err(SpecError::MissingValue("exe".into()))
        );
        assert_eq!(
            AppSpec::decode(b"fuse-spec\x001\x00exe\x00/a\x00arg\x00a\x00color\x00red\x00"),
            Err(SpecError::UnknownKey("color".into()))
        );
        assert_eq!(
            AppSpec::decode(b"fuse-spec\x001\x00exe\x00/a\x00exe\x00/b\x00arg\x00a\x00"),
            Err(SpecError::Duplicate("exe"))
        );
        assert_eq!(
            AppSpec::decode(b"fuse-spec\x001\x00exe\x00/a\x00arg\x00a\x00uid\x00-1\x00"),
            Err(SpecError::BadId {
                key: "uid",
                value: "-1".into()
            })
        );
        assert_eq!(
            AppSpec::decode(b"fuse-spec\x001\x00arg\x00a\x00"),
            Err(SpecError::NoExe)
        );
        assert_eq!(
            AppSpec::decode(b"fuse-spec\x001\x00exe\x00/a\x00arg\x00a\x00env\x00NOEQ\x00"),
            Err(SpecError::BadEnvEntry("NOEQ".into()))
        );
    }

    #[test]
    fn overlay_round_trip_and_apply() {
        let overlay = RunOverlay {
            args: Some(vec!["--port".into(), "9090".into()]),
            env: vec![("PATH".into(), "/bin".into()), ("NEW".into(), "1".into())],
            ..RunOverlay::default()
        };
        let bytes = overlay.encode();
        assert_eq!(RunOverlay::decode(&bytes).unwrap(), overlay);

        let applied = overlay.apply(&sample());
        assert_eq!(applied.args, vec!["server", "--port", "9090"]);
        assert_eq!(
            applied.env,
            vec![
                ("PATH".to_string(), "/bin".to_string()),
                ("EMPTY".to_string(), String::new()),
                ("WITH_EQ".to_string(), "a=b".to_string()),
                ("NEW".to_string(), "1".to_string()),
            ]
        );
    }

    #[test]
    fn overlay_can_clear_or_keep_args() {
        let clear = RunOverlay {
            args: Some(Vec::new()),
            ..RunOverlay::default()
        };
        let bytes = clear.encode();
        assert_eq!(RunOverlay::decode(&bytes).unwrap(), clear);
        assert_eq!(clear.apply(&sample()).args, vec!["server"]);

        let keep = RunOverlay::default();
        assert!(keep.is_empty());
        assert_eq!(keep.apply(&sample()).args, sample().args);
        assert_eq!(keep.encode(), b"fuse-spec\x001\x00");
    }

    #[test]
    fn overlay_selects_an_environment_first() {
        let overlay = RunOverlay {
            args: None,
            env: vec![("SECRET".into(), "s3cr3t".into())],
            environment: Some("prod".into()),
            volumes: Vec::new(),
        };
        let bytes = overlay.encode();
        // First after the version pair: the init applies it before the overlay's own values.
        assert!(bytes.starts_with(b"fuse-spec\x001\x00environment\x00prod\x00env\x00"));
        assert_eq!(RunOverlay::decode(&bytes).unwrap(), overlay);
        assert!(!overlay.is_empty());
        assert_eq!(
            RunOverlay::decode(b"fuse-spec\x001\x00environment\x00a\x00environment\x00b\x00"),
            Err(SpecError::Duplicate("environment"))
        );
        for bad in ["", "../etc", "a/b", ".hidden", "two words", &"x".repeat(64)] {
            let overlay = RunOverlay {
                environment: Some(bad.to_string()),
                ..RunOverlay::default()
            };
            assert!(
                matches!(overlay.try_encode(), Err(SpecError::BadEnvironmentName(_))),
                "{bad:?}"
            );
        }
        validate_environment_name("prod-eu_1.2").unwrap();
    }

    #[test]
    fn overlay_rejects_spec_keys() {
        assert_eq!(
            RunOverlay::decode(b"fuse-spec\x001\x00exe\x00/b\x00"),
            Err(SpecError::UnknownKey("exe".into()))
        );
    }
}

#[cfg(test)]
mod volume_tests {
    use super::*;

    #[test]
    fn volumes_round_trip_and_are_checked() {
        let overlay = RunOverlay {
            volumes: vec![("/dev/vdb".into(), "/data".into())],
            ..RunOverlay::default()
        };
        assert!(!overlay.is_empty());
        let bytes = overlay.encode();
        assert!(bytes.windows(16).any(|w| w == b"volume\0/dev/vdb:"));
        assert_eq!(RunOverlay::decode(&bytes).unwrap(), overlay);
        for (device, path) in [("vdb", "/data"), ("/dev/vdb", "data"), ("/dev/a:b", "/x")] {
            let bad = RunOverlay {
                volumes: vec![(device.into(), path.into())],
                ..RunOverlay::default()
            };
            assert!(
                matches!(bad.try_encode(), Err(SpecError::BadVolume(_))),
                "{device}:{path}"
            );
        }
    }
}

/// The C init's side of the contract: every `#define` of `boot/init/init.h` that Rust mirrors
/// must say the same, so changing one side alone fails here.
#[cfg(test)]
mod init_h_tests {
    use super::*;
    use std::path::Path;

    const INIT_H: &str = include_str!("../init/init.h");

    /// The value of `#define NAME VALUE` in init.h.
    fn define(name: &str) -> &'static str {
        INIT_H
            .lines()
            .find_map(|line| {
                let rest = line.strip_prefix("#define ")?.strip_prefix(name)?;
                rest.starts_with([' ', '\t']).then(|| rest.trim())
            })
            .unwrap_or_else(|| panic!("init.h has no #define {name}"))
    }

    fn string(name: &str) -> &'static str {
        let value = define(name);
        value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_else(|| panic!("#define {name} {value} is not a string literal"))
    }

    fn number(name: &str) -> u64 {
        let value = define(name);
        value
            .parse()
            .unwrap_or_else(|_| panic!("#define {name} {value} is not a decimal number"))
    }

    #[test]
    fn test_constants_agree_with_init_h() {
        assert_eq!(string("SPEC_PATH"), SPEC_PATH);
        assert_eq!(
            string("OVERLAY_PATH"),
            format!("/sys/firmware/qemu_fw_cfg/by_name/{RUN_OVERLAY_FW_CFG_NAME}/raw")
        );
        assert_eq!(string("ENV_DIR"), ENV_DIR);
        assert_eq!(string("DEFAULT_ENV_PATH"), DEFAULT_ENV_PATH);
        assert_eq!(string("FILES_DIR"), ENV_FILES_DIR);
        assert_eq!(string("CURRENT_LINK"), CURRENT_ENV_LINK);
        assert_eq!(
            Path::new(CURRENT_ENV_LINK).parent(),
            Some(Path::new(string("CURRENT_DIR")))
        );
        assert_eq!(number("ENV_NAME_MAX"), MAX_ENVIRONMENT_LEN as u64);
        assert_eq!(
            string("MODULE_LIST_PATH"),
            crate::initramfs::MODULE_LIST_PATH
        );
        assert_eq!(number("EXIT_INIT_FAILURE"), u64::from(EXIT_INIT_FAILURE));
        assert_eq!(
            number("EXIT_NOT_EXECUTABLE"),
            u64::from(EXIT_NOT_EXECUTABLE)
        );
        assert_eq!(number("EXIT_NOT_FOUND"), u64::from(EXIT_NOT_FOUND));
    }

    #[test]
    fn test_define_finds_the_whole_name_only() {
        // ENV_DIR must not match a longer name that starts with it, nor CURRENT_DIR's line.
        assert_eq!(define("ENV_DIR"), "\"/etc/fuse/env\"");
        assert_eq!(define("SPEC_MAX_BYTES"), "(1024 * 1024)");
    }
}
