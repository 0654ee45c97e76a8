//! `fuse push` / `fuse pull` against a real OCI registry on loopback: Debian's
//! `docker-registry` (distribution 2.8), started by each test with a config it writes
//! (filesystem storage in the test's directory, 127.0.0.1 and a free port), plain HTTP, and
//! with htpasswd basic auth and TLS from a CA the test makes with openssl. skopeo, a client
//! nobody here wrote, reads and copies what fuse pushed.

mod common;

use common::{assert_one_error, flip_byte, json, sha256_hex, Sandbox, HELLO};
use fuse_boot::poll::wait_until;
use fuse_tests::{assert_no_leaked_qemu, FuseCmd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const REGISTRY: &str = "/usr/bin/docker-registry";

/// A registry process of the test's own, killed and reaped when dropped (on every path,
/// panics included).
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
}

/// TLS and basic auth for a registry: its certificate and key, the htpasswd file.
struct Secured {
    cert: PathBuf,
    key: PathBuf,
    htpasswd: PathBuf,
}

/// Token auth for a registry: the token service's realm and the certificate its tokens are
/// signed with.
struct TokenAuth {
    realm: String,
    cert: PathBuf,
}

impl Registry {
    fn start(dir: &Path, secured: Option<&Secured>) -> Registry {
        Registry::start_with(dir, secured, None)
    }

    fn start_with(dir: &Path, secured: Option<&Secured>, token: Option<&TokenAuth>) -> Registry {
        Registry::start_on(dir, common::free_port(), secured, token)
    }

    fn start_on(
        dir: &Path,
        port: u16,
        secured: Option<&Secured>,
        token: Option<&TokenAuth>,
    ) -> Registry {
        assert!(
            Path::new(REGISTRY).is_file(),
            "{REGISTRY} is missing: install docker-registry (bash ci/setup)"
        );
        let storage = dir.join("registry-storage");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: fuse-test\n",
            storage.display()
        );
        if let Some(s) = secured {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: fuse-test\n    path: {}\n",
                s.cert.display(),
                s.key.display(),
                s.htpasswd.display()
            ));
        }
        if let Some(t) = token {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                t.realm,
                t.cert.display()
            ));
        }
        let config_path = dir.join("registry.yml");
        std::fs::write(&config_path, config).unwrap();
        // Kept in the test's directory for a post-mortem.
        let log = dir.join("registry.log");
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("registry.err")).unwrap())
            .spawn()
            .expect("cannot start docker-registry");
        let mut registry = Registry {
            child,
            port,
            storage,
        };
        let up = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        if up.is_none() || registry.child.try_wait().unwrap().is_some() {
            panic!(
                "docker-registry did not listen on 127.0.0.1:{port}:\n{}",
                std::fs::read_to_string(dir.join("registry.err")).unwrap_or_default()
            );
        }
        registry
    }

    /// `127.0.0.1:PORT/<repository_tag>`.
    fn reference(&self, repository_tag: &str) -> String {
        format!("127.0.0.1:{}/{repository_tag}", self.port)
    }

    /// Where the registry keeps blob `digest`.
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fuse` with the sandbox's store and a Docker config of its own (never the user's).
fn fuse(sb: &Sandbox) -> FuseCmd {
    sb.fuse().env("DOCKER_CONFIG", sb.dir.join("docker"))
}

/// Builds the static hello image; returns its digest.
fn build_hello(sb: &Sandbox) -> String {
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let out = fuse(sb).args(["build", "--json"]).arg(&app).run();
    json(out.assert_success())["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `fuse ARGS` (with `--json` among them), asserted to succeed: the JSON it printed.
fn fuse_json<S: AsRef<std::ffi::OsStr>>(
    sb: &Sandbox,
    args: impl IntoIterator<Item = S>,
) -> serde_json::Value {
    json(fuse(sb).args(args).run().assert_success())
}

/// The names in `fuse ls --json`.
fn listed(sb: &Sandbox) -> Vec<String> {
    let out = fuse(sb).args(["ls", "--json"]).run();
    json(out.assert_success())
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["image"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `fuse login HOST -u ci --password-stdin EXTRA` with `password` on stdin.
fn login_ci(sb: &Sandbox, host: &str, password: &str, extra: &[&str]) -> fuse_tests::Output {
    fuse(sb)
        .args(["login", host, "-u", "ci", "--password-stdin"])
        .args(extra)
        .stdin(password)
        .run()
}

fn tool(cmd: &mut Command, what: &str) -> String {
    common::run_tool(cmd, what)
}

#[test]
fn push_rm_pull_run_and_skopeo_reads_what_was_pushed() {
    let sb = Sandbox::new();
    let registry = Registry::start(sb.dir.path(), None);
    let image = build_hello(&sb);
    let reference = registry.reference("x/hello:1.0");

    // Bad references are refused before anything is sent.
    for (bad, why) in [
        ("team/hello:1.0", "no default registry"),
        ("127.0.0.1:1/Team/hello", "invalid repository component"),
    ] {
        let out = fuse(&sb).args(["push", "hello:1.0", bad]).run();
        assert_one_error(&out, &[why]);
    }

    let out = fuse(&sb).args(["push", "hello:1.0"]).run();
    assert_one_error(
        &out,
        &["hello:1.0 was never pushed", "HOST[:PORT]/REPOSITORY"],
    );

    let first = fuse_json(&sb, ["push", "hello:1.0", &reference, "--json"]);
    assert_eq!(
        first["blobs_sent"], 6,
        "config, kernel, initrd, stub, rootfs, appfs: {first}"
    );
    assert_eq!(first["blobs_skipped"], 0, "{first}");
    assert_eq!(first["image_digest"], image.as_str());
    assert!(first["bytes_sent"].as_u64().unwrap() > 1_000_000, "{first}");
    let manifest_digest = first["digest"].as_str().unwrap().to_string();

    // Pushed again: nothing but the manifest, which is the same bytes.
    let second = fuse_json(&sb, ["push", "hello:1.0", &reference, "--json"]);
    assert_eq!(second["blobs_sent"], 0, "{second}");
    assert_eq!(second["blobs_skipped"], 6, "{second}");
    assert_eq!(second["digest"], manifest_digest.as_str(), "deterministic");
    assert!(second["bytes_sent"].as_u64().unwrap() < 4096, "{second}");
    // Without a reference: where the image's name was pushed last, tagged with its version.
    let third = fuse_json(&sb, ["push", "hello:1.0", "--json"]);
    assert_eq!(third["reference"], reference.as_str(), "{third}");
    assert_eq!(third["digest"], manifest_digest.as_str());
    // To another repository of the registry: mounted from the first, nothing sent again.
    let mounted = fuse_json(
        &sb,
        [
            "push",
            "hello:1.0",
            &registry.reference("z/mounted:1"),
            "--json",
        ],
    );
    assert_eq!(mounted["blobs_mounted"], 6, "{mounted}");
    assert_eq!(mounted["blobs_sent"], 0, "{mounted}");
    assert!(mounted["bytes_sent"].as_u64().unwrap() < 4096, "{mounted}");

    // skopeo reads the manifest fuse pushed: the same bytes (digest), fuse's artifact type.
    let raw = tool(
        Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ]),
        "skopeo inspect",
    );
    let dir = sb.dir.path();
    std::fs::write(dir.join("manifest.json"), &raw).unwrap();
    assert_eq!(
        format!("sha256:{}", sha256_hex(&dir.join("manifest.json"))),
        manifest_digest
    );
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        manifest["artifactType"],
        "application/vnd.fuse.image.v1+json"
    );
    assert_eq!(
        manifest["annotations"]["vnd.fuse.image.digest"],
        image.as_str()
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5, "{raw}");

    // skopeo copies it to an OCI layout: every blob's bytes match its digest; and back into
    // the registry under another name, from which fuse pulls the same image.
    let layout = dir.join("layout");
    tool(
        Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{reference}"),
            &format!("oci:{}:1.0", layout.display()),
        ]),
        "skopeo copy to oci:",
    );
    let mut digests: Vec<&str> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    digests.push(manifest["config"]["digest"].as_str().unwrap());
    for d in digests {
        let file = layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        assert_eq!(
            format!("sha256:{}", sha256_hex(&file)),
            d,
            "{}",
            file.display()
        );
    }
    let copy = registry.reference("y/copied:2");
    tool(
        Command::new("skopeo").args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:1.0", layout.display()),
            &format!("docker://{copy}"),
        ]),
        "skopeo copy back",
    );

    // Removed locally, pulled back: the same image, named after the reference, and it boots.
    fuse(&sb).args(["rm", "hello:1.0"]).run().assert_success();
    assert!(listed(&sb).is_empty());
    let pulled = fuse_json(&sb, ["pull", &reference, "--json"]);
    assert_eq!(pulled["digest"], image.as_str(), "{pulled}");
    assert_eq!(pulled["image"], reference.as_str());
    assert_eq!(pulled["manifest_digest"], manifest_digest.as_str());
    assert_eq!(pulled["blobs_received"], 6, "{pulled}");
    assert_eq!(listed(&sb), vec![reference.clone()]);
    let out = fuse(&sb).args(["run", &reference]).run();
    out.assert_success()
        .assert_stdout_contains("hello from the guest");
    let inspected = fuse_json(&sb, ["inspect", &reference, "--json"]);
    assert_eq!(inspected["digest"], image.as_str());
    fuse(&sb)
        .args(["verify", &reference])
        .run()
        .assert_success();

    // Pinned by the manifest's digest: the same image, its version named after the digest.
    let pinned = fuse_json(
        &sb,
        [
            "pull",
            &format!("{}@{manifest_digest}", registry.reference("x/hello")),
            "--json",
        ],
    );
    assert_eq!(pinned["digest"], image.as_str(), "{pinned}");
    let hex = manifest_digest.trim_start_matches("sha256:");
    assert_eq!(
        pinned["image"],
        registry.reference(&format!("x/hello:sha256-{}", &hex[..16]))
    );
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = fuse(&sb)
        .args([
            "pull",
            &format!("{}@{wrong}", registry.reference("x/hello")),
        ])
        .run();
    assert_one_error(&out, &["HTTP 404"]);

    // What skopeo copied back pulls as the same image; the parts the store has are reused.
    let again = fuse_json(&sb, ["pull", &copy, "--json"]);
    assert_eq!(again["digest"], image.as_str(), "{again}");
    assert_eq!(
        again["blobs_reused"], 4,
        "kernel, initrd, rootfs and appfs are in the store: {again}"
    );
    assert_eq!(again["blobs_received"], 2, "config and EFI stub: {again}");
    assert_no_leaked_qemu();
}

#[test]
fn run_pulls_by_itself_and_a_corrupt_blob_is_refused_with_nothing_stored() {
    let builder = Sandbox::new();
    let registry = Registry::start(builder.dir.path(), None);
    let image = build_hello(&builder);
    let reference = registry.reference("x/hello:1.0");
    fuse(&builder)
        .args(["push", "hello:1.0", &reference])
        .run()
        .assert_success();

    // Another machine's store: `fuse run REF` pulls, then boots.
    let user = Sandbox::new();
    let out = fuse(&user).args(["run", &reference]).run();
    out.assert_success()
        .assert_stdout_contains("hello from the guest")
        .assert_stderr_contains("pulling it");
    let stored = fuse_json(&user, ["inspect", &reference, "--json"]);
    assert_eq!(stored["digest"], image.as_str());
    // A second run finds it in the store.
    let out = fuse(&user).args(["run", &reference]).run();
    out.assert_success();
    assert!(!out.stderr_str().contains("pulling"), "{out}");
    // A local name without a registry host stays local.
    let out = fuse(&user).args(["run", "hello:1.0"]).run();
    assert_one_error(&out, &["No app file or image named 'hello:1.0'"]);

    // One byte of the app's filesystem (the hello's largest part) flipped in the registry's
    // storage: the pull refuses it, naming the blob, and stores nothing.
    let appfs = stored["appfs"]["digest"].as_str().unwrap().to_string();
    flip_byte(&registry.blob_data(&appfs), 4096);
    let fresh = Sandbox::new();
    let out = fuse(&fresh).args(["pull", &reference]).run();
    let short = &appfs.trim_start_matches("sha256:")[..12];
    assert_one_error(&out, &["corrupt", short, "appfs", "nothing was stored"]);
    assert!(listed(&fresh).is_empty(), "nothing stored");
    let blobs = std::fs::read_dir(fresh.home().join("images/blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "no blob stored either");
    let out = fuse(&fresh).args(["run", &reference]).run();
    assert_one_error(&out, &["corrupt", short]);
    assert!(listed(&fresh).is_empty());
    assert_no_leaked_qemu();
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and an htpasswd file (bcrypt) with
/// user `ci`, password `s3cret`.
fn secure(dir: &Path) -> (Secured, PathBuf) {
    let openssl = |args: &[&str], what: &str| {
        tool(Command::new("openssl").args(args).current_dir(dir), what);
    };
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=fuse test CA",
        ],
        "openssl: CA",
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        "openssl: server key",
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
        "openssl: server certificate",
    );
    let htpasswd = tool(
        Command::new("htpasswd").args(["-Bbn", "ci", "s3cret"]),
        "htpasswd",
    );
    std::fs::write(dir.join("htpasswd"), htpasswd).unwrap();
    (
        Secured {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            htpasswd: dir.join("htpasswd"),
        },
        dir.join("ca.crt"),
    )
}

#[test]
fn basic_auth_and_tls_with_a_private_ca() {
    let sb = Sandbox::new();
    let (secured, ca) = secure(sb.dir.path());
    let registry = Registry::start(sb.dir.path(), Some(&secured));
    let image = build_hello(&sb);
    let reference = registry.reference("team/hello:1.0");
    let host = registry.reference("");
    let host = host.trim_end_matches('/');
    let ca = ca.to_str().unwrap();
    let config = sb.dir.join("docker/config.json");

    // The CA is not the system's: refused, saying what to do.
    let out = fuse(&sb).args(["push", "hello:1.0", &reference]).run();
    assert_one_error(&out, &[host, "TLS", "--ca-cert"]);
    // Trusted, but not logged in.
    let out = fuse(&sb)
        .args(["push", "hello:1.0", &reference, "--ca-cert", ca])
        .run();
    assert_one_error(&out, &[host, "HTTP 401", &format!("fuse login {host}")]);
    // A wrong password is refused and not saved; no password is ever taken in argv.
    let out = login_ci(&sb, host, "wrong\n", &["--ca-cert", ca]);
    assert_one_error(
        &out,
        &["Login to", "HTTP 401", "refused the credentials of ci"],
    );
    assert!(!config.exists() || !std::fs::read_to_string(&config).unwrap().contains(host));
    let out = fuse(&sb).args(["login", host, "-u", "ci"]).run();
    assert_one_error(&out, &["--password-stdin"]);

    let out = login_ci(&sb, host, "s3cret\n", &["--ca-cert", ca]);
    out.assert_success();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the Docker config holds a secret");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    // base64("ci:s3cret"), where docker login puts it.
    assert_eq!(saved["auths"][host]["auth"], "Y2k6czNjcmV0", "{saved}");

    let pushed = fuse_json(
        &sb,
        ["push", "hello:1.0", &reference, "--ca-cert", ca, "--json"],
    );
    assert_eq!(pushed["blobs_sent"], 6, "{pushed}");
    fuse(&sb).args(["rm", "hello:1.0"]).run().assert_success();
    let pulled = fuse_json(&sb, ["pull", &reference, "--ca-cert", ca, "--json"]);
    assert_eq!(pulled["digest"], image.as_str());
    fuse(&sb)
        .args(["run", &reference])
        .run()
        .assert_success()
        .assert_stdout_contains("hello from the guest");

    // Logged out: the registry refuses a pull again.
    fuse(&sb).args(["logout", host]).run().assert_success();
    let saved = std::fs::read_to_string(&config).unwrap();
    assert!(!saved.contains(host), "{saved}");
    let out = fuse(&sb)
        .args([
            "pull",
            &registry.reference("team/hello:1.0"),
            "--ca-cert",
            ca,
        ])
        .env("FUSE_HOME", sb.dir.join("other-home"))
        .run();
    assert_one_error(&out, &["HTTP 401"]);
    assert_no_leaked_qemu();
}

const TOKEN_SERVICE: &str = "fuse-test-service";
const TOKEN_ISSUER: &str = "fuse-test-issuer";

fn base64(bytes: &[u8], url: bool) -> String {
    let table: &[u8] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if !url {
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
    }
    out
}

/// What the token service was asked: the scope, and whether credentials came with it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenRequest {
    scope: String,
    authenticated: bool,
}

/// A token service as distribution's token auth specifies it, on 127.0.0.1: Basic auth
/// `ci:s3cret` earns a JWT (RS256, signed by openssl with `key`, its certificate in `x5c`)
/// granting the scope asked for; no or wrong credentials, 401. Serves until the test ends
/// (each accept is bounded by the test's own timeout).
fn token_service(
    key: PathBuf,
    cert_der: Vec<u8>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<TokenRequest>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap_or(0);
            let mut authorization = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("authorization") {
                        authorization = v.trim().to_string();
                    }
                }
            }
            let target = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            let query = target.split_once('?').map_or("", |(_, q)| q);
            let scopes: Vec<String> = query
                .split('&')
                .filter_map(|kv| kv.strip_prefix("scope="))
                .map(|s| {
                    s.replace("%3A", ":")
                        .replace("%2F", "/")
                        .replace("%2C", ",")
                })
                .collect();
            let scope = scopes.join(" ");
            let authenticated = authorization == format!("Basic {}", base64(b"ci:s3cret", false));
            log.lock().unwrap().push(TokenRequest {
                scope: scope.clone(),
                authenticated,
            });
            if !authenticated {
                let _ = stream.write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let access: Vec<serde_json::Value> = scopes
                .iter()
                .filter_map(|s| s.strip_prefix("repository:")?.rsplit_once(':'))
                .map(|(name, actions)| {
                    serde_json::json!({
                        "type": "repository",
                        "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>(),
                    })
                })
                .collect();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [base64(&cert_der, false)]});
            let claims = serde_json::json!({
                "iss": TOKEN_ISSUER, "sub": "ci", "aud": TOKEN_SERVICE,
                "exp": now + 600, "nbf": now - 60, "iat": now - 60,
                "jti": format!("{now}-{}", log.lock().unwrap().len()), "access": access,
            });
            let signing_input = format!(
                "{}.{}",
                base64(header.to_string().as_bytes(), true),
                base64(claims.to_string().as_bytes(), true)
            );
            let mut openssl = Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(&key)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            openssl
                .stdin
                .take()
                .unwrap()
                .write_all(signing_input.as_bytes())
                .unwrap();
            let signature = openssl.wait_with_output().unwrap().stdout;
            let token = format!("{signing_input}.{}", base64(&signature, true));
            let body =
                serde_json::json!({"token": token, "access_token": token, "expires_in": 600})
                    .to_string();
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    (realm, seen)
}

#[test]
fn bearer_tokens_from_the_registrys_token_service() {
    let sb = Sandbox::new();
    let dir = sb.dir.path();
    tool(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.crt",
                "-days",
                "2",
                "-subj",
                "/CN=fuse test token signer",
            ])
            .current_dir(dir),
        "openssl: token signer",
    );
    let der = Command::new("openssl")
        .args(["x509", "-in", "token.crt", "-outform", "DER"])
        .current_dir(dir)
        .output()
        .unwrap()
        .stdout;
    let (realm, seen) = token_service(dir.join("token.key"), der);
    let registry = Registry::start_with(
        dir,
        None,
        Some(&TokenAuth {
            realm,
            cert: dir.join("token.crt"),
        }),
    );
    let image = build_hello(&sb);
    let reference = registry.reference("team/hello:1.0");
    let host = registry.reference("");
    let host = host.trim_end_matches('/');

    // Anonymous: the token service refuses, and the error says to log in.
    let out = fuse(&sb).args(["push", "hello:1.0", &reference]).run();
    assert_one_error(&out, &[host, "HTTP 401", &format!("fuse login {host}")]);

    login_ci(&sb, host, "s3cret", &[]).assert_success();
    let pushed = fuse_json(&sb, ["push", "hello:1.0", &reference, "--json"]);
    assert_eq!(pushed["blobs_sent"], 6, "{pushed}");
    fuse(&sb).args(["rm", "hello:1.0"]).run().assert_success();
    let pulled = fuse_json(&sb, ["pull", &reference, "--json"]);
    assert_eq!(pulled["digest"], image.as_str());

    let seen_all = seen;
    let seen = seen_all.lock().unwrap().clone();
    let asked = |scope: &str| {
        seen.iter()
            .any(|r| r.authenticated && r.scope.split(' ').any(|s| s == scope))
    };
    assert!(
        asked("repository:team/hello:pull,push"),
        "push asks pull,push: {seen:?}"
    );
    assert!(
        asked("repository:team/hello:pull"),
        "pull asks pull only: {seen:?}"
    );
    assert!(
        seen.iter().any(|r| r.authenticated && r.scope.is_empty()),
        "login asks a token for the registry itself: {seen:?}"
    );

    // Another repository of the registry: every blob is mounted from the first, none sent; the
    // token asked to pull from it too.
    let mounted = fuse_json(
        &sb,
        [
            "push",
            &reference,
            &registry.reference("team/other:1"),
            "--json",
        ],
    );
    assert_eq!(mounted["blobs_mounted"], 6, "{mounted}");
    assert_eq!(mounted["blobs_sent"], 0, "{mounted}");
    let seen = seen_all.lock().unwrap().clone();
    assert!(
        seen.iter().any(|r| r.authenticated
            && r.scope == "repository:team/other:pull,push repository:team/hello:pull"),
        "{seen:?}"
    );
}

/// A registry that is not up yet when the push starts (a restart, a flaky network): the
/// push's requests are tried again with backoff and it completes once the registry answers.
#[test]
fn a_push_waits_out_a_registry_that_comes_up_late() {
    let sb = Sandbox::new();
    build_hello(&sb);
    // The port holds a listener that drops the push's first connection unanswered (a
    // registry going down): the push can only complete by trying again.
    let early = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = early.local_addr().unwrap().port();
    early.set_nonblocking(true).unwrap();
    let reference = format!("127.0.0.1:{port}/x/hello:1.0");
    let push = fuse(&sb)
        .args(["push", "hello:1.0", &reference, "--json"])
        .spawn();
    let first = wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
        early.accept().ok()
    });
    assert!(first.is_some(), "the push never connected");
    drop(first);
    drop(early);
    let registry = Registry::start_on(sb.dir.path(), port, None, None);
    let out = push.wait();
    let pushed = json(out.assert_success());
    assert_eq!(pushed["blobs_sent"], 6, "{pushed}");
    drop(registry);

    // Nothing listening at all: a clear error after the tries, naming the registry.
    let out = fuse(&sb).args(["push", "hello:1.0", &reference]).run();
    assert_one_error(
        &out,
        &[
            &format!("Registry 127.0.0.1:{port}: connect"),
            "cannot connect",
            "after 5 tries",
        ],
    );
}

/// `skopeo inspect --raw` of `reference` (plain HTTP), as JSON, and its sha256.
fn skopeo_raw(dir: &Path, reference: &str) -> (serde_json::Value, String) {
    let raw = tool(
        Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ]),
        "skopeo inspect --raw",
    );
    let file = dir.join("raw.json");
    std::fs::write(&file, &raw).unwrap();
    (
        serde_json::from_str(&raw).unwrap(),
        format!("sha256:{}", sha256_hex(&file)),
    )
}

/// The `platform.architecture` of every entry of an index, in order.
fn index_arches(index: &serde_json::Value) -> Vec<String> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["platform"]["os"], "linux", "{index}");
            m["platform"]["architecture"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn two_arches_under_one_tag_make_an_index_and_pull_picks_one() {
    let sb = Sandbox::new();
    let registry = Registry::start(sb.dir.path(), None);
    let amd = build_hello(&sb);
    let app = sb.program_for("aarch64", HELLO, "hello-arm", &["-static"]);
    let out = fuse(&sb)
        .args([
            "build",
            "--json",
            "--arch",
            "aarch64",
            "--name",
            "hello-arm64:1.0",
        ])
        .arg(&app)
        .run();
    let arm = json(out.assert_success())["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let reference = registry.reference("x/hello:1.0");
    let push = |image: &str, reference: &str, extra: &[&str]| {
        json(
            fuse(&sb)
                .args(["push", image, reference, "--json"])
                .args(extra)
                .run()
                .assert_success(),
        )
    };

    // One arch: a plain manifest, as before.
    let first = push("hello:1.0", &reference, &[]);
    assert_eq!(first["index_digest"], serde_json::Value::Null, "{first}");
    assert_eq!(first["platforms"], serde_json::json!(["linux/amd64"]));
    // The other arch to the same tag: an index of both.
    let second = push("hello-arm64:1.0", &reference, &[]);
    let index_digest = second["index_digest"].as_str().unwrap().to_string();
    assert_eq!(
        second["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    let (index, raw_digest) = skopeo_raw(sb.dir.path(), &reference);
    assert_eq!(
        raw_digest, index_digest,
        "skopeo reads the index fuse pushed"
    );
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(index["artifactType"], "application/vnd.fuse.image.v1+json");
    assert_eq!(index_arches(&index), ["amd64", "arm64"]);
    assert_eq!(index["manifests"][0]["digest"], first["digest"]);
    assert_eq!(index["manifests"][1]["digest"], second["digest"]);
    for m in index["manifests"].as_array().unwrap() {
        assert_eq!(m["artifactType"], "application/vnd.fuse.image.v1+json");
    }
    // The same arch again replaces its entry: the same image, the same index.
    let again = push("hello:1.0", &reference, &[]);
    assert_eq!(again["index_digest"], index_digest.as_str(), "{again}");
    // The other order, to another tag: the same index bytes.
    let other = registry.reference("x/hello:other-order");
    push("hello-arm64:1.0", &other, &[]);
    let reversed = push("hello:1.0", &other, &[]);
    assert_eq!(
        reversed["index_digest"],
        index_digest.as_str(),
        "deterministic"
    );

    // Pull picks the host's arch, or --arch.
    let pulled = fuse_json(&sb, ["pull", &reference, "--arch", "aarch64", "--json"]);
    assert_eq!(pulled["digest"], arm.as_str(), "{pulled}");
    assert_eq!(pulled["index_digest"], index_digest.as_str());
    assert_eq!(pulled["manifest_digest"], second["digest"]);
    // The stored image is arm64: `run --arch x86_64` pulls the x86_64 one and boots it.
    let out = fuse(&sb)
        .args(["run", "--arch", "x86_64", &reference])
        .run();
    out.assert_success()
        .assert_stdout_contains("hello from the guest")
        .assert_stderr_contains("is stored for aarch64, not x86_64: pulling it");
    let inspected = fuse_json(&sb, ["inspect", &reference, "--json"]);
    assert_eq!(inspected["digest"], amd.as_str());
    let host = fuse_json(&sb, ["pull", &reference, "--json"]);
    assert_eq!(host["digest"], amd.as_str(), "the host's arch: {host}");

    // An index without this host's arch (made by hand, with the arm64 entry alone): one
    // error naming the arches it has.
    let mut arm_only = index.clone();
    arm_only["manifests"] = serde_json::json!([index["manifests"][1].clone()]);
    let file = sb.dir.path().join("arm-only.json");
    std::fs::write(&file, serde_json::to_vec(&arm_only).unwrap()).unwrap();
    tool(
        Command::new("curl")
            .args(["-sSf", "-X", "PUT", "-H"])
            .arg("Content-Type: application/vnd.oci.image.index.v1+json")
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(format!(
                "http://127.0.0.1:{}/v2/x/hello/manifests/arm-only",
                registry.port
            )),
        "curl PUT index",
    );
    let out = fuse(&sb)
        .args([
            "pull",
            &registry.reference("x/hello:arm-only"),
            "--arch",
            "x86_64",
        ])
        .run();
    assert_one_error(
        &out,
        &["has no image for x86_64 (linux/amd64): it has linux/arm64 (--arch aarch64)"],
    );

    // A single image of another arch than the one asked for: one clear error.
    let single = registry.reference("x/only-amd64:1.0");
    push("hello:1.0", &single, &[]);
    let out = fuse(&sb).args(["pull", &single, "--arch", "aarch64"]).run();
    assert_one_error(
        &out,
        &["is an image for x86_64, not aarch64", "nothing was stored"],
    );

    // containerDisks of both arches under one tag: an index of ordinary container images.
    let disks = registry.reference("x/hello-disk:1.0");
    push(
        "hello:1.0",
        &disks,
        &["--containerdisk", "--disk-format", "raw"],
    );
    let both = push(
        "hello-arm64:1.0",
        &disks,
        &["--containerdisk", "--disk-format", "raw"],
    );
    let (index, raw_digest) = skopeo_raw(sb.dir.path(), &disks);
    assert_eq!(Some(raw_digest.as_str()), both["index_digest"].as_str());
    assert_eq!(index_arches(&index), ["amd64", "arm64"]);
    assert_eq!(index.get("artifactType"), None, "{index}");
    // fuse pull of a containerDisk says what it is.
    let out = fuse(&sb).args(["pull", &disks]).run();
    assert_one_error(&out, &["not a fuse image"]);
    assert_no_leaked_qemu();
}

/// The one layer of the image skopeo copied to `layout` (tag `tag`), and its config.
fn oci_layer(layout: &Path, tag: &str) -> (PathBuf, serde_json::Value) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {index}"));
    let blob = |d: &serde_json::Value| {
        layout
            .join("blobs/sha256")
            .join(d.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&entry["digest"])).unwrap()).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&manifest["config"]["digest"])).unwrap())
            .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0], layers[0]["digest"],
        "an uncompressed layer is its own diff_id"
    );
    (blob(&layers[0]["digest"]), config)
}

#[test]
fn a_containerdisk_holds_the_disk_as_kubevirt_wants_it() {
    let sb = Sandbox::new();
    let registry = Registry::start(sb.dir.path(), None);
    let image = build_hello(&sb);
    let dir = sb.dir.path();

    let out = fuse(&sb)
        .args([
            "push",
            "hello:1.0",
            &registry.reference("x/d:1"),
            "--disk-format",
            "raw",
        ])
        .run();
    assert_one_error(&out, &["--disk-format", "add --containerdisk"]);
    let out = fuse(&sb)
        .args([
            "push",
            "hello:1.0",
            &registry.reference("x/d:1"),
            "--containerdisk",
            "--disk-format",
            "vmdk",
        ])
        .run();
    out.assert_failure()
        .assert_stderr_contains("use qcow2 or raw");

    let layout = dir.join("layout");
    let mut pushed = Vec::new();
    for format in ["raw", "qcow2"] {
        let reference = registry.reference(&format!("x/hello-disk:{format}"));
        let push = || {
            json(
                fuse(&sb)
                    .args(["push", "hello:1.0", &reference, "--json", "--containerdisk"])
                    .args(["--disk-format", format])
                    .run()
                    .assert_success(),
            )
        };
        let first = push();
        assert_eq!(first["blobs_sent"], 2, "config and layer: {first}");
        assert_eq!(push()["digest"], first["digest"], "deterministic");
        pushed.push(first["digest"].as_str().unwrap().to_string());

        // skopeo sees an ordinary image for this machine.
        let inspected: serde_json::Value = serde_json::from_str(&tool(
            Command::new("skopeo").args([
                "inspect",
                "--tls-verify=false",
                &format!("docker://{reference}"),
            ]),
            "skopeo inspect",
        ))
        .unwrap();
        assert_eq!(inspected["Architecture"], "amd64", "{inspected}");
        assert_eq!(inspected["Os"], "linux", "{inspected}");
        assert_eq!(inspected["Layers"].as_array().unwrap().len(), 1);

        tool(
            Command::new("skopeo").args([
                "copy",
                "--src-tls-verify=false",
                // Else skopeo gzips the layer on its way to the layout.
                "--dest-oci-accept-uncompressed-layers",
                &format!("docker://{reference}"),
                &format!("oci:{}:{format}", layout.display()),
            ]),
            "skopeo copy to oci:",
        );
        let (layer, config) = oci_layer(&layout, format);
        assert_eq!(config["architecture"], "amd64");
        let listing = tool(
            Command::new("tar")
                .args(["--numeric-owner", "-tvf"])
                .arg(&layer),
            "tar -tvf",
        );
        let file = if format == "raw" {
            "disk.img"
        } else {
            "disk.qcow2"
        };
        let lines: Vec<Vec<&str>> = listing
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 2, "exactly /disk/ and its file:\n{listing}");
        assert_eq!(
            (lines[0][0], lines[0][1], lines[0][5]),
            ("dr-xr-xr-x", "107/107", "disk/"),
            "{listing}"
        );
        assert_eq!(
            (lines[1][0], lines[1][1], lines[1][5]),
            ("-r--r-----", "107/107", format!("disk/{file}").as_str()),
            "{listing}"
        );
        let out_dir = dir.join(format!("extracted-{format}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        tool(
            Command::new("tar")
                .args(["-xf"])
                .arg(&layer)
                .arg("-C")
                .arg(&out_dir),
            "tar -xf",
        );
        let extracted = out_dir.join("disk").join(file);
        let raw = if format == "raw" {
            extracted
        } else {
            let raw = out_dir.join("back.raw");
            tool(
                Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw"])
                    .arg(&extracted)
                    .arg(&raw),
                "qemu-img convert back to raw",
            );
            raw
        };
        assert_eq!(
            format!("sha256:{}", sha256_hex(&raw)),
            image,
            "{format}: the image's disk bytes"
        );
    }
    assert_ne!(pushed[0], pushed[1]);
}

/// The bytes the registry has received so far for uploads in progress (its `_uploads`).
fn upload_bytes(storage: &Path) -> u64 {
    fn walk(dir: &Path, total: &mut u64, inside: bool) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name();
            let inside = inside || name == "_uploads";
            if path.is_dir() {
                walk(&path, total, inside);
            } else if inside && name == "data" {
                *total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    let mut total = 0;
    walk(storage, &mut total, false);
    total
}

#[test]
fn the_registry_killed_mid_push_and_restarted() {
    let sb = Sandbox::new();
    let dir = sb.dir.path();
    // 48 MiB of random bytes in the image: an upload that takes seconds on loopback.
    let image = build_big(&sb, 48);

    let registry = Registry::start(dir, None);
    let port = registry.port;
    let storage = registry.storage.clone();
    let reference = registry.reference("x/big:1.0");
    // Pushes, and kills the registry once it has 4 MiB more of an upload in progress (not all
    // of it: only the rootfs, 48 MiB, is that large; the kernel is 2.4 MB).
    let push_and_kill = |registry: Registry| {
        let before = upload_bytes(&storage);
        let push = fuse(&sb)
            .args(["push", "big:1.0", &reference, "--json"])
            .spawn();
        let received = wait_until(Duration::from_secs(120), Duration::from_millis(20), || {
            Some(upload_bytes(&storage)).filter(|b| *b >= before + (4 << 20))
        });
        assert!(received.is_some(), "no upload got 4 MiB further");
        drop(registry);
        push
    };

    // Not back: one clear error after the tries, naming the registry and the upload.
    let push = push_and_kill(registry);
    let out = push.wait();
    assert_one_error(
        &out,
        &[
            &format!("Registry 127.0.0.1:{port}: upload blob sha256:"),
            "after 5 tries",
        ],
    );

    // Back on the same port and storage while the push waits: the dropped upload goes on
    // (in a new session: distribution drops one whose chunk was cut off) and the push
    // completes.
    let registry = Registry::start_on(dir, port, None, None);
    let push = push_and_kill(registry);
    let registry = Registry::start_on(dir, port, None, None);
    let out = push.wait();
    let pushed = json(out.assert_success());
    assert!(
        pushed["uploads_restarted"].as_u64().unwrap() + pushed["uploads_resumed"].as_u64().unwrap()
            >= 1,
        "{pushed}"
    );
    assert_eq!(pushed["image_digest"], image.as_str());
    // Everything is there now: a re-run sends the manifest alone.
    let again = fuse_json(&sb, ["push", "big:1.0", &reference, "--json"]);
    assert_eq!(again["blobs_sent"], 0, "{again}");
    assert_eq!(again["digest"], pushed["digest"]);

    // What the registry kept is the image: pulled into an empty store, the same digest.
    fuse(&sb).args(["rm", "big:1.0"]).run().assert_success();
    let pulled = fuse_json(&sb, ["pull", &reference, "--json"]);
    assert_eq!(pulled["digest"], image.as_str(), "{pulled}");
    drop(registry);
}

/// `fuse push --sbom` attaches the image's SBOM to the pushed manifest. distribution 2.8 has
/// no referrers API, so it goes under the tag schema fallback: an index tagged
/// `sha256-<hex>` listing the artifact manifest, whose `subject` is the pushed manifest.
/// `fuse sbom REF` reads it back, the same bytes `fuse sbom IMAGE` makes locally; a second
/// push keeps one entry (the same artifact manifest).
#[test]
fn push_sbom_attaches_it_under_the_fallback_tag_and_sbom_reads_it_back() {
    let sb = Sandbox::new();
    let registry = Registry::start(sb.dir.path(), None);
    build_hello(&sb);
    let reference = registry.reference("x/hello:1.0");

    // Nothing attached yet: one clear error.
    fuse(&sb)
        .args(["push", "hello:1.0", &reference])
        .run()
        .assert_success();
    let out = fuse(&sb).args(["sbom", &reference]).run();
    assert_one_error(&out, &["no application/spdx+json attached", "--sbom"]);

    let pushed = fuse_json(&sb, ["push", "hello:1.0", &reference, "--sbom", "--json"]);
    let manifest_digest = pushed["digest"].as_str().unwrap();
    let sbom_digest = pushed["sbom_digest"].as_str().unwrap().to_string();

    let local = sb.dir.join("local.spdx.json");
    fuse(&sb)
        .args(["sbom", "hello:1.0", "-o"])
        .arg(&local)
        .run()
        .assert_success();
    let remote = sb.dir.join("remote.spdx.json");
    fuse(&sb)
        .args(["sbom", &reference, "-o"])
        .arg(&remote)
        .run()
        .assert_success();
    assert_eq!(
        std::fs::read(&local).unwrap(),
        std::fs::read(&remote).unwrap(),
        "the SBOM read back is not the one made locally"
    );

    // skopeo, not fuse, reads the fallback index and the artifact manifest.
    let hex = manifest_digest.trim_start_matches("sha256:");
    let fallback = registry.reference(&format!("x/hello:sha256-{hex}"));
    let (index, _) = skopeo_raw(sb.dir.path(), &fallback);
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["digest"], sbom_digest.as_str(), "{index}");
    assert_eq!(entries[0]["artifactType"], "application/spdx+json");
    let (artifact, digest) = skopeo_raw(
        sb.dir.path(),
        &registry.reference(&format!("x/hello@{sbom_digest}")),
    );
    assert_eq!(digest, sbom_digest);
    assert_eq!(artifact["artifactType"], "application/spdx+json");
    assert_eq!(artifact["subject"]["digest"], manifest_digest, "{artifact}");
    assert_eq!(
        artifact["layers"][0]["digest"],
        format!("sha256:{}", sha256_hex(&local)).as_str()
    );

    // Pushed again: the same artifact, still listed once.
    let again = fuse_json(&sb, ["push", "hello:1.0", &reference, "--sbom", "--json"]);
    assert_eq!(again["sbom_digest"], sbom_digest.as_str());
    let (index, _) = skopeo_raw(sb.dir.path(), &fallback);
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1, "{index}");
}

/// `fuse test REF --attach` boots the image pulled from REF and attaches its JSON report to
/// the image's manifest beside the SBOM: the fallback index then lists both, and the report
/// blob is the bytes of `--json FILE`. A local image cannot be attached to: one clear error.
#[test]
fn test_attach_pushes_the_report_as_a_referrer() {
    let sb = Sandbox::new();
    let registry = Registry::start(sb.dir.path(), None);
    build_hello(&sb);
    let reference = registry.reference("x/hello:1.0");
    let out = fuse(&sb).args(["test", "hello:1.0", "--attach"]).run();
    assert_one_error(&out, &["--attach", "registry reference"]);

    let pushed = fuse_json(&sb, ["push", "hello:1.0", &reference, "--sbom", "--json"]);
    let manifest_digest = pushed["digest"].as_str().unwrap();
    let report = sb.dir.join("report.json");
    let out = fuse(&sb)
        .args([
            "test",
            &reference,
            "--attach",
            "--expect-contains",
            "hello from the guest",
            "--json",
        ])
        .arg(&report)
        .run();
    out.assert_success();
    assert!(
        out.stderr_str().contains("attached the test report"),
        "{out}"
    );
    let hex = manifest_digest.trim_start_matches("sha256:");
    let (index, _) = skopeo_raw(
        sb.dir.path(),
        &registry.reference(&format!("x/hello:sha256-{hex}")),
    );
    let entries = index["manifests"].as_array().unwrap();
    let types: Vec<&str> = entries
        .iter()
        .map(|e| e["artifactType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "application/spdx+json",
            "application/vnd.fuse.test-report.v1+json"
        ],
        "{index}"
    );
    let (artifact, _) = skopeo_raw(
        sb.dir.path(),
        &registry.reference(&format!(
            "x/hello@{}",
            entries[1]["digest"].as_str().unwrap()
        )),
    );
    assert_eq!(artifact["subject"]["digest"], manifest_digest, "{artifact}");
    let blob = registry.blob_data(artifact["layers"][0]["digest"].as_str().unwrap());
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        std::fs::read(&report).unwrap(),
        "the attached report is not the one written"
    );
    // The SBOM is still found among them.
    fuse(&sb).args(["sbom", &reference]).run().assert_success();
    fuse_tests::assert_no_leaked_qemu();
}

/// `n` bytes that do not compress (xorshift), so the jar's size is what a push must move.
fn incompressible(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The app is a filesystem and a layer of its own, its configuration in it: after a new
/// version of the jar (renamed with its version, as Maven names it: the spec names the new
/// file), a push sends the app's layer, the config and the manifest, and skips the kernel, the
/// init, the stub and the root with the Java runtime: at most the jar's size plus 1 MiB.
/// Pulled into an empty store, the new version boots and prints what the new jar says.
#[test]
fn a_push_after_a_jar_change_sends_only_the_app() {
    let sb = Sandbox::new();
    let registry = Registry::start(sb.dir.path(), None);
    let data = sb.dir.path().join("data.bin");
    std::fs::write(&data, incompressible(2 << 20, 7)).unwrap();
    let jar = |version: &str| {
        let dir = sb.dir.path().join(version);
        std::fs::create_dir_all(&dir).unwrap();
        let main = format!(
            "public class Main {{ public static void main(String[] a) {{ System.out.println(\"shop {version}\"); }} }}"
        );
        common::java_jar(
            &dir,
            &format!("shop-{version}.jar"),
            "Main",
            &[("Main.java", &main)],
            &[("data.bin", &data)],
        )
    };

    let v1 = jar("1.0");
    fuse(&sb).args(["build"]).arg(&v1).run().assert_success();
    let reference = registry.reference("team/shop:1.0");
    let first = fuse_json(&sb, ["push", "shop:1.0", &reference, "--json"]);
    let stored = fuse_json(&sb, ["inspect", "shop:1.0", "--json"]);
    let rootfs = stored["rootfs"]["size"].as_u64().unwrap();
    assert!(
        first["bytes_sent"].as_u64().unwrap() > rootfs,
        "the first push sends the root with the runtime: {first}"
    );

    let v2 = jar("1.1");
    let jar_size = std::fs::metadata(&v2).unwrap().len();
    fuse(&sb).args(["build"]).arg(&v2).run().assert_success();
    let rebuilt = fuse_json(&sb, ["inspect", "shop:1.1", "--json"]);
    assert_eq!(
        rebuilt["rootfs"]["digest"], stored["rootfs"]["digest"],
        "a new jar leaves the root's bytes as they were"
    );
    assert_ne!(rebuilt["appfs"]["digest"], stored["appfs"]["digest"]);
    let reference = registry.reference("team/shop:1.1");
    let second = fuse_json(&sb, ["push", "shop:1.1", &reference, "--json"]);
    let sent = second["bytes_sent"].as_u64().unwrap();
    assert!(
        sent <= jar_size + (1 << 20),
        "{sent} bytes sent for a {jar_size}-byte jar: {second}"
    );
    assert_eq!(
        second["blobs_sent"], 2,
        "the config and the app's layer: {second}"
    );
    assert_eq!(second["blobs_skipped"], 4, "{second}");

    fuse(&sb).args(["rm", "shop:1.1"]).run().assert_success();
    let out = fuse(&sb).args(["run", &reference]).run();
    out.assert_success().assert_stdout_contains("shop 1.1");
    assert_no_leaked_qemu();
}

/// Where a [`CuttingProxy`] cuts its one connection.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// At the start of the first upload request (PATCH or PUT) after the threshold: the
    /// registry gets none of that request.
    AtRequest,
    /// As soon as the threshold is passed: the registry gets part of a chunk.
    MidRequest,
}

/// A TCP proxy on 127.0.0.1 in front of a registry that, once `threshold` bytes have gone to
/// the registry, drops one connection (both ways, as a network fault would) and forwards
/// everything else as it comes. It counts the connections open at once.
struct CuttingProxy {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut_done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    most_open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    accepting: Option<std::thread::JoinHandle<()>>,
}

impl CuttingProxy {
    fn start(upstream: u16, threshold: u64, cut: Cut) -> CuttingProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let cut_done = Arc::new(AtomicBool::new(false));
        let most_open = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let sent_total = sent.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let (stop2, cut2, most2) = (stop.clone(), cut_done.clone(), most_open.clone());
        let accepting = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut client) = client else { continue };
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                most2.fetch_max(now, Ordering::SeqCst);
                let (mut client_r, mut server_w) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (sent, cut_done, open) = (sent.clone(), cut2.clone(), open.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client_r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let before = sent.fetch_add(n as u64, Ordering::SeqCst);
                        let upload =
                            buf[..n].starts_with(b"PATCH ") || buf[..n].starts_with(b"PUT ");
                        let here = match cut {
                            Cut::AtRequest => before >= threshold && upload,
                            Cut::MidRequest => before + n as u64 >= threshold,
                        };
                        if here && !cut_done.swap(true, Ordering::SeqCst) {
                            if cut == Cut::MidRequest {
                                let _ = server_w.write_all(&buf[..n / 2]);
                            }
                            break;
                        }
                        if server_w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client_r.shutdown(Shutdown::Both);
                    let _ = server_w.shutdown(Shutdown::Both);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server, &mut client);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                });
            }
        });
        CuttingProxy {
            port,
            stop,
            cut_done,
            sent: sent_total,
            most_open,
            accepting: Some(accepting),
        }
    }

    fn reference(&self, repository_tag: &str) -> String {
        format!("127.0.0.1:{}/{repository_tag}", self.port)
    }

    fn did_cut(&self) -> bool {
        self.cut_done.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes that went to the registry (requests, bodies and all).
    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn most_open(&self) -> usize {
        self.most_open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accepting thread up to see it.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
    }
}

/// Builds `big:1.0`, a hello image with `mib` MiB of random bytes in its root (32 MiB: a
/// rootfs of five chunks); returns its digest.
fn build_big(sb: &Sandbox, mib: usize) -> String {
    let dir = sb.dir.path();
    let app = sb.program(HELLO, "big-1.0", &["-static"]);
    let mut random = vec![0u8; mib << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .unwrap();
    std::fs::write(dir.join("blob.bin"), &random).unwrap();
    std::fs::write(
        dir.join("big.toml"),
        "[files]\n\"/data/blob.bin\" = \"blob.bin\"\n",
    )
    .unwrap();
    let out = fuse(sb)
        .args(["build", "--json", "--config"])
        .arg(dir.join("big.toml"))
        .arg(&app)
        .run();
    json(out.assert_success())["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A connection dropped between two chunks of an upload: the push asks the registry where
/// the session is and goes on from there (no new session); the blobs go several at a time.
/// Dropped in the middle of a chunk, distribution no longer knows the session (its data is
/// not what its state says): the blob is sent again in a new one. Either way the push
/// completes with the same manifest, and a parallel pull of it gives the image back.
#[test]
fn an_upload_cut_off_resumes_or_restarts_and_transfers_run_in_parallel() {
    let sb = Sandbox::new();
    let dir = sb.dir.path();
    let image = build_big(&sb, 32);

    let registry = Registry::start(dir, None);
    let proxy = CuttingProxy::start(registry.port, 12 << 20, Cut::AtRequest);
    let reference = proxy.reference("x/big:1.0");
    let resumed = fuse_json(&sb, ["push", "big:1.0", &reference, "--json"]);
    assert!(proxy.did_cut(), "the proxy cut no connection: {resumed}");
    assert_eq!(resumed["uploads_resumed"], 1, "{resumed}");
    assert_eq!(resumed["uploads_restarted"], 0, "{resumed}");
    assert_eq!(resumed["blobs_sent"], 6, "{resumed}");
    // No chunk went twice: what crossed the proxy is the blobs and some headers.
    let blob_bytes = resumed["bytes_sent"].as_u64().unwrap();
    assert!(
        proxy.sent() < blob_bytes + (1 << 20),
        "{} bytes through the proxy for {blob_bytes} of blobs",
        proxy.sent()
    );
    assert_eq!(resumed["image_digest"], image.as_str());
    assert!(
        proxy.most_open() >= 3,
        "blobs uploaded one at a time: at most {} connections at once",
        proxy.most_open()
    );

    let second = dir.join("second");
    std::fs::create_dir_all(&second).unwrap();
    let other = Registry::start(&second, None);
    let cutter = CuttingProxy::start(other.port, 12 << 20, Cut::MidRequest);
    let restarted = fuse_json(
        &sb,
        ["push", "big:1.0", &cutter.reference("y/big:1.0"), "--json"],
    );
    assert!(cutter.did_cut(), "the proxy cut no connection: {restarted}");
    assert_eq!(restarted["uploads_restarted"], 1, "{restarted}");
    assert_eq!(restarted["uploads_resumed"], 0, "{restarted}");
    assert!(
        cutter.sent() > blob_bytes + (1 << 20),
        "the cut blob went again"
    );
    assert_eq!(restarted["blobs_sent"], 6, "{restarted}");
    assert_eq!(restarted["digest"], resumed["digest"], "deterministic");

    // What the first registry kept is the image: pulled (parts in parallel) into an empty
    // store, the same digest; skopeo copies the same manifest.
    fuse(&sb).args(["rm", "big:1.0"]).run().assert_success();
    let pulled = fuse_json(&sb, ["pull", &registry.reference("x/big:1.0"), "--json"]);
    assert_eq!(pulled["digest"], image.as_str(), "{pulled}");
    assert_eq!(pulled["manifest_digest"], resumed["digest"], "{pulled}");
    drop(proxy);
    drop(cutter);
}

/// `fuse push IMAGE` alone: with no push on record and no `repository` in the fuse.toml, one
/// error line and nothing sent; with `repository`, there, tagged with the image's version;
/// after a push elsewhere, where it was pushed last.
#[test]
fn push_without_a_reference_goes_where_configured_or_last_pushed() {
    let sb = Sandbox::new();
    let dir = sb.dir.path();
    let registry = Registry::start(dir, None);
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    fuse(&sb)
        .args(["build", "--json"])
        .arg(&app)
        .run()
        .assert_success();
    let out = fuse(&sb).args(["push", "hello:1.0"]).run();
    assert_one_error(
        &out,
        &[
            "hello:1.0 was never pushed and its fuse.toml sets no `repository`",
            "fuse push hello:1.0 HOST[:PORT]/REPOSITORY[:TAG]",
        ],
    );
    assert!(
        !registry
            .storage
            .join("docker/registry/v2/repositories")
            .exists(),
        "nothing was sent"
    );

    let configured = registry.reference("cfg/hello");
    std::fs::write(
        dir.join("cfg.toml"),
        format!("repository = \"{configured}\"\n"),
    )
    .unwrap();
    fuse(&sb)
        .args(["build", "--json", "--config"])
        .arg(dir.join("cfg.toml"))
        .arg(&app)
        .run()
        .assert_success();
    let pushed = fuse_json(&sb, ["push", "hello:1.0", "--json"]);
    assert_eq!(pushed["reference"], format!("{configured}:1.0"), "{pushed}");
    assert_eq!(pushed["blobs_sent"], 6, "{pushed}");

    let elsewhere = registry.reference("other/hello:1.0");
    fuse_json(&sb, ["push", "hello:1.0", &elsewhere, "--json"]);
    let again = fuse_json(&sb, ["push", "hello:1.0", "--json"]);
    assert_eq!(again["reference"], elsewhere.as_str(), "{again}");
    assert_eq!(again["digest"], pushed["digest"], "{again}");
}
