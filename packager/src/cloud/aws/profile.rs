//! Credentials, region and endpoints found where the AWS CLI v2 finds them: `--profile`, then
//! the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), then the
//! profile (`AWS_PROFILE`, else `default`) of the shared credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`, sections `[name]`) and config file
//! (`AWS_CONFIG_FILE`, else `~/.aws/config`, sections `[profile name]` and `[default]`).
//! Region: `--region`, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`. Endpoints:
//! `AWS_ENDPOINT_URL_<SERVICE>`, `AWS_ENDPOINT_URL`, the profile's `endpoint_url` (all unless
//! `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`), else AWS's own.
//!
//! A profile's `credential_process` is run (through `sh -c`, as the AWS SDKs do on Unix) and
//! its JSON read from a pipe, so SSO (`aws configure export-credentials --format process`),
//! aws-vault and password managers work without keys in the environment or in files.
//!
//! A profile's `role_arn` with a `source_profile` is assumed (STS AssumeRole, see
//! [`super::sts`]; `role_session_name`, `external_id`, `duration_seconds`) with the source
//! profile's keys or credential_process, before any other call.
//!
//! Not supported (a clear error names the profile and the command that exports its
//! credentials): MFA for a role, role chains, `credential_source`, SSO sections read by fuse
//! itself, web identity, and instance or container roles.

use super::sigv4::Credentials;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the user chose on the command line; the rest comes from the environment and files.
#[derive(Debug, Clone, Default)]
pub(crate) struct AwsOptions {
    pub(crate) region: Option<String>,
    pub(crate) profile: Option<String>,
}

/// The services fuse calls, with the names SigV4 and the endpoint variables use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Ec2,
    Ebs,
    /// Elastic Load Balancing (v2: application load balancers).
    Elbv2,
    /// The Security Token Service: a profile's role assumed.
    Sts,
}

impl Service {
    pub(crate) const ALL: [Service; 4] = [Service::Ec2, Service::Ebs, Service::Elbv2, Service::Sts];

    /// The signing name and host prefix.
    pub(crate) fn id(self) -> &'static str {
        match self {
            Service::Ec2 => "ec2",
            Service::Ebs => "ebs",
            Service::Elbv2 => "elasticloadbalancing",
            Service::Sts => "sts",
        }
    }

    /// The `AWS_ENDPOINT_URL_<ID>` suffix, from the service id as the AWS CLI has it
    /// ("Elastic Load Balancing v2").
    pub(crate) fn env_id(self) -> &'static str {
        match self {
            Service::Ec2 => "EC2",
            Service::Ebs => "EBS",
            Service::Elbv2 => "ELASTIC_LOAD_BALANCING_V2",
            Service::Sts => "STS",
        }
    }

    /// For messages.
    pub(crate) fn display(self) -> &'static str {
        match self {
            Service::Ec2 => "EC2",
            Service::Ebs => "EBS",
            Service::Elbv2 => "ELBv2",
            Service::Sts => "STS",
        }
    }
}

/// Credentials, region and endpoints, resolved before anything is sent.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) credentials: Credentials,
    pub(crate) region: String,
    pub(crate) ec2_endpoint: String,
    pub(crate) ebs_endpoint: String,
    pub(crate) elbv2_endpoint: String,
    pub(crate) sts_endpoint: String,
}

impl Session {
    pub(crate) fn endpoint(&self, service: Service) -> &str {
        match service {
            Service::Ec2 => &self.ec2_endpoint,
            Service::Ebs => &self.ebs_endpoint,
            Service::Elbv2 => &self.elbv2_endpoint,
            Service::Sts => &self.sts_endpoint,
        }
    }
}

/// A profile's `role_arn` with what AssumeRole takes from the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AssumeRole {
    pub(crate) role_arn: String,
    /// `role_session_name`, else `fuse-<unix time>`.
    pub(crate) session_name: String,
    pub(crate) external_id: Option<String>,
    pub(crate) duration_seconds: Option<u32>,
    /// The profile that names the role, and its `source_profile`, for messages.
    pub(crate) profile: String,
    pub(crate) source_profile: String,
}

/// One INI file: section name → key → value (keys lower-cased, as botocore does not, but
/// the documented keys are all lower case). Nested values (an indented block under `s3 =`)
/// are skipped.
type Ini = BTreeMap<String, BTreeMap<String, String>>;

fn parse_ini(text: &str) -> Ini {
    let mut ini = Ini::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(name) = trimmed.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            ini.entry(name.clone()).or_default();
            section = Some(name);
            continue;
        }
        // An indented line continues a nested block: not a key of the section.
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let (Some(section), Some((key, value))) = (&section, trimmed.split_once('=')) else {
            continue;
        };
        ini.entry(section.clone())
            .or_default()
            .insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    ini
}

/// The shared files, parsed, with their paths for messages.
#[derive(Debug, Default)]
struct Files {
    credentials: Ini,
    credentials_path: String,
    config: Ini,
    config_path: String,
}

impl Files {
    fn read(env: &dyn Fn(&str) -> Option<String>) -> Result<Files> {
        let home = env("HOME").map(PathBuf::from);
        let path = |var: &str, default: &str| -> Option<PathBuf> {
            match env(var) {
                Some(p) => Some(expand_home(&p, home.as_deref())),
                None => home.as_ref().map(|h| h.join(".aws").join(default)),
            }
        };
        let load = |p: &Option<PathBuf>| -> Result<(Ini, String)> {
            let Some(p) = p else {
                return Ok((Ini::new(), String::new()));
            };
            let shown = p.display().to_string();
            match std::fs::read_to_string(p) {
                Ok(text) => Ok((parse_ini(&text), shown)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Ini::new(), shown)),
                Err(e) => Err(e).with_context(|| format!("Cannot read the AWS file {shown}")),
            }
        };
        let (credentials, credentials_path) =
            load(&path("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?;
        let (config, config_path) = load(&path("AWS_CONFIG_FILE", "config"))?;
        Ok(Files {
            credentials,
            credentials_path,
            config,
            config_path,
        })
    }

    /// The profile's section of the credentials file (`[name]`).
    fn credentials_section(&self, profile: &str) -> Option<&BTreeMap<String, String>> {
        self.credentials.get(profile)
    }

    /// The profile's section of the config file (`[profile name]`; `[default]` too).
    fn config_section(&self, profile: &str) -> Option<&BTreeMap<String, String>> {
        self.config.get(&format!("profile {profile}")).or_else(|| {
            if profile == "default" {
                self.config.get("default")
            } else {
                None
            }
        })
    }
}

fn expand_home(path: &str, home: Option<&Path>) -> PathBuf {
    match (path.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(path),
    }
}

/// The session for `opts` from the process's environment and the user's files, and the role
/// its profile names, to assume with the session's (source) credentials before anything else
/// is called (see [`super::client`]).
pub(crate) fn session(opts: &AwsOptions) -> Result<(Session, Option<AssumeRole>)> {
    session_from(opts, &|name| {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    })
}

pub(crate) fn session_from(
    opts: &AwsOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Session, Option<AssumeRole>)> {
    let files = Files::read(env)?;
    let named = opts.profile.clone().or_else(|| env("AWS_PROFILE"));
    let profile = named.clone().unwrap_or_else(|| "default".to_string());
    if named.is_some()
        && files.credentials_section(&profile).is_none()
        && files.config_section(&profile).is_none()
    {
        bail!(
            "The AWS profile '{profile}' is in neither {} nor {}: see `aws configure list-profiles`",
            files.credentials_path,
            files.config_path
        );
    }
    let (credentials, assume) = credentials(opts, env, &files, &profile)?;
    let region = region(opts, env, &files, &profile)?;
    let ignore =
        env("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let endpoint = |service: Service| -> Result<String> {
        let var = format!("AWS_ENDPOINT_URL_{}", service.env_id());
        let configured = if ignore {
            None
        } else {
            env(&var)
                .map(|v| (v, var.clone()))
                .or_else(|| env("AWS_ENDPOINT_URL").map(|v| (v, "AWS_ENDPOINT_URL".into())))
                .or_else(|| {
                    files
                        .config_section(&profile)
                        .and_then(|s| s.get("endpoint_url"))
                        .map(|v| (v.clone(), format!("endpoint_url of profile {profile}")))
                })
        };
        match configured {
            Some((url, from)) => {
                let url = url.trim_end_matches('/').to_string();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("{from} is '{url}': an endpoint is an http:// or https:// URL");
                }
                Ok(url)
            }
            None => {
                let suffix = if region.starts_with("cn-") {
                    "amazonaws.com.cn"
                } else {
                    "amazonaws.com"
                };
                Ok(format!("https://{}.{region}.{suffix}", service.id()))
            }
        }
    };
    let session = Session {
        ec2_endpoint: endpoint(Service::Ec2)?,
        ebs_endpoint: endpoint(Service::Ebs)?,
        elbv2_endpoint: endpoint(Service::Elbv2)?,
        sts_endpoint: endpoint(Service::Sts)?,
        credentials,
        region,
    };
    Ok((session, assume))
}

/// The credentials to sign with, and the role to assume with them first, if any.
fn credentials(
    opts: &AwsOptions,
    env: &dyn Fn(&str) -> Option<String>,
    files: &Files,
    profile: &str,
) -> Result<(Credentials, Option<AssumeRole>)> {
    // An explicit --profile wins over keys in the environment, as in the AWS CLI.
    if opts.profile.is_none() {
        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => {
                return Ok((
                    Credentials {
                        access_key_id: id,
                        secret_access_key: secret,
                        session_token: env("AWS_SESSION_TOKEN"),
                        source: "the environment (AWS_ACCESS_KEY_ID)".into(),
                    },
                    None,
                ))
            }
            (Some(_), None) => {
                bail!("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both")
            }
            (None, Some(_)) => {
                bail!("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both")
            }
            (None, None) => {}
        }
    }
    // A role takes precedence over keys in the same profile, as in the AWS CLI.
    if let Some(role) = role_of(files, profile)? {
        let source = profile_credentials(files, &role.source_profile)?;
        return Ok((source, Some(role)));
    }
    Ok((profile_credentials(files, profile)?, None))
}

/// The role profile `profile` names (`role_arn` with `source_profile`), if it names one.
fn role_of(files: &Files, profile: &str) -> Result<Option<AssumeRole>> {
    let Some(section) = files
        .config_section(profile)
        .filter(|s| s.contains_key("role_arn"))
    else {
        return Ok(None);
    };
    let path = &files.config_path;
    let export = format!(
        "export its credentials for fuse with `eval \"$(aws configure export-credentials --profile {profile} --format env)\"`"
    );
    if section.contains_key("mfa_serial") {
        bail!("Profile {profile} of {path} assumes its role with an MFA code, which fuse does not ask for: {export}");
    }
    let Some(source_profile) = section.get("source_profile") else {
        bail!("Profile {profile} of {path} names a role_arn without a source_profile (credential_source and web identity are not supported): {export}");
    };
    if role_arn_of(files, source_profile).is_some() {
        bail!("Profile {profile} of {path} assumes a role from profile {source_profile}, which assumes one itself: fuse assumes one role, not a chain: {export}");
    }
    let duration_seconds = match section.get("duration_seconds") {
        None => None,
        Some(text) => Some(
            text.parse::<u32>()
                .ok()
                .filter(|d| (900..=43_200).contains(d))
                .with_context(|| {
                    format!("duration_seconds of profile {profile} ({path}) is '{text}': a number of seconds from 900 to 43200")
                })?,
        ),
    };
    Ok(Some(AssumeRole {
        role_arn: section["role_arn"].clone(),
        session_name: section
            .get("role_session_name")
            .cloned()
            .unwrap_or_else(|| format!("fuse-{}", crate::host::now_secs())),
        external_id: section.get("external_id").cloned(),
        duration_seconds,
        profile: profile.to_string(),
        source_profile: source_profile.clone(),
    }))
}

fn role_arn_of<'a>(files: &'a Files, profile: &str) -> Option<&'a String> {
    files
        .config_section(profile)
        .and_then(|s| s.get("role_arn"))
}

/// The keys profile `profile` holds, or its credential_process gives.
fn profile_credentials(files: &Files, profile: &str) -> Result<Credentials> {
    let sections = [
        (files.credentials_section(profile), &files.credentials_path),
        (files.config_section(profile), &files.config_path),
    ];
    for (section, path) in sections {
        let Some(section) = section else { continue };
        match (
            section.get("aws_access_key_id"),
            section.get("aws_secret_access_key"),
        ) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                return Ok(Credentials {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                    session_token: section.get("aws_session_token").cloned(),
                    source: format!("profile {profile} of {path}"),
                })
            }
            (Some(_), _) | (_, Some(_)) => bail!(
                "Profile {profile} of {path} needs both aws_access_key_id and aws_secret_access_key"
            ),
            _ => {}
        }
    }
    for (section, path) in sections {
        if let Some(command) = section.and_then(|s| s.get("credential_process")) {
            return credential_process(command, profile, path);
        }
    }
    for (section, path) in sections {
        let Some(section) = section else { continue };
        let unsupported = ["sso_session", "sso_start_url", "web_identity_token_file"];
        if let Some(key) = unsupported.iter().find(|k| section.contains_key(**k)) {
            bail!(
                "Profile {profile} of {path} gets its credentials through {key}, which fuse does not support yet: export them for fuse with `eval \"$(aws configure export-credentials --profile {profile} --format env)\"`"
            );
        }
    }
    bail!(
        "No AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give a profile with keys in {} (--profile or AWS_PROFILE; this was '{profile}')",
        files.credentials_path
    )
}

/// What a `credential_process` prints (the AWS CLI's format, version 1).
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ProcessOutput {
    version: u32,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    expiration: Option<String>,
}

/// The most a `credential_process` may print: its JSON is a few hundred bytes.
const PROCESS_OUTPUT_LIMIT: u64 = 64 * 1024;

/// Runs profile `profile`'s `credential_process` `command` (from `path`): its stdout is the
/// credentials' JSON; its stdin and stderr are the user's (aws-vault may ask for a passphrase,
/// an SSO login says what to open), as with the AWS CLI.
fn credential_process(command: &str, profile: &str, path: &str) -> Result<Credentials> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let what = format!("credential_process of profile {profile} ({path})");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("Cannot run the {what}"))?;
    let mut out = Vec::new();
    let read = child
        .stdout
        .take()
        .map(|s| s.take(PROCESS_OUTPUT_LIMIT + 1).read_to_end(&mut out));
    let status = child
        .wait()
        .with_context(|| format!("Cannot wait for the {what}"))?;
    // First: a process cut off at the limit may then have died of the closed pipe.
    if out.len() as u64 > PROCESS_OUTPUT_LIMIT {
        bail!("The {what} printed more than {PROCESS_OUTPUT_LIMIT} bytes: not credentials");
    }
    if let Some(read) = read {
        read.with_context(|| format!("Cannot read what the {what} printed"))?;
    }
    if !status.success() {
        bail!("The {what} failed ({status}): run it yourself to see why");
    }
    // The message names the field, never the text: it holds secrets.
    let parsed: ProcessOutput = serde_json::from_slice(&out).map_err(|e| {
        anyhow::anyhow!(
            "The {what} printed no credentials JSON (Version, AccessKeyId, SecretAccessKey): {} at line {}",
            json_error_kind(&e),
            e.line()
        )
    })?;
    if parsed.version != 1 {
        bail!(
            "The {what} printed credentials of Version {}: fuse reads Version 1",
            parsed.version
        );
    }
    if let Some(expiration) = parsed.expiration.as_deref() {
        if expired(expiration, crate::host::now_secs()) {
            bail!("The {what} printed credentials that expired at {expiration}: log in again");
        }
    }
    Ok(Credentials {
        access_key_id: parsed.access_key_id,
        secret_access_key: parsed.secret_access_key,
        session_token: parsed.session_token.filter(|t| !t.is_empty()),
        source: what,
    })
}

/// serde_json's error category in words (its `Display` may quote the input, here secrets).
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "a read error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "a field missing or of the wrong type",
        serde_json::error::Category::Eof => "JSON cut short",
    }
}

/// Whether an RFC 3339 UTC time (`2026-12-04T18:00:00Z`, fractions or `+00:00` allowed) is
/// at or before `now`. Another form is not judged here: AWS refuses what has expired.
fn expired(expiration: &str, now: u64) -> bool {
    let utc = expiration.ends_with('Z') || expiration.ends_with("+00:00");
    let stamp = expiration.get(..19);
    match (utc, stamp) {
        (true, Some(stamp)) if stamp.as_bytes().get(10) == Some(&b'T') => {
            // Same-width ISO stamps order as text.
            let now = crate::image::manifest::rfc3339(now as i64);
            stamp <= &now[..19]
        }
        _ => false,
    }
}

fn region(
    opts: &AwsOptions,
    env: &dyn Fn(&str) -> Option<String>,
    files: &Files,
    profile: &str,
) -> Result<String> {
    let found = opts
        .region
        .clone()
        .map(|r| (r, "--region".to_string()))
        .or_else(|| env("AWS_REGION").map(|r| (r, "AWS_REGION".into())))
        .or_else(|| env("AWS_DEFAULT_REGION").map(|r| (r, "AWS_DEFAULT_REGION".into())))
        .or_else(|| {
            files
                .config_section(profile)
                .and_then(|s| s.get("region"))
                .map(|r| (r.clone(), format!("region of profile {profile}")))
        });
    let Some((region, from)) = found else {
        bail!(
            "No AWS region: give --region, set AWS_REGION, or set region in profile {profile} of {} (`aws configure set region eu-west-1`)",
            files.config_path
        );
    };
    let valid = !region.is_empty()
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        bail!("{from} is '{region}', not an AWS region (such as eu-west-1)");
    }
    Ok(region)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(
        opts: &AwsOptions,
        vars: &[(&str, &str)],
        credentials: &str,
        config: &str,
    ) -> Result<Session> {
        resolve_role(opts, vars, credentials, config).map(|(s, _)| s)
    }

    fn resolve_role(
        opts: &AwsOptions,
        vars: &[(&str, &str)],
        credentials: &str,
        config: &str,
    ) -> Result<(Session, Option<AssumeRole>)> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
        std::fs::write(dir.path().join(".aws/credentials"), credentials).unwrap();
        std::fs::write(dir.path().join(".aws/config"), config).unwrap();
        let mut map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.insert("HOME".into(), dir.path().display().to_string());
        session_from(opts, &|k| map.get(k).cloned())
    }

    const CREDENTIALS: &str = "\
# comment
[default]
aws_access_key_id = AKIDEFAULT
aws_secret_access_key = secret-default

[dev]
aws_access_key_id=AKIDDEV
aws_secret_access_key=secret-dev
aws_session_token = token-dev
";
    const CONFIG: &str = "\
[default]
region = us-east-1
[profile dev]
region = eu-west-1
s3 =
  max_concurrent_requests = 20
[profile cfgonly]
region = ap-south-1
aws_access_key_id = AKIDCFG
aws_secret_access_key = secret-cfg
[profile role]
role_arn = arn:aws:iam::123:role/x
source_profile = default
region = us-west-2
[dev]
region = wrong-section-style
";

    #[test]
    fn profiles_of_both_files() {
        let s = resolve(&AwsOptions::default(), &[], CREDENTIALS, CONFIG).unwrap();
        assert_eq!(s.credentials.access_key_id, "AKIDEFAULT");
        assert_eq!(s.region, "us-east-1");
        assert_eq!(s.ec2_endpoint, "https://ec2.us-east-1.amazonaws.com");
        // `[profile dev]` in config, `[dev]` in credentials; `[dev]` in config is not it.
        let s = resolve(
            &AwsOptions::default(),
            &[("AWS_PROFILE", "dev")],
            CREDENTIALS,
            CONFIG,
        )
        .unwrap();
        assert_eq!(s.credentials.access_key_id, "AKIDDEV");
        assert_eq!(s.credentials.session_token.as_deref(), Some("token-dev"));
        assert_eq!(s.region, "eu-west-1");
        assert!(s.credentials.source.contains("profile dev of"));
        let opts = AwsOptions {
            profile: Some("cfgonly".into()),
            region: None,
        };
        let s = resolve(&opts, &[], CREDENTIALS, CONFIG).unwrap();
        assert_eq!(
            (s.credentials.access_key_id.as_str(), s.region.as_str()),
            ("AKIDCFG", "ap-south-1")
        );
    }

    #[test]
    fn order_of_precedence() {
        let env_keys = [
            ("AWS_ACCESS_KEY_ID", "AKIDENV"),
            ("AWS_SECRET_ACCESS_KEY", "secret-env"),
            ("AWS_PROFILE", "dev"),
            ("AWS_DEFAULT_REGION", "ca-central-1"),
        ];
        // Environment keys beat AWS_PROFILE; AWS_DEFAULT_REGION beats the profile's region.
        let s = resolve(&AwsOptions::default(), &env_keys, CREDENTIALS, CONFIG).unwrap();
        assert_eq!(s.credentials.access_key_id, "AKIDENV");
        assert_eq!(s.region, "ca-central-1");
        // --profile beats environment keys; --region beats all.
        let opts = AwsOptions {
            profile: Some("dev".into()),
            region: Some("sa-east-1".into()),
        };
        let s = resolve(&opts, &env_keys, CREDENTIALS, CONFIG).unwrap();
        assert_eq!(
            (s.credentials.access_key_id.as_str(), s.region.as_str()),
            ("AKIDDEV", "sa-east-1")
        );
        let mut with_region = env_keys.to_vec();
        with_region.push(("AWS_REGION", "eu-north-1"));
        let s = resolve(&AwsOptions::default(), &with_region, CREDENTIALS, CONFIG).unwrap();
        assert_eq!(s.region, "eu-north-1");
    }

    #[test]
    fn endpoints() {
        let vars = [
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000/"),
            ("AWS_ENDPOINT_URL_EBS", "http://127.0.0.1:6000"),
        ];
        let s = resolve(&AwsOptions::default(), &vars, CREDENTIALS, CONFIG).unwrap();
        assert_eq!(s.ec2_endpoint, "http://127.0.0.1:5000");
        assert_eq!(s.ebs_endpoint, "http://127.0.0.1:6000");
        assert_eq!(s.elbv2_endpoint, "http://127.0.0.1:5000");
        let elb = [(
            "AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2",
            "http://127.0.0.1:7000",
        )];
        let s = resolve(&AwsOptions::default(), &elb, CREDENTIALS, CONFIG).unwrap();
        assert_eq!(s.elbv2_endpoint, "http://127.0.0.1:7000");
        assert_eq!(s.ec2_endpoint, "https://ec2.us-east-1.amazonaws.com");
        let mut ignored = vars.to_vec();
        ignored.push(("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true"));
        let s = resolve(&AwsOptions::default(), &ignored, CREDENTIALS, CONFIG).unwrap();
        assert_eq!(s.ebs_endpoint, "https://ebs.us-east-1.amazonaws.com");
        assert_eq!(
            s.elbv2_endpoint,
            "https://elasticloadbalancing.us-east-1.amazonaws.com"
        );
        let err = resolve(
            &AwsOptions::default(),
            &[("AWS_ENDPOINT_URL", "localhost:1")],
            CREDENTIALS,
            CONFIG,
        )
        .unwrap_err();
        assert!(format!("{err}").contains("http://"), "{err}");
    }

    #[test]
    fn clear_errors() {
        let err = |opts: &AwsOptions, vars: &[(&str, &str)], c: &str, cfg: &str| {
            format!("{:#}", resolve(opts, vars, c, cfg).unwrap_err())
        };
        let e = err(&AwsOptions::default(), &[], CREDENTIALS, "");
        assert!(e.starts_with("No AWS region: give --region"), "{e}");
        let e = err(&AwsOptions::default(), &[], "", "");
        assert!(e.starts_with("No AWS credentials"), "{e}");
        let e = err(
            &AwsOptions::default(),
            &[("AWS_PROFILE", "nope")],
            CREDENTIALS,
            CONFIG,
        );
        assert!(e.contains("'nope' is in neither"), "{e}");
        let e = err(
            &AwsOptions::default(),
            &[("AWS_ACCESS_KEY_ID", "x")],
            "",
            CONFIG,
        );
        assert!(e.contains("AWS_SECRET_ACCESS_KEY is not"), "{e}");
        let opts = AwsOptions {
            profile: Some("sso".into()),
            region: None,
        };
        let e = err(
            &opts,
            &[],
            "",
            "[profile sso]\nregion = x\nsso_session = corp\n",
        );
        assert!(
            e.contains("through sso_session") && e.contains("export-credentials"),
            "{e}"
        );
        let opts = AwsOptions {
            region: Some("eu-west-1/../x".into()),
            profile: None,
        };
        let e = err(&opts, &[], CREDENTIALS, CONFIG);
        assert!(e.contains("not an AWS region"), "{e}");
        // No secret in any message.
        assert!(!e.contains("secret-default"));
    }

    /// A config with profile `p` getting its credentials from `command`.
    fn process_config(command: &str) -> String {
        format!("[profile p]\nregion = us-east-1\ncredential_process = {command}\n")
    }

    fn by_process(command: &str) -> Result<Session> {
        let opts = AwsOptions {
            profile: Some("p".into()),
            region: None,
        };
        resolve(&opts, &[], "", &process_config(command))
    }

    #[test]
    fn credential_process_is_run_and_its_json_read() {
        let s = by_process(
            r#"printf '{"Version": 1, "AccessKeyId": "AKIDPROC", "SecretAccessKey": "secret-proc", "SessionToken": "tok", "Expiration": "2999-01-01T00:00:00Z"}'"#,
        )
        .unwrap();
        assert_eq!(s.credentials.access_key_id, "AKIDPROC");
        assert_eq!(s.credentials.secret_access_key, "secret-proc");
        assert_eq!(s.credentials.session_token.as_deref(), Some("tok"));
        assert!(s
            .credentials
            .source
            .starts_with("credential_process of profile p"));
        // Static keys of the profile win, as in the AWS CLI's credentials file.
        let opts = AwsOptions {
            profile: Some("dev".into()),
            region: Some("us-east-1".into()),
        };
        let config = "[profile dev]\ncredential_process = false\n";
        let s = resolve(&opts, &[], CREDENTIALS, config).unwrap();
        assert_eq!(s.credentials.access_key_id, "AKIDDEV");
    }

    #[test]
    fn credential_process_failures_are_one_line_without_secrets() {
        let err = |command: &str| format!("{:#}", by_process(command).unwrap_err());
        let e = err("echo 'no login' >&2; exit 3");
        assert!(
            e.starts_with("The credential_process of profile p") && e.contains("exit status: 3"),
            "{e}"
        );
        let e = err("printf 'AKIDLEAK secret-leak'");
        assert!(e.contains("not JSON") && !e.contains("secret-leak"), "{e}");
        let e = err(r#"printf '{"Version": 1, "AccessKeyId": "AKIDX"}'"#);
        assert!(e.contains("a field missing"), "{e}");
        let e =
            err(r#"printf '{"Version": 2, "AccessKeyId": "A", "SecretAccessKey": "secret-v2"}'"#);
        assert!(e.contains("Version 2") && !e.contains("secret-v2"), "{e}");
        let e = err(
            r#"printf '{"Version": 1, "AccessKeyId": "A", "SecretAccessKey": "s", "Expiration": "2001-02-03T04:05:06Z"}'"#,
        );
        assert!(e.contains("expired at 2001-02-03T04:05:06Z"), "{e}");
        let e = err("head -c 1000000 /dev/zero | tr '\\0' x");
        assert!(e.contains("more than 65536 bytes"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn expirations() {
        let now = 1_764_800_000; // 2025-12-03T22:13:20Z
        assert!(expired("2025-12-03T22:13:20Z", now));
        assert!(expired("2025-12-03T22:13:19.999Z", now));
        assert!(expired("2025-01-01T00:00:00+00:00", now));
        assert!(!expired("2025-12-03T22:13:21Z", now));
        assert!(!expired("2026-01-01T00:00:00Z", now));
        // Not UTC, or not a time: left for AWS to judge.
        assert!(!expired("2001-01-01T00:00:00+02:00", now));
        assert!(!expired("soon", now));
    }

    #[test]
    fn a_role_is_assumed_with_its_source_profiles_credentials() {
        let opts = AwsOptions {
            profile: Some("role".into()),
            region: None,
        };
        let (s, role) = resolve_role(&opts, &[], CREDENTIALS, CONFIG).unwrap();
        assert_eq!(s.credentials.access_key_id, "AKIDEFAULT");
        assert_eq!(s.region, "us-west-2");
        assert_eq!(s.sts_endpoint, "https://sts.us-west-2.amazonaws.com");
        let role = role.unwrap();
        assert_eq!(role.role_arn, "arn:aws:iam::123:role/x");
        assert_eq!(
            (role.profile.as_str(), role.source_profile.as_str()),
            ("role", "default")
        );
        assert!(role.session_name.starts_with("fuse-"));
        assert_eq!((role.external_id, role.duration_seconds), (None, None));
        // Keys in the environment win when no --profile is given, as in the AWS CLI.
        let (_, role) = resolve_role(
            &AwsOptions::default(),
            &[
                ("AWS_PROFILE", "role"),
                ("AWS_ACCESS_KEY_ID", "AKIDENV"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
            ],
            CREDENTIALS,
            CONFIG,
        )
        .unwrap();
        assert!(role.is_none());
        let config = "[profile r]\nregion = us-east-1\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = dev\nrole_session_name = ci-42\nexternal_id = ext-7\nduration_seconds = 3600\n";
        let opts = AwsOptions {
            profile: Some("r".into()),
            region: None,
        };
        let (s, role) = resolve_role(&opts, &[], CREDENTIALS, config).unwrap();
        assert_eq!(s.credentials.access_key_id, "AKIDDEV");
        let role = role.unwrap();
        assert_eq!(role.session_name, "ci-42");
        assert_eq!(role.external_id.as_deref(), Some("ext-7"));
        assert_eq!(role.duration_seconds, Some(3600));
    }

    #[test]
    fn roles_fuse_cannot_assume_are_one_line() {
        let opts = AwsOptions {
            profile: Some("r".into()),
            region: None,
        };
        let err = |config: &str| {
            let e = format!(
                "{:#}",
                resolve(&opts, &[], CREDENTIALS, config).unwrap_err()
            );
            assert!(!e.contains('\n'), "one line: {e}");
            e
        };
        let base = "[profile r]\nregion = us-east-1\nrole_arn = arn:aws:iam::1:role/r\n";
        let e = err(&format!(
            "{base}source_profile = default\nmfa_serial = arn:aws:iam::1:mfa/ann\n"
        ));
        assert!(
            e.contains("MFA code") && e.contains("export-credentials --profile r"),
            "{e}"
        );
        let e = err(&format!("{base}credential_source = Ec2InstanceMetadata\n"));
        assert!(e.contains("without a source_profile"), "{e}");
        let e = err(&format!("{base}source_profile = s\n[profile s]\nrole_arn = arn:aws:iam::1:role/s\nsource_profile = default\n"));
        assert!(e.contains("not a chain"), "{e}");
        let e = err(&format!(
            "{base}source_profile = default\nduration_seconds = 60\n"
        ));
        assert!(e.contains("from 900 to 43200"), "{e}");
        let e = err(&format!("{base}source_profile = nobody\n"));
        assert!(e.starts_with("No AWS credentials"), "{e}");
    }
}
