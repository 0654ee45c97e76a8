//! `fuse deploy IMAGE --env ENV --instances N`: the environment behind an application load
//! balancer, AWS doing the distributing. All state is in AWS tags and names:
//!
//! - the balancer `fuse-APP-ENV` (a short hash instead when that does not fit ELB's 32
//!   characters), internet-facing in the default VPC's default subnets, tagged fuse:app/env,
//!   the digest it serves (fuse:digest), the one before (fuse:previous-digest, what a rollback
//!   deploys) and the instance count (fuse:instances, what a deploy without `--instances`
//!   keeps); its own security group `fuse-APP-ENV-lb` (tagged fuse:role=load-balancer) open on
//!   port 80, the instances' group letting it reach the app's port;
//! - one HTTP listener on port 80 forwarding to one target group: the serving release's;
//! - per release (deployment attempt) a target group `fuse-HASH-DIGEST-NONCE` tagged
//!   fuse:app/env/digest/image, HTTP to the app's port with the image's health check, and N
//!   instances tagged with the group's name (fuse:target-group), launched with one client
//!   token per group and index (a retried RunInstances launches nothing more).
//!
//! A release is healthy when every instance runs, passes fuse's own probe of the image's
//! health check (through HTTP_PROXY, as the single-instance deploy does) and the target group
//! reports every target healthy. Then the listener forwards to the new group, and each older
//! group's targets are deregistered, drained (the group's deregistration delay), terminated
//! and the group deleted. An unhealthy release is deregistered, terminated and its group
//! deleted; the listener is not touched.
//!
//! A re-run after a crash converges: under the lock, every group of the environment the
//! listener does not forward to, and every instance of the environment not registered in the
//! group it forwards to, is a stopped run's leftover and is removed before the new release.

use super::ami::{DIGEST_TAG, IMAGE_TAG};
use super::aws::ec2::{self, Launch};
use super::aws::elbv2::{self, LoadBalancer, NewTargetGroup};
use super::aws::http::{has_code, Client};
use super::lock;
use super::release::{
    check_of, live_instances, owned, ownership_tags, tail, wait_healthy, Check, Deployed,
    Deployment, Destroyed, APP_TAG, CONSOLE_TAIL, ENV_TAG, FORCED_TAG, INTERRUPTED, POLL,
    PREVIOUS_TAG,
};
use crate::host::digest;
use crate::image::store::StoredImage;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// On the load balancer's security group (told apart from the instances', which holds the
/// lock).
pub(crate) const ROLE_TAG: &str = "fuse:role";
const ROLE: &str = "load-balancer";
/// On the load balancer: how many instances a release has.
pub(crate) const INSTANCES_TAG: &str = "fuse:instances";
/// On an instance: the target group (name) of its release.
pub(crate) const TARGET_GROUP_TAG: &str = "fuse:target-group";
/// The listener's port: plain HTTP (TLS is a listener certificate away, not done here).
pub(crate) const LISTENER_PORT: u16 = 80;
/// ELB's own default is 300 s; fuse's releases are short-request web apps.
pub(crate) const DEREGISTRATION_DELAY: Duration = Duration::from_secs(30);
/// After the deregistration delay, how much longer draining may take before fuse goes on.
const DRAIN_SLACK: Duration = Duration::from_secs(60);

/// An environment's load balancer as fuse finds it.
#[derive(Debug, Clone)]
pub(crate) struct Balancer {
    pub(crate) lb: LoadBalancer,
    pub(crate) tags: BTreeMap<String, String>,
    /// The recorded count (1 when the tag is missing or bad).
    pub(crate) instances: u32,
}

/// A short hex hash of `text`.
fn hash(text: &str, n: usize) -> String {
    digest::hex_part(&digest::of_bytes(text.as_bytes()))[..n].to_string()
}

/// ELB's names: at most 32 letters, digits and hyphens, no leading, trailing or double
/// hyphen. `fuse-APP-ENV` when it is one, else its cleaned start and a hash of app/env.
pub(crate) fn load_balancer_name(app: &str, env: &str) -> String {
    let raw = format!("{app}-{env}");
    let mut clean = String::new();
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && (clean.is_empty() || clean.ends_with('-'))) {
            clean.push(c);
        }
    }
    let plain = format!("fuse-{clean}");
    if clean == raw && plain.len() <= 32 && !plain.ends_with('-') {
        return plain;
    }
    let start: String = clean.chars().take(32 - 5 - 1 - 6).collect();
    format!(
        "fuse-{}-{}",
        start.trim_end_matches('-'),
        hash(&format!("{app}/{env}"), 6)
    )
    .replace("--", "-")
}

/// A release's target group name: app/env's hash, the digest's start, the attempt's nonce.
fn target_group_name(app: &str, env: &str, digest_: &str) -> String {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "fuse-{}-{}-{}",
        hash(&format!("{app}/{env}"), 6),
        &digest::hex_part(digest_)[..8],
        hash(&nonce.to_string(), 6)
    )
}

/// The load balancer of an app and environment, if it has one.
pub(crate) fn find(client: &Client, app: &str, env: &str) -> Result<Option<Balancer>> {
    let Some(lb) = elbv2::load_balancer_named(client, &load_balancer_name(app, env))? else {
        return Ok(None);
    };
    let tags = elbv2::describe_tags(client, &[&lb.arn])?
        .remove(&lb.arn)
        .unwrap_or_default();
    if tags.get(APP_TAG).map(String::as_str) != Some(app)
        || tags.get(ENV_TAG).map(String::as_str) != Some(env)
    {
        bail!(
            "The load balancer {} is not tagged {APP_TAG}={app} and {ENV_TAG}={env}: fuse did not make it for {app}/{env}; delete or rename it",
            lb.name
        );
    }
    Ok(Some(balancer(lb, tags)))
}

fn balancer(lb: LoadBalancer, tags: BTreeMap<String, String>) -> Balancer {
    let instances = tags
        .get(INSTANCES_TAG)
        .and_then(|n| n.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1);
    Balancer {
        lb,
        tags,
        instances,
    }
}

/// Every load balancer fuse made in the region, by (app, env).
pub(crate) fn all(client: &Client) -> Result<BTreeMap<(String, String), Balancer>> {
    let lbs = elbv2::describe_load_balancers(client)?;
    let arns: Vec<&str> = lbs.iter().map(|l| l.arn.as_str()).collect();
    let mut tags = elbv2::describe_tags(client, &arns)?;
    let mut found = BTreeMap::new();
    for lb in lbs {
        let t = tags.remove(&lb.arn).unwrap_or_default();
        if let (Some(app), Some(env)) = (t.get(APP_TAG).cloned(), t.get(ENV_TAG).cloned()) {
            found.insert((app, env), balancer(lb, t));
        }
    }
    Ok(found)
}

/// The target groups of an app and environment.
fn groups_of(client: &Client, app: &str, env: &str) -> Result<Vec<elbv2::TargetGroup>> {
    let groups = elbv2::describe_target_groups(client)?;
    let arns: Vec<&str> = groups.iter().map(|g| g.arn.as_str()).collect();
    let mut tags = elbv2::describe_tags(client, &arns)?;
    Ok(groups
        .into_iter()
        .filter_map(|g| {
            let t = tags.remove(&g.arn).unwrap_or_default();
            (t.get(APP_TAG).map(String::as_str) == Some(app)
                && t.get(ENV_TAG).map(String::as_str) == Some(env))
            .then_some(g)
        })
        .collect())
}

/// The port-80 listener of a load balancer and the target group it forwards to.
pub(crate) fn listener_of(client: &Client, lb: &str) -> Result<Option<elbv2::Listener>> {
    Ok(elbv2::describe_listeners(client, lb)?
        .into_iter()
        .find(|l| l.port == LISTENER_PORT))
}

/// The instances registered in a target group (not those draining out of it).
pub(crate) fn registered(client: &Client, group: &str) -> Result<Vec<String>> {
    Ok(elbv2::describe_target_health(client, group)?
        .into_iter()
        .filter(|t| !matches!(t.state.as_str(), "draining" | "unused"))
        .map(|t| t.id)
        .collect())
}

/// The instances serving an environment behind its load balancer.
pub(crate) fn serving(client: &Client, b: &Balancer) -> Result<Vec<String>> {
    match listener_of(client, &b.lb.arn)?.and_then(|l| l.target_group) {
        Some(group) => registered(client, &group),
        None => Ok(Vec::new()),
    }
}

/// The load balancer's security group: found by its tags (or name), or made open on the
/// listener's port.
fn ensure_lb_group(
    client: &Client,
    d: &Deployment,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    let (a, e) = ([d.app.as_str()], [d.env.as_str()]);
    let mut with = owned(&a, &e);
    let role = [ROLE];
    with.push(("tag:fuse:role", &role));
    if let Some(g) = ec2::describe_security_groups(client, &with)?
        .into_iter()
        .next()
    {
        return Ok(g.id);
    }
    let name = format!("fuse-{}-{}-lb", d.app, d.env);
    let by_name = [name.as_str()];
    let id = match ec2::describe_security_groups(client, &[("group-name", &by_name)])?
        .into_iter()
        .next()
    {
        Some(g) => g.id,
        None => ec2::create_security_group(
            client,
            &name,
            &format!("fuse-deploy-{}-{}-load-balancer", d.app, d.env),
        )?,
    };
    ec2::open_ports(client, &id, &[LISTENER_PORT])?;
    let mut tags = ownership_tags(&d.app, &d.env).to_vec();
    tags.push((ROLE_TAG, ROLE));
    ec2::create_tags(client, &[&id], &tags)?;
    progress(&format!(
        "security group {id} ({name}): TCP {LISTENER_PORT} open"
    ));
    Ok(id)
}

/// The environment's load balancer, made the first time.
fn ensure_load_balancer(
    client: &Client,
    d: &Deployment,
    count: u32,
    subnets: &[String],
    group: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Balancer> {
    if let Some(b) = find(client, &d.app, &d.env)? {
        return Ok(b);
    }
    let name = load_balancer_name(&d.app, &d.env);
    let refs: Vec<&str> = subnets.iter().map(String::as_str).collect();
    let count = count.to_string();
    let mut tags = ownership_tags(&d.app, &d.env).to_vec();
    tags.push((INSTANCES_TAG, &count));
    let lb = elbv2::create_load_balancer(client, &name, &refs, group, &tags)?;
    progress(&format!(
        "load balancer {name} ({}) in {} subnets",
        lb.dns_name,
        subnets.len()
    ));
    let tags = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Ok(balancer(lb, tags))
}

/// Deregisters a group's targets, waits them out of it (up to `drain` and some slack),
/// terminates them and every instance tagged with the group, and deletes the group; the
/// instances terminated.
fn retire(
    client: &Client,
    d: &Deployment,
    arn: &str,
    name: &str,
    drain: Duration,
) -> Result<Vec<String>> {
    let targets = registered(client, arn)?;
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    elbv2::deregister_targets(client, arn, &refs)?;
    if !targets.is_empty() {
        let deadline = Instant::now() + drain + DRAIN_SLACK;
        // AWS reports them draining for the deregistration delay (moto: unused at once).
        while elbv2::describe_target_health(client, arn)?
            .iter()
            .any(|t| t.state == "draining")
            && Instant::now() < deadline
            && !lock::interrupted()
        {
            std::thread::sleep(POLL);
        }
    }
    let mut instances = targets;
    for i in live_instances(client, &d.app, &d.env)? {
        if i.tags.get(TARGET_GROUP_TAG).map(String::as_str) == Some(name)
            && !instances.contains(&i.id)
        {
            instances.push(i.id);
        }
    }
    let refs: Vec<&str> = instances.iter().map(String::as_str).collect();
    ec2::terminate_instances(client, &refs)?;
    elbv2::delete_target_group(client, arn)?;
    Ok(instances)
}

/// Removes what a stopped run left: every group of the environment but `live`, and every
/// live instance of it not registered in `live`.
fn clean_leftovers(
    client: &Client,
    d: &Deployment,
    live: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for g in groups_of(client, &d.app, &d.env)? {
        if Some(g.arn.as_str()) != live {
            let (arn, name) = (g.arn, g.name);
            let terminated = retire(client, d, &arn, &name, Duration::ZERO)?;
            progress(&format!(
                "removed a stopped run's target group {name}{}",
                if terminated.is_empty() {
                    String::new()
                } else {
                    format!(" and {}", terminated.join(", "))
                }
            ));
            gone.extend(terminated);
        }
    }
    let serving = match live {
        Some(g) => registered(client, g)?,
        None => Vec::new(),
    };
    let strays: Vec<String> = live_instances(client, &d.app, &d.env)?
        .into_iter()
        .map(|i| i.id)
        .filter(|id| !serving.contains(id))
        .collect();
    if !strays.is_empty() {
        let refs: Vec<&str> = strays.iter().map(String::as_str).collect();
        ec2::terminate_instances(client, &refs)?;
        progress(&format!("terminated a stopped run's {}", strays.join(", ")));
        gone.extend(strays);
    }
    Ok(gone)
}

/// The port the load balancer sends to and how its target group checks it: the image's HTTP
/// health check, or (a TCP check) any HTTP answer on the port.
fn target_check(check: &Check) -> Result<(u16, String, String)> {
    Ok(match check {
        Check::Http { path, port, status } => (
            *port,
            path.clone(),
            status.map_or_else(|| "200-399".into(), |s| s.to_string()),
        ),
        Check::Tcp { port } => (*port, "/".into(), "200-499".into()),
        Check::Running => bail!("An image with no port cannot go behind a load balancer"),
    })
}

/// Waits until the group reports every one of `ids` healthy; the reason when not by
/// `deadline`.
fn wait_targets_healthy(
    client: &Client,
    group: &str,
    ids: &[String],
    deadline: Instant,
) -> Result<std::result::Result<(), (String, String)>> {
    loop {
        let health = elbv2::describe_target_health(client, group)?;
        let sick = ids
            .iter()
            .find_map(|id| match health.iter().find(|t| t.id == *id) {
                Some(t) if t.state == "healthy" => None,
                Some(t) => Some((
                    id.clone(),
                    format!(
                        "{}{}",
                        t.state,
                        t.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ),
                )),
                None => Some((id.clone(), "not registered".into())),
            });
        let Some((id, seen)) = sick else {
            return Ok(Ok(()));
        };
        if lock::interrupted() {
            return Ok(Err((id, INTERRUPTED.into())));
        }
        if Instant::now() >= deadline {
            return Ok(Err((
                id.clone(),
                format!("{id} was not healthy in the load balancer's target group within the health timeout (last: {seen})"),
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Deploys `image` as `count` instances behind the environment's load balancer (the lock of
/// the environment held, its instances' security group `group`, the image's `ports` open to
/// the internet for fuse's own health probe): see the module documentation.
///
/// The instances need only the load balancer's group (opened to them on the app's port):
/// `ports` are closed to the internet again once it serves a release, this one or the one
/// before, also when this deploy fails on an error (not when a failed first one leaves an
/// Elastic IP's instance serving on them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn deploy_locked(
    client: &Client,
    image: &StoredImage,
    ami: &str,
    d: &Deployment,
    count: u32,
    group: &str,
    ports: &[u16],
    started: Instant,
    progress: &mut dyn FnMut(&str),
) -> Result<Deployed> {
    let mut served_before = false;
    let deployed = release(
        client,
        image,
        ami,
        d,
        count,
        group,
        started,
        &mut served_before,
        progress,
    );
    let serves = match &deployed {
        Ok(deployed) => deployed.healthy || served_before,
        Err(_) => served_before,
    };
    if !serves || ports.is_empty() {
        return deployed;
    }
    let open: Vec<String> = ports.iter().map(u16::to_string).collect();
    match (ec2::close_ports_to_world(client, group, ports), &deployed) {
        (Ok(()), _) => progress(&format!(
            "TCP {} closed to the internet: only the load balancer reaches the instances",
            open.join(", ")
        )),
        // The deploy's own error is the one to report; the next deploy closes them.
        (Err(e), Ok(_)) => return Err(e),
        (Err(e), Err(_)) => progress(&format!(
            "warning: TCP {} stays open to the internet until the next deploy: {e:#}",
            open.join(", ")
        )),
    }
    deployed
}

/// [`deploy_locked`]'s release; `served_before` is set once the load balancer's listener is
/// read (whether it forwarded to a release).
#[allow(clippy::too_many_arguments)]
fn release(
    client: &Client,
    image: &StoredImage,
    ami: &str,
    d: &Deployment,
    count: u32,
    group: &str,
    started: Instant,
    served_before: &mut bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Deployed> {
    let check = check_of(image);
    let (port, health_path, matcher) = target_check(&check)?;
    let (vpc, subnets) = ec2::default_subnets(client)?;
    let lb_group = ensure_lb_group(client, d, progress)?;
    ec2::open_port_to_group(client, group, port, &lb_group)?;
    let b = ensure_load_balancer(client, d, count, &subnets, &lb_group, progress)?;
    let dns = b.lb.dns_name.clone();
    let listener = listener_of(client, &b.lb.arn)?;
    let live = listener.as_ref().and_then(|l| l.target_group.clone());
    *served_before = live.is_some();
    let mut terminated = clean_leftovers(client, d, live.as_deref(), progress)?;

    let image_ref = image.name.to_string();
    let name = target_group_name(&d.app, &d.env, &image.digest);
    let mut tags: Vec<(String, String)> = vec![
        (APP_TAG.into(), d.app.clone()),
        (ENV_TAG.into(), d.env.clone()),
        (DIGEST_TAG.into(), image.digest.clone()),
        (IMAGE_TAG.into(), image_ref.clone()),
    ];
    let tg = elbv2::create_target_group(
        client,
        &NewTargetGroup {
            name: name.clone(),
            vpc,
            port,
            health_path,
            matcher,
            tags: tags.clone(),
        },
    )?;
    let drain = d.deregistration_delay.unwrap_or(DEREGISTRATION_DELAY);
    elbv2::set_deregistration_delay(client, &tg, drain.as_secs())?;
    progress(&format!("target group {name}: HTTP to port {port}"));

    tags.push((TARGET_GROUP_TAG.into(), name.clone()));
    tags.push(("Name".into(), format!("{}-{}", d.app, d.env)));
    if d.forced {
        tags.push((FORCED_TAG.into(), "true".into()));
    }
    let deadline = Instant::now() + d.health_timeout;
    let mut outcome = Deployed {
        app: d.app.clone(),
        env: d.env.clone(),
        digest: image.digest.clone(),
        image: image_ref,
        ami: ami.to_string(),
        instance: String::new(),
        healthy: false,
        reason: None,
        address: None,
        load_balancer: Some(dns.clone()),
        instances: Vec::new(),
        target_group: Some(name.clone()),
        terminated: Vec::new(),
        console_tail: None,
        console_of: None,
        served_before: live.is_some(),
        seconds: 0.0,
    };
    let mut failure: Option<(String, String)> = None;
    for index in 0..count {
        let launch = Launch {
            image: ami.to_string(),
            instance_type: d.instance_type.clone(),
            user_data: d.user_data.clone(),
            security_group: group.to_string(),
            tags: tags.clone(),
            // One per release and index: a retried RunInstances launches nothing more.
            client_token: format!("{name}-{index}"),
        };
        match ec2::run_instance(client, &launch) {
            Ok(id) => {
                progress(&format!(
                    "launched {id} ({}, {ami}) for {}/{} [{}/{count}]",
                    d.instance_type,
                    d.app,
                    d.env,
                    index + 1
                ));
                outcome.instances.push(id);
            }
            Err(e) => {
                failure = Some((String::new(), format!("{e:#}")));
                break;
            }
        }
    }
    outcome.instance = outcome.instances.first().cloned().unwrap_or_default();
    if failure.is_none() {
        // They boot together; each is waited for in turn within the one deadline.
        for id in &outcome.instances {
            if let Err(reason) = wait_healthy(client, id, &check, deadline, progress)? {
                failure = Some((id.clone(), reason));
                break;
            }
            progress(&format!("{id} passed the health check"));
        }
    }
    if failure.is_none() {
        let refs: Vec<&str> = outcome.instances.iter().map(String::as_str).collect();
        elbv2::register_targets(client, &tg, &refs)?;
        // moto reports a registered target healthy at once, without probing it: fuse's own
        // probe above is what the tests exercise.
        if let Err(f) = wait_targets_healthy(client, &tg, &outcome.instances, deadline)? {
            failure = Some(f);
        }
    }
    if let Some((failing, reason)) = failure {
        let console = if failing.is_empty() {
            String::new()
        } else {
            ec2::console_output(client, &failing).unwrap_or_default()
        };
        let refs: Vec<&str> = outcome.instances.iter().map(String::as_str).collect();
        // Best effort: the group is deleted next, targets and all; terminating is what counts.
        if let Ok(on) = registered(client, &tg) {
            let on: Vec<&str> = on.iter().map(String::as_str).collect();
            let _ = elbv2::deregister_targets(client, &tg, &on);
        }
        ec2::terminate_instances(client, &refs)?;
        elbv2::delete_target_group(client, &tg)?;
        progress(&format!(
            "deleted the target group {name}; {} terminated",
            refs.join(", ")
        ));
        outcome.reason = Some(reason);
        outcome.console_tail = Some(tail(&console, CONSOLE_TAIL));
        outcome.console_of = (!failing.is_empty()).then_some(failing);
        outcome.seconds = started.elapsed().as_secs_f64();
        return Ok(outcome);
    }

    match &listener {
        Some(l) => elbv2::forward_to(client, &l.arn, &tg)?,
        None => {
            elbv2::create_listener(client, &b.lb.arn, LISTENER_PORT, &tg)?;
        }
    }
    progress(&format!(
        "{dns}:{LISTENER_PORT} now forwards to {name} ({})",
        outcome.instances.join(", ")
    ));
    let count_text = count.to_string();
    let mut lb_tags = vec![
        (DIGEST_TAG, image.digest.as_str()),
        (INSTANCES_TAG, count_text.as_str()),
    ];
    let served = b.tags.get(DIGEST_TAG).filter(|p| **p != image.digest);
    if let Some(previous) = served {
        lb_tags.push((PREVIOUS_TAG, previous.as_str()));
    }
    elbv2::add_tags(client, &b.lb.arn, &lb_tags)?;
    // The release it replaces (and anything else of the environment's): drained, then gone.
    for g in groups_of(client, &d.app, &d.env)? {
        let (arn, old) = (g.arn, g.name);
        if arn == tg {
            continue;
        }
        let gone = retire(client, d, &arn, &old, drain)?;
        progress(&format!(
            "drained and deleted the target group {old}{}",
            if gone.is_empty() {
                String::new()
            } else {
                format!("; {} terminated", gone.join(", "))
            }
        ));
        terminated.extend(gone);
    }
    let strays: Vec<String> = live_instances(client, &d.app, &d.env)?
        .into_iter()
        .map(|i| i.id)
        .filter(|id| !outcome.instances.contains(id))
        .collect();
    let refs: Vec<&str> = strays.iter().map(String::as_str).collect();
    ec2::terminate_instances(client, &refs)?;
    terminated.extend(strays);
    terminated.dedup();
    outcome.terminated = terminated;
    outcome.healthy = true;
    outcome.seconds = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Deletes the environment's listener and load balancer, then its target groups (AWS refuses
/// a group a listener uses), noting them in `removed`. The instances and security groups are
/// the caller's.
pub(crate) fn destroy(
    client: &Client,
    app: &str,
    env: &str,
    removed: &mut Destroyed,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    if let Some(b) = find(client, app, env)? {
        for l in elbv2::describe_listeners(client, &b.lb.arn)? {
            elbv2::delete_listener(client, &l.arn)?;
        }
        elbv2::delete_load_balancer(client, &b.lb.arn)?;
        progress(&format!(
            "deleted the load balancer {} ({})",
            b.lb.name, b.lb.dns_name
        ));
        removed.load_balancers.push(b.lb.dns_name);
    }
    for g in groups_of(client, app, env)? {
        let (arn, name) = (g.arn, g.name);
        let deadline = Instant::now() + Duration::from_secs(120);
        // Right after its load balancer is deleted AWS may still count the group in use.
        loop {
            match elbv2::delete_target_group(client, &arn) {
                Ok(()) => break,
                Err(e) if has_code(&e, "ResourceInUse") && Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                Err(e) => return Err(e).context(format!("deleting the target group {name}")),
            }
        }
        progress(&format!("deleted the target group {name}"));
        removed.target_groups.push(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        name.len() <= 32
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
            && !name.contains("--")
    }

    #[test]
    fn names_fit_elb() {
        assert_eq!(load_balancer_name("web", "prod"), "fuse-web-prod");
        for (app, env) in [
            ("a-very-long-application-name", "production"),
            ("my_app.v2", "prod"),
            ("web", "x-"),
        ] {
            let n = load_balancer_name(app, env);
            assert!(valid(&n), "{n}");
        }
        assert_ne!(
            load_balancer_name("a-very-long-application-name", "production"),
            load_balancer_name("a-very-long-application-name", "production2")
        );
        let tg = target_group_name("web", "prod", &format!("sha256:{}", "ab".repeat(32)));
        assert!(valid(&tg), "{tg}");
        assert!(tg.contains("-abababab-"), "{tg}");
    }
}
