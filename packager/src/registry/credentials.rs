//! Registry credentials where Docker keeps them, so existing `docker login`s work: the Docker
//! config (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`): `credHelpers` (a helper
//! per registry), `credsStore` (one helper for all), `auths` (base64 `user:password`).
//! Helpers are `docker-credential-<name>` programs speaking JSON on stdin/stdout; a secret
//! never goes into an argv or a log line.

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The Docker config file.
pub(crate) fn config_path() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("Cannot find the Docker config: neither DOCKER_CONFIG nor HOME is set")?;
    Ok(PathBuf::from(home).join(".docker/config.json"))
}

/// The key `auths` and `credHelpers` use for `registry` (`docker.io` is Docker Hub's v1 URL).
fn server_key(registry: &str) -> String {
    if registry == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        registry.to_string()
    }
}

/// A key of `auths` reduced to its host: `https://reg.io:5000/v2/` is `reg.io:5000`.
fn key_host(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

fn read_config(path: &Path) -> Result<Map<String, Value>> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => bail!("Docker config {} is not a JSON object", path.display()),
            Err(e) => bail!("Docker config {} is not valid JSON: {e}", path.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Map::new()),
        Err(e) => Err(e).with_context(|| format!("Cannot read {}", path.display())),
    }
}

/// The credential helper the config names for `registry`, if any.
fn helper_for(config: &Map<String, Value>, registry: &str) -> Option<String> {
    let per_registry = config
        .get("credHelpers")
        .and_then(Value::as_object)
        .and_then(|helpers| {
            helpers
                .iter()
                .find(|(k, _)| key_host(k) == registry)
                .and_then(|(_, v)| v.as_str())
        });
    per_registry
        .or_else(|| config.get("credsStore").and_then(Value::as_str))
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

/// The credentials for `registry` (`host[:port]`, `docker.io` for Docker Hub) from the Docker
/// config at `path`; `None` when it has none.
pub(crate) fn lookup(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    let config = read_config(path)?;
    if let Some(helper) = helper_for(&config, registry) {
        if let Some(found) = helper_get(&helper, &server_key(registry))? {
            return Ok(Some(found));
        }
    }
    let Some(auths) = config.get("auths").and_then(Value::as_object) else {
        return Ok(None);
    };
    let Some((key, entry)) = auths.iter().find(|(k, _)| key_host(k) == registry) else {
        return Ok(None);
    };
    if entry
        .get("identitytoken")
        .is_some_and(|t| t.as_str() != Some(""))
    {
        bail!(
            "Docker config {}: the login for {key} is an identity token, which fuse cannot use yet: run `fuse login {registry}`",
            path.display()
        );
    }
    let Some(auth) = entry
        .get("auth")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
    else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    let Some((username, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
        bail!(
            "Docker config {}: auths.\"{key}\".auth is not base64 of USER:PASSWORD",
            path.display()
        );
    };
    Ok(Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    }))
}

/// `docker-credential-<helper> get`: the server URL on stdin, `{"Username","Secret"}` out.
fn helper_get(helper: &str, server: &str) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{helper}");
    let output = run_helper(&program, "get", server.as_bytes())?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stdout);
        // The helpers' protocol: "credentials not found in native keychain".
        if said.contains("credentials not found") {
            return Ok(None);
        }
        bail!(
            "Credential helper {program} failed to get the credentials for {server}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let answer: Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("Credential helper {program} answered no JSON for {server}"))?;
    let field = |k: &str| {
        answer
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (username, password) = (field("Username"), field("Secret"));
    if username == "<token>" {
        bail!("Credential helper {program} holds an identity token for {server}, which fuse cannot use yet: run `fuse login`");
    }
    if password.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials { username, password }))
}

fn run_helper(program: &str, action: &str, input: &[u8]) -> Result<std::process::Output> {
    let mut child = Command::new(program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("Cannot run the credential helper {program} that the Docker config names")
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input)
            .with_context(|| format!("Cannot talk to {program}"))?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("Cannot run {program}"))
}

/// Saves `credentials` for `registry`: in its credential helper when the config names one,
/// else in `auths` (the file rewritten 0600 through a temp file and a rename, other keys
/// kept). Returns where they went.
pub(crate) fn store(path: &Path, registry: &str, credentials: &Credentials) -> Result<String> {
    let mut config = read_config(path)?;
    let server = server_key(registry);
    if let Some(helper) = helper_for(&config, registry) {
        let program = format!("docker-credential-{helper}");
        let input = json!({
            "ServerURL": server,
            "Username": credentials.username,
            "Secret": credentials.password,
        });
        let output = run_helper(&program, "store", input.to_string().as_bytes())?;
        if !output.status.success() {
            bail!(
                "Credential helper {program} failed to store the credentials for {server}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        return Ok(program);
    }
    let auth = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", credentials.username, credentials.password));
    let auths = config
        .entry("auths")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(auths) = auths.as_object_mut() else {
        bail!("Docker config {}: auths is not an object", path.display());
    };
    auths.retain(|k, _| key_host(k) != registry);
    auths.insert(server, json!({ "auth": auth }));
    write_config(path, &config)?;
    Ok(path.display().to_string())
}

/// Forgets the credentials for `registry` (helper and `auths`); whether there were any.
pub(crate) fn erase(path: &Path, registry: &str) -> Result<bool> {
    let mut config = read_config(path)?;
    let mut erased = false;
    if let Some(helper) = helper_for(&config, registry) {
        let program = format!("docker-credential-{helper}");
        let output = run_helper(&program, "erase", server_key(registry).as_bytes())?;
        erased |= output.status.success();
    }
    if let Some(auths) = config.get_mut("auths").and_then(Value::as_object_mut) {
        let before = auths.len();
        auths.retain(|k, _| key_host(k) != registry);
        if auths.len() != before {
            erased = true;
            write_config(path, &config)?;
        }
    }
    Ok(erased)
}

/// Writes the config 0600 through a temp file in its directory and an atomic rename.
fn write_config(path: &Path, config: &Map<String, Value>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    // tempfile creates it 0600: the secret is never readable by others, not even briefly.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("Cannot write in {}", dir.display()))?;
    let mut bytes = serde_json::to_vec_pretty(config)?;
    bytes.push(b'\n');
    tmp.write_all(&bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("Cannot write {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn creds(u: &str, p: &str) -> Credentials {
        Credentials {
            username: u.into(),
            password: p.into(),
        }
    }

    #[test]
    fn auths_entries_are_found_by_host_in_any_key_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"auths": {
                "https://reg.example.com:5000/v2/": {"auth": "YWxpY2U6czNjcjN0OndpdGg6Y29sb25z"},
                "https://index.docker.io/v1/": {"auth": "Ym9iOmh1Yg=="},
                "empty.example.com": {}
            }, "psFormat": "keep me"}"#,
        )
        .unwrap();
        assert_eq!(
            lookup(&path, "reg.example.com:5000").unwrap(),
            Some(creds("alice", "s3cr3t:with:colons"))
        );
        assert_eq!(
            lookup(&path, "docker.io").unwrap(),
            Some(creds("bob", "hub"))
        );
        assert_eq!(lookup(&path, "reg.example.com").unwrap(), None);
        assert_eq!(lookup(&path, "empty.example.com").unwrap(), None);
        assert_eq!(
            lookup(&dir.path().join("absent.json"), "x.io").unwrap(),
            None
        );
        std::fs::write(&path, r#"{"auths": {"x.io": {"auth": "!!"}}}"#).unwrap();
        let err = lookup(&path, "x.io").unwrap_err().to_string();
        assert!(err.contains("auths.\"x.io\".auth is not base64"), "{err}");
        assert!(!format!("{:?}", creds("u", "pw")).contains("pw"));
    }

    #[test]
    fn store_and_erase_keep_other_keys_and_write_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker/config.json");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            r#"{"psFormat": "table", "auths": {"other.io": {"auth": "eDp5"}}}"#,
        )
        .unwrap();
        store(&path, "127.0.0.1:5000", &creds("ci", "pw")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            lookup(&path, "127.0.0.1:5000").unwrap(),
            Some(creds("ci", "pw"))
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"psFormat\": \"table\""), "{text}");
        assert!(text.contains("other.io"), "{text}");
        store(&path, "127.0.0.1:5000", &creds("ci", "new")).unwrap();
        assert_eq!(
            lookup(&path, "127.0.0.1:5000").unwrap().unwrap().password,
            "new"
        );
        assert!(erase(&path, "127.0.0.1:5000").unwrap());
        assert!(!erase(&path, "127.0.0.1:5000").unwrap());
        assert_eq!(lookup(&path, "127.0.0.1:5000").unwrap(), None);
        assert!(lookup(&path, "other.io").unwrap().is_some());
    }

    #[test]
    fn credential_helpers_are_asked_over_stdin() {
        let dir = tempfile::tempdir().unwrap();
        // A helper as Docker's protocol describes it: it answers for one server only.
        let helper = dir.path().join("docker-credential-fusetest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread server\n[ \"$1\" = get ] || exit 1\n\
             if [ \"$server\" = helped.io ]; then echo '{\"ServerURL\":\"helped.io\",\"Username\":\"h\",\"Secret\":\"from-helper\"}'; \
             else echo 'credentials not found in native keychain'; exit 1; fi\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"credHelpers": {"helped.io": "fusetest"}, "auths": {"plain.io": {"auth": "cDpx"}}}"#,
        )
        .unwrap();
        let old_path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![dir.path().to_path_buf()];
        paths.extend(std::env::split_paths(&old_path));
        // Only this test runs helpers; PATH is read by the spawn below.
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
        let found = lookup(&path, "helped.io");
        std::env::set_var("PATH", old_path);
        assert_eq!(found.unwrap(), Some(creds("h", "from-helper")));
        assert_eq!(lookup(&path, "plain.io").unwrap(), Some(creds("p", "q")));
    }
}
