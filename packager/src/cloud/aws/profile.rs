//! Credentials, region and endpoints found where the AWS CLI v2 finds them: `--profile`, then
//! the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), then the
//! profile (`AWS_PROFILE`, else `default`) of the shared credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`, sections `[name]`) and config file
//! (`AWS_CONFIG_FILE`, else `~/.aws/config`, sections `[profile name]` and `[default]`).
//! Region: `--region`, `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`. Endpoints:
//! `AWS_ENDPOINT_URL_<SERVICE>`, `AWS_ENDPOINT_URL`, the profile's `endpoint_url` (all unless
//! `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`), else AWS's own.
//!
//! Not supported (a clear error names the profile): role assumption, SSO, `credential_process`,
//! web identity, and instance or container roles.

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
}

impl Service {
    /// The signing name and host prefix.
    pub(crate) fn id(self) -> &'static str {
        match self {
            Service::Ec2 => "ec2",
            Service::Ebs => "ebs",
            Service::Elbv2 => "elasticloadbalancing",
        }
    }

    /// The `AWS_ENDPOINT_URL_<ID>` suffix, from the service id as the AWS CLI has it
    /// ("Elastic Load Balancing v2").
    pub(crate) fn env_id(self) -> &'static str {
        match self {
            Service::Ec2 => "EC2",
            Service::Ebs => "EBS",
            Service::Elbv2 => "ELASTIC_LOAD_BALANCING_V2",
        }
    }

    /// For messages.
    pub(crate) fn display(self) -> &'static str {
        match self {
            Service::Ec2 => "EC2",
            Service::Ebs => "EBS",
            Service::Elbv2 => "ELBv2",
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
}

impl Session {
    pub(crate) fn endpoint(&self, service: Service) -> &str {
        match service {
            Service::Ec2 => &self.ec2_endpoint,
            Service::Ebs => &self.ebs_endpoint,
            Service::Elbv2 => &self.elbv2_endpoint,
        }
    }
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

/// The session for `opts` from the process's environment and the user's files.
pub(crate) fn session(opts: &AwsOptions) -> Result<Session> {
    session_from(opts, &|name| {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    })
}

pub(crate) fn session_from(
    opts: &AwsOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Session> {
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
    let credentials = credentials(opts, env, &files, &profile)?;
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
    Ok(Session {
        ec2_endpoint: endpoint(Service::Ec2)?,
        ebs_endpoint: endpoint(Service::Ebs)?,
        elbv2_endpoint: endpoint(Service::Elbv2)?,
        credentials,
        region,
    })
}

fn credentials(
    opts: &AwsOptions,
    env: &dyn Fn(&str) -> Option<String>,
    files: &Files,
    profile: &str,
) -> Result<Credentials> {
    // An explicit --profile wins over keys in the environment, as in the AWS CLI.
    if opts.profile.is_none() {
        match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => {
                return Ok(Credentials {
                    access_key_id: id,
                    secret_access_key: secret,
                    session_token: env("AWS_SESSION_TOKEN"),
                    source: "the environment (AWS_ACCESS_KEY_ID)".into(),
                })
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
        let Some(section) = section else { continue };
        let unsupported = [
            "role_arn",
            "credential_process",
            "sso_session",
            "sso_start_url",
            "web_identity_token_file",
        ];
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
            profile: Some("role".into()),
            region: None,
        };
        let e = err(&opts, &[], CREDENTIALS, CONFIG);
        assert!(
            e.contains("through role_arn") && e.contains("export-credentials"),
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
}
