//! Blue/green deployment of one instance per app and environment (`fuse deploy IMAGE --env
//! ENV`), with all state in AWS tags: a security group from the image's ports, the new
//! instance (the image's AMI, the deployment's user-data, IMDSv2 only), the image's health
//! check against its public address, and an Elastic IP moved to it only when it is healthy;
//! then the instances it replaces are terminated. An unhealthy new instance is terminated and
//! the old one keeps serving. The address records the digest it serves and the one before
//! (`fuse deploy rollback`).

use super::ami::DIGEST_TAG;
use super::aws::ec2::{self, Address, Instance, Launch};
use super::aws::http::Client;
use super::lock;
use crate::host::digest;
use crate::image::config::HealthProbe;
use crate::image::store::StoredImage;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The tags that name a deployment's app and environment, on each thing it made.
pub(crate) const APP_TAG: &str = "fuse:app";
pub(crate) const ENV_TAG: &str = "fuse:env";
/// On the address: the digest served before the current one (what a rollback deploys).
pub(crate) const PREVIOUS_TAG: &str = "fuse:previous-digest";
/// The instance states that still hold (or will hold) a machine.
const LIVE: &[&str] = &["pending", "running", "stopping", "stopped"];
/// Between two looks at an instance or its health.
const POLL: Duration = Duration::from_secs(2);
/// The console lines a failed deployment shows.
const CONSOLE_TAIL: usize = 30;
/// How long `destroy` waits for the instances to go before deleting their security group.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// The instances replaced (terminated) by a healthy deployment.
    pub(crate) terminated: Vec<String>,
    /// The last lines of a failed instance's console.
    pub(crate) console_tail: Option<String>,
    pub(crate) seconds: f64,
}

/// The check a deployment must pass, from the image's `healthcheck` (else a TCP connection to
/// its only port; an image with no port is healthy once running).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
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

fn check_of(image: &StoredImage) -> Check {
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
fn owned<'a>(app: &'a [&'a str], env: &'a [&'a str]) -> Vec<(&'static str, &'a [&'a str])> {
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

/// The Elastic IP of an app and environment, if it has one.
pub(crate) fn address_of(client: &Client, app: &str, env: &str) -> Result<Option<Address>> {
    let (a, e) = ([app], [env]);
    Ok(ec2::describe_addresses(client, &owned(&a, &e))?
        .into_iter()
        .next())
}

fn ownership_tags<'a>(app: &'a str, env: &'a str) -> [(&'static str, &'a str); 2] {
    [(APP_TAG, app), (ENV_TAG, env)]
}

/// The security group of an app and environment: found by its tags, or made with the image's
/// ports open.
fn ensure_security_group(
    client: &Client,
    d: &Deployment,
    ports: &[u16],
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let (a, e) = ([d.app.as_str()], [d.env.as_str()]);
    if let Some(found) = ec2::describe_security_groups(client, &owned(&a, &e))?
        .into_iter()
        .next()
    {
        // A new version may listen on a port more.
        ec2::open_ports(client, &found.id, ports)?;
        return Ok(found.id);
    }
    let name = format!("fuse-{}-{}", d.app, d.env);
    // Made by a run that stopped before tagging it.
    let by_name = [name.as_str()];
    let group = match ec2::describe_security_groups(client, &[("group-name", &by_name)])?
        .into_iter()
        .next()
    {
        Some(found) => found.id,
        None => {
            let id = ec2::create_security_group(
                client,
                &name,
                &format!("fuse-deploy-{}-{}", d.app, d.env),
            )?;
            ec2::open_ports(client, &id, ports)?;
            progress(&format!(
                "security group {id} ({name}): TCP {} open",
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            id
        }
    };
    ec2::create_tags(client, &[&group], &ownership_tags(&d.app, &d.env))?;
    Ok(group)
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
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits for the instance to run with a public address, then for its health; the reason when
/// it did not become healthy by `deadline`.
fn wait_healthy(
    client: &Client,
    instance: &str,
    check: &Check,
    deadline: Instant,
    progress: &mut dyn FnMut(&str),
) -> Result<std::result::Result<String, String>> {
    let ids = [instance];
    let ip = loop {
        let found = ec2::describe_instances(client, &[("instance-id", &ids)])?;
        let me = found.into_iter().find(|i| i.id == instance);
        match me {
            Some(i) if i.state == "running" && i.public_ip.is_some() => {
                break i.public_ip.unwrap_or_default()
            }
            Some(i) if !matches!(i.state.as_str(), "pending" | "running") => {
                return Ok(Err(format!("{instance} is {}, not running", i.state)))
            }
            _ => {}
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

/// Refuses when another run deploys the app/env now (checked again, for good, when its lock
/// is taken): before an AMI is made for nothing.
pub(crate) fn refuse_if_deploying(client: &Client, d: &Deployment) -> Result<()> {
    let (a, e) = ([d.app.as_str()], [d.env.as_str()]);
    match ec2::describe_security_groups(client, &owned(&a, &e))?.first() {
        Some(group) => lock::refuse_if_held(
            client,
            &group.id,
            &format!("{}/{}", d.app, d.env),
            d.break_lock,
        ),
        None => Ok(()),
    }
}

/// The reason of a deployment stopped by Ctrl-C or SIGTERM.
const INTERRUPTED: &str = "interrupted";

/// Deploys `image` (its AMI `ami`) as `d`, holding the environment's lock: see the module
/// documentation.
pub(crate) fn deploy(
    client: &Client,
    image: &StoredImage,
    ami: &str,
    d: &Deployment,
    progress: &mut dyn FnMut(&str),
) -> Result<Deployed> {
    let started = Instant::now();
    let ports: Vec<u16> = {
        let mut p: Vec<u16> = image.manifest.config.ports.values().copied().collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let group = ensure_security_group(client, d, &ports, progress)?;
    let what = format!("{}/{}", d.app, d.env);
    let held = lock::acquire(client, &group, &what, d.break_lock, progress)?;
    let result = deploy_locked(client, image, ami, d, &group, started, progress);
    let released = held.release(client);
    let outcome = result?;
    released?;
    if outcome.reason.as_deref() == Some(INTERRUPTED) {
        bail!(
            "Interrupted: {} terminated, {}; the lock of {what} is released",
            outcome.instance,
            match &outcome.address {
                Some(a) => format!("{a} still leads to the previous instance"),
                None => "nothing was serving before".into(),
            }
        );
    }
    Ok(outcome)
}

fn deploy_locked(
    client: &Client,
    image: &StoredImage,
    ami: &str,
    d: &Deployment,
    group: &str,
    started: Instant,
    progress: &mut dyn FnMut(&str),
) -> Result<Deployed> {
    let group = group.to_string();
    let image_ref = image.name.to_string();
    let tags: Vec<(String, String)> = vec![
        (APP_TAG.into(), d.app.clone()),
        (ENV_TAG.into(), d.env.clone()),
        (DIGEST_TAG.into(), image.digest.clone()),
        (super::ami::IMAGE_TAG.into(), image_ref.clone()),
        ("Name".into(), format!("{}-{}", d.app, d.env)),
    ];
    let mut tags = tags;
    if d.forced {
        tags.push((FORCED_TAG.into(), "true".into()));
    }
    let launch = Launch {
        image: ami.to_string(),
        instance_type: d.instance_type.clone(),
        user_data: d.user_data.clone(),
        security_group: group,
        tags,
        client_token: client_token(&d.app, &d.env, &image.digest),
    };
    let deadline = Instant::now() + d.health_timeout;
    let instance = ec2::run_instance(client, &launch)?;
    progress(&format!(
        "launched {instance} ({}, {ami}) for {}/{}",
        d.instance_type, d.app, d.env
    ));
    let mut outcome = Deployed {
        app: d.app.clone(),
        env: d.env.clone(),
        digest: image.digest.clone(),
        image: image_ref,
        ami: ami.to_string(),
        instance: instance.clone(),
        healthy: false,
        reason: None,
        address: None,
        terminated: Vec::new(),
        console_tail: None,
        seconds: 0.0,
    };
    let check = check_of(image);
    match wait_healthy(client, &instance, &check, deadline, progress)? {
        Err(reason) => {
            // The console first: a terminated instance's may be gone.
            let console = ec2::console_output(client, &instance).unwrap_or_default();
            ec2::terminate_instances(client, &[&instance])?;
            outcome.address = address_of(client, &d.app, &d.env)?.map(|a| a.public_ip);
            outcome.reason = Some(reason);
            outcome.console_tail = Some(tail(&console, CONSOLE_TAIL));
        }
        Ok(ip) => {
            progress(&format!("{instance} is healthy at {ip}"));
            let address = move_address(client, d, &instance, &image.digest, progress)?;
            outcome.address = Some(address);
            let old: Vec<String> = live_instances(client, &d.app, &d.env)?
                .into_iter()
                .map(|i| i.id)
                .filter(|id| *id != instance)
                .collect();
            let old_refs: Vec<&str> = old.iter().map(String::as_str).collect();
            ec2::terminate_instances(client, &old_refs)?;
            outcome.terminated = old;
            outcome.healthy = true;
        }
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// One launch per app, environment and digest and attempt: a RunInstances retried after a
/// dropped answer launches nothing more; the time keeps a later redeploy a new launch.
fn client_token(app: &str, env: &str, digest_: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let text = format!("fuse-{app}-{env}-{}-{now}", digest::short(digest_));
    text.chars().take(64).collect()
}

/// Points the app/env's Elastic IP (allocated the first time) at `instance`, recording the
/// digest it served before; the address.
fn move_address(
    client: &Client,
    d: &Deployment,
    instance: &str,
    digest_: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let (allocation, ip, served) = match address_of(client, &d.app, &d.env)? {
        Some(a) => (a.allocation, a.public_ip, a.tags.get(DIGEST_TAG).cloned()),
        None => {
            let (allocation, ip) = ec2::allocate_address(client)?;
            ec2::create_tags(client, &[&allocation], &ownership_tags(&d.app, &d.env))?;
            progress(&format!(
                "allocated the address {ip} for {}/{}",
                d.app, d.env
            ));
            (allocation, ip, None)
        }
    };
    ec2::associate_address(client, &allocation, instance)?;
    let mut tags = vec![(DIGEST_TAG, digest_)];
    if let Some(previous) = served.as_deref().filter(|p| *p != digest_) {
        tags.push((PREVIOUS_TAG, previous));
    }
    ec2::create_tags(client, &[&allocation], &tags)?;
    progress(&format!("{ip} now leads to {instance}"));
    Ok(ip)
}

/// One app and environment as `fuse deploy ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct EnvState {
    pub(crate) app: String,
    pub(crate) env: String,
    /// The Elastic IP, the digest it serves and the one before.
    pub(crate) address: Option<String>,
    pub(crate) digest: Option<String>,
    pub(crate) previous_digest: Option<String>,
    pub(crate) instances: Vec<InstanceState>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct InstanceState {
    pub(crate) id: String,
    pub(crate) state: String,
    pub(crate) digest: Option<String>,
    pub(crate) image: Option<String>,
    pub(crate) public_ip: Option<String>,
    /// The address leads to it.
    pub(crate) serving: bool,
}

/// Every app and environment fuse deployed in the region, from the tags.
pub(crate) fn list(client: &Client) -> Result<Vec<EnvState>> {
    let key = [APP_TAG];
    let mut envs: BTreeMap<(String, String), EnvState> = BTreeMap::new();
    let addresses = ec2::describe_addresses(client, &[("tag-key", &key)])?;
    for a in &addresses {
        let (Some(app), Some(env)) = (a.tags.get(APP_TAG), a.tags.get(ENV_TAG)) else {
            continue;
        };
        let e = entry(&mut envs, app, env);
        e.address = Some(a.public_ip.clone());
        e.digest = a.tags.get(DIGEST_TAG).cloned();
        e.previous_digest = a.tags.get(PREVIOUS_TAG).cloned();
    }
    let mut with = vec![("tag-key", &key[..])];
    with.push(("instance-state-name", LIVE));
    let mut instances = ec2::describe_instances(client, &with)?;
    instances.sort_by(|x, y| x.launch_time.cmp(&y.launch_time));
    for i in instances {
        let (Some(app), Some(env)) = (i.tags.get(APP_TAG), i.tags.get(ENV_TAG)) else {
            continue;
        };
        let serving = addresses
            .iter()
            .any(|a| a.instance.as_deref() == Some(i.id.as_str()));
        let e = entry(&mut envs, app, env);
        e.instances.push(InstanceState {
            id: i.id.clone(),
            state: i.state.clone(),
            digest: i.tags.get(DIGEST_TAG).cloned(),
            image: i.tags.get(super::ami::IMAGE_TAG).cloned(),
            public_ip: i.public_ip.clone(),
            serving,
        });
    }
    Ok(envs.into_values().collect())
}

fn entry<'a>(
    envs: &'a mut BTreeMap<(String, String), EnvState>,
    app: &str,
    env: &str,
) -> &'a mut EnvState {
    envs.entry((app.to_string(), env.to_string()))
        .or_insert_with(|| EnvState {
            app: app.to_string(),
            env: env.to_string(),
            address: None,
            digest: None,
            previous_digest: None,
            instances: Vec::new(),
        })
}

/// The instance that serves an app and environment: the address's, else the newest live one.
pub(crate) fn serving_instance(client: &Client, app: &str, env: &str) -> Result<String> {
    if let Some(id) = address_of(client, app, env)?.and_then(|a| a.instance) {
        return Ok(id);
    }
    match live_instances(client, app, env)?.pop() {
        Some(i) => Ok(i.id),
        None => bail!("{app}/{env} has no instance in this region: see `fuse deploy ls`"),
    }
}

/// What a rollback deploys: the digest the address served before, and the serving
/// instance's user-data (the deployment's values stay).
pub(crate) fn rollback_target(client: &Client, app: &str, env: &str) -> Result<(String, String)> {
    let address = address_of(client, app, env)?.with_context(|| {
        format!("{app}/{env} has no address in this region: see `fuse deploy ls`")
    })?;
    let previous = address.tags.get(PREVIOUS_TAG).cloned().with_context(|| {
        format!(
            "{app}/{env} has no previous digest to go back to ({} is its first)",
            address
                .tags
                .get(DIGEST_TAG)
                .map(String::as_str)
                .unwrap_or("?")
        )
    })?;
    let instance = address
        .instance
        .with_context(|| format!("{} leads to no instance", address.public_ip))?;
    Ok((previous, ec2::user_data(client, &instance)?))
}

/// What `destroy` removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Destroyed {
    pub(crate) instances: Vec<String>,
    pub(crate) addresses: Vec<String>,
    pub(crate) security_groups: Vec<String>,
}

/// Terminates the app/env's instances, releases its address, deletes its security group.
pub(crate) fn destroy(
    client: &Client,
    app: &str,
    env: &str,
    break_lock: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Destroyed> {
    let (a, e) = ([app], [env]);
    let group = ec2::describe_security_groups(client, &owned(&a, &e))?
        .into_iter()
        .next();
    let Some(group) = group else {
        return destroy_locked(client, app, env, progress);
    };
    let held = lock::acquire(
        client,
        &group.id,
        &format!("{app}/{env}"),
        break_lock,
        progress,
    )?;
    let result = destroy_locked(client, app, env, progress);
    // Deleting the group removed the lock with it; else (a failure) it is released here.
    let released = held.release(client);
    let gone = result?;
    released?;
    Ok(gone)
}

fn destroy_locked(
    client: &Client,
    app: &str,
    env: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Destroyed> {
    let mut gone = Destroyed::default();
    let (a, e) = ([app], [env]);
    for address in ec2::describe_addresses(client, &owned(&a, &e))? {
        if let Some(association) = &address.association {
            ec2::disassociate_address(client, association)?;
        }
        ec2::release_address(client, &address.allocation)?;
        progress(&format!("released {}", address.public_ip));
        gone.addresses.push(address.public_ip);
    }
    let instances: Vec<String> = live_instances(client, app, env)?
        .into_iter()
        .map(|i| i.id)
        .collect();
    let refs: Vec<&str> = instances.iter().map(String::as_str).collect();
    ec2::terminate_instances(client, &refs)?;
    if !refs.is_empty() {
        progress(&format!("terminating {}", refs.join(", ")));
    }
    gone.instances = instances.clone();
    let groups = ec2::describe_security_groups(client, &owned(&a, &e))?;
    let deadline = Instant::now() + TERMINATE_TIMEOUT;
    for group in groups {
        // EC2 refuses to delete a group an instance still uses (until it is terminated).
        loop {
            match ec2::delete_security_group(client, &group.id) {
                Ok(()) => break,
                Err(e) if e.to_string().contains("DependencyViolation") => {
                    if lock::interrupted() {
                        bail!("Interrupted while {app}/{env}'s instances terminate: run `fuse deploy destroy` again to delete its security group");
                    }
                    if Instant::now() >= deadline {
                        return Err(e.context(format!(
                            "The instances of {app}/{env} were not terminated in time: run `fuse deploy destroy` again"
                        )));
                    }
                    std::thread::sleep(POLL);
                }
                Err(e) => return Err(e),
            }
        }
        progress(&format!("deleted the security group {}", group.id));
        gone.security_groups.push(group.id);
    }
    Ok(gone)
}

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

    #[test]
    fn client_tokens_fit() {
        assert!(client_token(&"a".repeat(80), "prod", "sha256:00").len() <= 64);
    }
}
