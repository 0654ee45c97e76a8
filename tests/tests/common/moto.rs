//! moto (`moto_server` from PyPI, in a venv made once per target directory) for the deploy
//! tests: started on 127.0.0.1 with signature checking on (its first three actions, which
//! make an IAM user and its keys, go through unauthenticated; every later request must be
//! signed with those keys), and the helper script that talks to it (deploy/moto_helper.py).

use super::{pypi_venv, run_tool, Sandbox};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const MOTO: &str = "moto[server]==5.2.5";
const HELPER: &str = include_str!("../deploy/moto_helper.py");
pub const REGION: &str = "eu-west-1";

/// The venv with moto and boto3, made once per target directory.
pub fn moto_venv() -> PathBuf {
    pypi_venv("moto-5.2.5", &[MOTO])
}

/// A moto_server on 127.0.0.1 with authentication on, and keys of an IAM user it made; killed
/// and reaped when dropped (also when the test panics).
pub struct Moto {
    child: Child,
    pub url: String,
    venv: PathBuf,
    helper: PathBuf,
    pub key_id: String,
    pub secret: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub fn start(sb: &Sandbox) -> Moto {
        let venv = moto_venv();
        let helper = sb.dir.join("moto_helper.py");
        std::fs::create_dir_all(sb.dir.join("consoles")).unwrap();
        std::fs::write(&helper, HELPER).unwrap();
        let port = super::free_port();
        let log = std::fs::File::create(sb.dir.join("moto.log")).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        // The venv's python, not its bin/moto_server: the fixture was made in a scratch
        // directory and renamed, and scripts' shebangs name the old path. The helper's `serve`
        // is moto_server with one fix (see the script).
        let mut child = Command::new(venv.join("bin/python"));
        child
            .arg(&helper)
            .args([&url, "serve"])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .env("MOTO_ENABLE_AMI_VALIDATION", "true")
            .env("MOTO_RECORDER_FILEPATH", sb.dir.join("moto-recording"))
            .env("MOTO_CONSOLE_DIR", sb.dir.join("consoles"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // The server dies with the test's thread.
        super::die_with_parent(&mut child);
        let child = child.spawn().expect("cannot start moto_server");
        let mut moto = Moto {
            child,
            url,
            venv,
            helper,
            key_id: String::new(),
            secret: String::new(),
        };
        let up = fuse_boot::poll::wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            },
        );
        assert!(
            up.is_some(),
            "moto_server did not listen on 127.0.0.1:{port}"
        );
        let keys = moto.helper(&["keys"]);
        moto.key_id = keys["id"].as_str().unwrap().to_string();
        moto.secret = keys["secret"].as_str().unwrap().to_string();
        moto
    }

    /// Runs the helper script's `command` (JSON out).
    pub fn helper(&self, args: &[&str]) -> Value {
        let out = run_tool(
            Command::new(self.venv.join("bin/python"))
                .arg(&self.helper)
                .arg(&self.url)
                .arg(args[0])
                .arg(REGION)
                .args(&args[1..]),
            "the moto helper script",
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("helper printed no JSON ({e}): {out}"))
    }

    /// The calls moto recorded since the recording was (re)started.
    pub fn recording(&self) -> Vec<Value> {
        self.helper(&["recording"]).as_array().unwrap().clone()
    }

    /// `fuse deploy ami …` aimed at this moto, with nothing of the host's AWS setup.
    pub fn fuse(&self, sb: &Sandbox) -> fuse_tests::FuseCmd {
        let mut cmd = sb
            .fuse()
            .arg("deploy")
            .env("AWS_ENDPOINT_URL", &self.url)
            .env("AWS_CONFIG_FILE", sb.dir.join("aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                sb.dir.join("aws-credentials"),
            );
        for var in [
            "AWS_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL_EC2",
            "AWS_ENDPOINT_URL_EBS",
            "AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2",
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "http_proxy",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd = cmd.env_remove(var);
        }
        cmd.timeout(Duration::from_secs(180))
    }

    /// The same with the IAM user's keys in the environment and the region set.
    pub fn fuse_with_keys(&self, sb: &Sandbox) -> fuse_tests::FuseCmd {
        self.fuse(sb)
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", REGION)
    }
}
