//! What a deployment is, whatever serves it (one instance behind an Elastic IP, `deploy`; or
//! N behind a load balancer, `balanced`): its parameters and outcome, the tags on what it
//! makes, the image's health check and fuse's own probe of a new instance with it.

use super::aws::ec2::{self, Instance};
use super::aws::http::Client;
use super::lock;
use crate::image::config::HealthProbe;
use crate::image::store::StoredImage;
use anyhow::Result;
use std::time::{Duration, Instant};

/// The tags that name a deployment's app and environment, on each thing it made.
pub(crate) const APP_TAG: &str = "fuse:app";
pub(crate) const ENV_TAG: &str = "fuse:env";
/// On the address: the digest served before the current one (what a rollback deploys).
pub(crate) const PREVIOUS_TAG: &str = "fuse:previous-digest";
/// The instance states that still hold (or will hold) a machine.
pub(crate) const LIVE: &[&str] = &["pending", "running", "stopping", "stopped"];
/// Between two looks at an instance or its health.
pub(crate) const POLL: Duration = Duration::from_secs(2);
/// The console lines a failed deployment shows.
pub(crate) const CONSOLE_TAIL: usize = 30;
/// One deployment: what runs where, and how long it may take to become healthy.
#[derive(Debug, Clone)]
pub(crate) struct Deployment {
    pub(crate) app: String,
    pub(crate) env: String,
    pub(crate) instance_type: String,
    /// The instance's user-data (`fuse userdata`'s document): the deploy-time values.
    pub(crate) user_data: String,
    /// From RunInstances to healthy.
    pub(crate) health_timeout: Duration,
    /// Take over another run's lock of the environment (see [`super::lock`]).
    pub(crate) break_lock: bool,
    /// The promotion gate was overridden: the instance is tagged `fuse:forced=true`.
    pub(crate) forced: bool,
    /// `--instances N`: the environment goes (or stays) behind an application load balancer
    /// with N instances; `None` keeps the environment's mode and count (one instance with an
    /// Elastic IP for a new environment).
    pub(crate) instances: Option<u32>,
    /// How long a replaced instance keeps its connections after it leaves the load balancer
    /// (`None`: [`super::balanced::DEREGISTRATION_DELAY`]). Given for an environment served by
    /// one instance, the deployment is refused (see [`super::deploy::resolve_mode`]).
    pub(crate) deregistration_delay: Option<Duration>,
}

/// On an instance deployed past the promotion gate with `--force`.
pub(crate) const FORCED_TAG: &str = "fuse:forced";

/// What a deployment did.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Deployed {
    pub(crate) app: String,
    pub(crate) env: String,
    pub(crate) digest: String,
    pub(crate) image: String,
    pub(crate) ami: String,
    pub(crate) instance: String,
    pub(crate) healthy: bool,
    /// Why it failed (not running in time, unhealthy); `None` when healthy.
    pub(crate) reason: Option<String>,
    /// The Elastic IP address now serving the environment (the old one's when it failed).
    pub(crate) address: Option<String>,
    /// Behind a load balancer: its DNS name, and every instance the deployment launched.
    pub(crate) load_balancer: Option<String>,
    pub(crate) instances: Vec<String>,
    /// Behind a load balancer: the target group of this release (deleted when it failed).
    pub(crate) target_group: Option<String>,
    /// The instances replaced (terminated) by a healthy deployment.
    pub(crate) terminated: Vec<String>,
    /// The last lines of a failed instance's console.
    pub(crate) console_tail: Option<String>,
    /// Which instance's console that is, when not `instance` (behind a load balancer).
    pub(crate) console_of: Option<String>,
    /// Something served the environment before this deployment (for the failure message).
    #[serde(skip)]
    pub(crate) served_before: bool,
    pub(crate) seconds: f64,
}

impl Deployed {
    /// What serves the environment after a failed deployment.
    pub(crate) fn kept(&self) -> String {
        match (&self.load_balancer, &self.address) {
            (Some(lb), _) if self.served_before => {
                format!("{lb} still forwards to the previous release")
            }
            (Some(lb), _) => format!("{lb} serves nothing yet"),
            (None, Some(a)) => format!("{a} still leads to the previous instance"),
            (None, None) => "nothing was serving before".into(),
        }
    }
}

/// What `destroy` removed (of either kind of environment).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Destroyed {
    /// The load balancers' DNS names, and the target groups' names.
    pub(crate) load_balancers: Vec<String>,
    pub(crate) target_groups: Vec<String>,
    pub(crate) instances: Vec<String>,
    pub(crate) addresses: Vec<String>,
    pub(crate) security_groups: Vec<String>,
}

/// The check a deployment must pass, from the image's `healthcheck` (else a TCP connection to
/// its only port; an image with no port is healthy once running).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    Http {
        path: String,
        port: u16,
        status: Option<u16>,
    },
    Tcp {
        port: u16,
    },
    Running,
}

pub(crate) fn check_of(image: &StoredImage) -> Check {
    let config = &image.manifest.config;
    match &config.healthcheck {
        Some(h) => match &h.probe {
            HealthProbe::Http { path, port, status } => Check::Http {
                path: path.clone(),
                port: *port,
                status: *status,
            },
            HealthProbe::Tcp { port } => Check::Tcp { port: *port },
        },
        None => match config.ports.values().next() {
            Some(port) => Check::Tcp { port: *port },
            None => Check::Running,
        },
    }
}

/// The filters for the things of one app and environment.
pub(crate) fn owned<'a>(
    app: &'a [&'a str],
    env: &'a [&'a str],
) -> Vec<(&'static str, &'a [&'a str])> {
    vec![("tag:fuse:app", app), ("tag:fuse:env", env)]
}

/// The live instances of an app and environment, oldest first.
pub(crate) fn live_instances(client: &Client, app: &str, env: &str) -> Result<Vec<Instance>> {
    let (a, e) = ([app], [env]);
    let mut with = owned(&a, &e);
    with.push(("instance-state-name", LIVE));
    let mut found = ec2::describe_instances(client, &with)?;
    found.sort_by(|x, y| x.launch_time.cmp(&y.launch_time));
    Ok(found)
}

pub(crate) fn ownership_tags<'a>(app: &'a str, env: &'a str) -> [(&'static str, &'a str); 2] {
    [(APP_TAG, app), (ENV_TAG, env)]
}

/// One probe of the instance at `ip`; the error says what was seen. Through HTTP_PROXY /
/// HTTPS_PROXY unless NO_PROXY names the address, as curl would.
fn probe(agent: &ureq::Agent, ip: &str, check: &Check) -> Result<(), String> {
    match check {
        Check::Running => Ok(()),
        Check::Http { path, port, status } => {
            let url = format!("http://{ip}:{port}{path}");
            match agent.get(&url).call() {
                Ok(reply) => {
                    let got = reply.status().as_u16();
                    let good = match status {
                        Some(want) => got == *want,
                        None => (200..400).contains(&got),
                    };
                    if good {
                        Ok(())
                    } else {
                        Err(format!("GET {url} answered {got}"))
                    }
                }
                Err(e) => Err(format!("GET {url}: {e}")),
            }
        }
        Check::Tcp { port } => tcp_probe(ureq::Proxy::try_from_env(), ip, *port),
    }
}

/// A TCP connection to `ip:port`: through the HTTP proxy of HTTP_PROXY/HTTPS_PROXY (a
/// CONNECT that the proxy answers 200) unless NO_PROXY names the address, else directly.
fn tcp_probe(proxy: Option<ureq::Proxy>, ip: &str, port: u16) -> Result<(), String> {
    use std::io::{BufRead, BufReader, Write};
    let io = Duration::from_secs(3);
    let target = format!("{ip}:{port}");
    let proxy = proxy.filter(|p| {
        let uri = format!("http://{target}").parse::<ureq::http::Uri>();
        p.protocol() == ureq::ProxyProtocol::Http && uri.is_ok_and(|u| !p.is_no_proxy(&u))
    });
    let Some(proxy) = proxy else {
        let addr: std::net::SocketAddr = target.parse().map_err(|e| format!("{target}: {e}"))?;
        return std::net::TcpStream::connect_timeout(&addr, io)
            .map(drop)
            .map_err(|e| format!("TCP {target}: {e}"));
    };
    let through = format!("{}:{}", proxy.host(), proxy.port());
    let fail = |e: std::io::Error| format!("TCP {target} through the proxy {through}: {e}");
    let mut conn = std::net::TcpStream::connect(&through).map_err(fail)?;
    conn.set_read_timeout(Some(io)).map_err(fail)?;
    write!(conn, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").map_err(fail)?;
    let mut status = String::new();
    BufReader::new(conn).read_line(&mut status).map_err(fail)?;
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => Err(format!(
            "TCP {target} through the proxy {through}: {}",
            status.trim()
        )),
    }
}

fn health_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(ureq::Proxy::try_from_env())
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(5)))
        .user_agent(concat!("fuse/", env!("CARGO_PKG_VERSION"), " health check"))
        .build()
        .new_agent()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The instance as EC2 lists it now (`None` while it does not list it yet).
fn look(client: &Client, instance: &str) -> Result<Option<Instance>> {
    let ids = [instance];
    let found = ec2::describe_instances(client, &[("instance-id", &ids)])?;
    Ok(found.into_iter().find(|i| i.id == instance))
}

/// Why `i` can no longer become (or stay) a running instance to deploy to: stopping,
/// stopped, shutting down or terminated, by whatever cause (capacity, a crash, someone else).
fn left_running(i: &Instance) -> Option<String> {
    (!matches!(i.state.as_str(), "pending" | "running")).then(|| {
        let why = i
            .state_reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        format!("{} is {}{why}, not running", i.id, i.state)
    })
}

/// Waits for the instance to run with a public address, then for its health; the reason when
/// it did not become healthy by `deadline`, or as soon as it left `pending`/`running` (it
/// cannot become healthy then: no point waiting out the timeout).
pub(crate) fn wait_healthy(
    client: &Client,
    instance: &str,
    check: &Check,
    deadline: Instant,
    progress: &mut dyn FnMut(&str),
) -> Result<std::result::Result<String, String>> {
    let ip = loop {
        match look(client, instance)? {
            Some(i) if i.state == "running" && i.public_ip.is_some() => {
                break i.public_ip.unwrap_or_default()
            }
            Some(i) => {
                if let Some(reason) = left_running(&i) {
                    return Ok(Err(reason));
                }
            }
            None => {}
        }
        if lock::interrupted() {
            return Ok(Err(INTERRUPTED.into()));
        }
        if Instant::now() >= deadline {
            return Ok(Err(format!(
                "{instance} was not running with a public address within the health timeout"
            )));
        }
        std::thread::sleep(POLL);
    };
    progress(&format!(
        "{instance} is running at {ip}: checking its health"
    ));
    let agent = health_agent();
    loop {
        let seen = match probe(&agent, &ip, check) {
            Ok(()) => return Ok(Ok(ip)),
            Err(seen) => seen,
        };
        if let Some(reason) = look(client, instance)?.as_ref().and_then(left_running) {
            return Ok(Err(reason));
        }
        if lock::interrupted() {
            return Ok(Err(INTERRUPTED.into()));
        }
        if Instant::now() >= deadline {
            return Ok(Err(format!(
                "{instance} was not healthy within the health timeout (last: {seen})"
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// The reason of a deployment stopped by Ctrl-C or SIGTERM.
pub(crate) const INTERRUPTED: &str = "interrupted";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    /// A one-connection HTTP proxy on 127.0.0.1 answering CONNECT with `status`: its port,
    /// and the request line it was sent.
    fn fake_proxy(status: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            write!(&conn, "HTTP/1.1 {status}\r\n\r\n").unwrap();
            line
        });
        (port, thread)
    }

    #[test]
    fn a_tcp_check_goes_through_the_proxy() {
        // 203.0.113.5 (TEST-NET-3) is only named to the proxy, never dialled.
        let (port, seen) = fake_proxy("200 Connection established");
        let proxy = ureq::Proxy::new(&format!("http://127.0.0.1:{port}")).unwrap();
        assert_eq!(tcp_probe(Some(proxy), "203.0.113.5", 8080), Ok(()));
        assert!(seen
            .join()
            .unwrap()
            .starts_with("CONNECT 203.0.113.5:8080 "));
        let (port, seen) = fake_proxy("502 Bad Gateway");
        let proxy = ureq::Proxy::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = tcp_probe(Some(proxy), "203.0.113.5", 8080).unwrap_err();
        assert!(err.contains("502 Bad Gateway"), "{err}");
        seen.join().unwrap();
    }
}
