//! Blue/green deployment of one instance per app and environment (`fuse deploy IMAGE --env
//! ENV`), with all state in AWS tags: a security group from the image's ports, the new
//! instance (the image's AMI, the deployment's user-data, IMDSv2 only), the image's health
//! check against its public address, and an Elastic IP moved to it only when it is healthy;
//! then the instances it replaces are terminated. An unhealthy new instance is terminated and
//! the old one keeps serving. The address records the digest it serves and the one before
//! (`fuse deploy rollback`). With `--instances N` (or for an environment already behind a
//! load balancer) the release goes to [`super::balanced`] instead; `ls`, `logs`, `rollback`
//! and `destroy` cover both.

use super::ami::DIGEST_TAG;
use super::aws::ec2::{self, Address, Launch};
use super::aws::http::{has_code, Client};
use super::lock;
pub(crate) use super::release::{
    check_of, live_instances, owned, ownership_tags, tail, wait_healthy, Check, Deployed,
    Deployment, Destroyed, APP_TAG, CONSOLE_TAIL, ENV_TAG, FORCED_TAG, INTERRUPTED, LIVE, POLL,
    PREVIOUS_TAG,
};
use crate::host::digest;
use crate::image::store::StoredImage;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long `destroy` waits for the instances to go before deleting their security group.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(600);

/// How an environment is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// One instance behind an Elastic IP.
    Single,
    /// N instances behind an application load balancer (see [`super::balanced`]).
    Balanced(u32),
}

/// The mode a deployment of `d` uses: `--instances` (or the load balancer's recorded count
/// when not given) for an environment behind a load balancer or a new one; refused, before
/// anything is made, for an environment served by an Elastic IP (converting in place would
/// change its address), for an image with no port, and for a deregistration delay given to
/// an environment that one instance serves (it would be ignored).
pub(crate) fn resolve_mode(client: &Client, image: &StoredImage, d: &Deployment) -> Result<Mode> {
    let found = super::balanced::find(client, &d.app, &d.env)?;
    let mode = match (found, d.instances) {
        (Some(b), requested) => Mode::Balanced(requested.unwrap_or(b.instances)),
        (None, None) if d.deregistration_delay.is_some() => {
            match address_of(client, &d.app, &d.env)? {
                Some(a) => bail!(
                    "--deregistration-delay is for an environment behind a load balancer, and {}/{} is served by one instance at the Elastic IP {}: leave it out",
                    d.app, d.env, a.public_ip
                ),
                None => bail!(
                    "--deregistration-delay is for an environment behind a load balancer: add --instances N to put {}/{} behind one, or leave it out",
                    d.app, d.env
                ),
            }
        }
        (None, None) => Mode::Single,
        (None, Some(n)) => {
            if let Some(a) = address_of(client, &d.app, &d.env)? {
                bail!(
                    "{}/{} is served by one instance at the Elastic IP {}: it cannot go behind a load balancer in place; `fuse deploy destroy {} --env {}` first, or deploy to another --env",
                    d.app, d.env, a.public_ip, d.app, d.env
                );
            }
            Mode::Balanced(n)
        }
    };
    if let (Mode::Balanced(_), Check::Running) = (mode, check_of(image)) {
        bail!(
            "{} has no port: a load balancer needs one to send requests to (add [ports] to its fuse.toml), or deploy it without --instances",
            image.name
        );
    }
    Ok(mode)
}

/// The security group of an app and environment's instances (the one holding its lock), not
/// its load balancer's.
pub(crate) fn instance_group(
    client: &Client,
    app: &str,
    env: &str,
) -> Result<Option<ec2::SecurityGroup>> {
    let (a, e) = ([app], [env]);
    Ok(ec2::describe_security_groups(client, &owned(&a, &e))?
        .into_iter()
        .find(|g| !g.tags.contains_key(super::balanced::ROLE_TAG)))
}

/// The Elastic IP of an app and environment, if it has one.
pub(crate) fn address_of(client: &Client, app: &str, env: &str) -> Result<Option<Address>> {
    let (a, e) = ([app], [env]);
    Ok(ec2::describe_addresses(client, &owned(&a, &e))?
        .into_iter()
        .next())
}

/// The security group of an app and environment: found by its tags, or made (no port open:
/// which ports open to whom depends on the deployment's mode, known once the lock is held).
fn ensure_security_group(
    client: &Client,
    d: &Deployment,
    progress: &mut dyn FnMut(&str),
) -> Result<String> {
    if let Some(found) = instance_group(client, &d.app, &d.env)? {
        return Ok(found.id);
    }
    let name = format!("fuse-{}-{}", d.app, d.env);
    let by_name = [name.as_str()];
    let group = match ec2::create_security_group(
        client,
        &name,
        &format!("fuse-deploy-{}-{}", d.app, d.env),
    ) {
        // Made by a run that stopped before tagging it, or by a first deploy started at the
        // same moment: both go on to the lock, which lets one of them through.
        Err(e) if has_code(&e, "InvalidGroup.Duplicate") => {
            ec2::describe_security_groups(client, &[("group-name", &by_name)])?
                .into_iter()
                .next()
                .map(|g| g.id)
                .with_context(|| {
                    format!("security group {name} exists, but EC2 does not list it")
                })?
        }
        made => made?,
    };
    progress(&format!("security group {group} ({name})"));
    ec2::create_tags(client, &[&group], &ownership_tags(&d.app, &d.env))?;
    Ok(group)
}

/// Refuses when another run deploys the app/env now (checked again, for good, when its lock
/// is taken): before an AMI is made for nothing.
pub(crate) fn refuse_if_deploying(client: &Client, d: &Deployment) -> Result<()> {
    match instance_group(client, &d.app, &d.env)? {
        Some(group) => lock::refuse_if_held(
            client,
            &group.id,
            &format!("{}/{}", d.app, d.env),
            d.break_lock,
        ),
        None => Ok(()),
    }
}

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
    let group = ensure_security_group(client, d, progress)?;
    let what = format!("{}/{}", d.app, d.env);
    let held = lock::acquire(client, &group, &what, d.break_lock, progress)?;
    let result = resolve_mode(client, image, d).and_then(|mode| {
        // fuse's own health probe reaches a new instance on its public address, whatever the
        // mode: the image's ports are open to the internet while a release is checked (a new
        // version may listen on a port more; a group found by name may lack them).
        ec2::open_ports(client, &group, &ports)?;
        let open: Vec<String> = ports.iter().map(u16::to_string).collect();
        if !open.is_empty() {
            progress(&format!("TCP {} open to the internet", open.join(", ")));
        }
        match mode {
            Mode::Single => deploy_locked(client, image, ami, d, &group, started, progress),
            Mode::Balanced(n) => super::balanced::deploy_locked(
                client, image, ami, d, n, &group, &ports, started, progress,
            ),
        }
    });
    let released = held.release(client);
    let outcome = result?;
    released?;
    if outcome.reason.as_deref() == Some(INTERRUPTED) {
        bail!(
            "Interrupted: {} terminated, {}; the lock of {what} is released",
            outcome.instances.join(", "),
            outcome.kept()
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
        load_balancer: None,
        instances: vec![instance.clone()],
        target_group: None,
        terminated: Vec::new(),
        console_tail: None,
        console_of: None,
        served_before: false,
        seconds: 0.0,
    };
    let check = check_of(image);
    match wait_healthy(client, &instance, &check, deadline, progress)? {
        Err(reason) => {
            // The console first: a terminated instance's may be gone.
            let console = ec2::console_output(client, &instance).unwrap_or_default();
            ec2::terminate_instances(client, &[&instance])?;
            outcome.address = address_of(client, &d.app, &d.env)?.map(|a| a.public_ip);
            outcome.served_before = outcome.address.is_some();
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
            let (allocation, ip) = ec2::allocate_address(client, &ownership_tags(&d.app, &d.env))?;
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
    /// Behind a load balancer: its DNS name (the digests are then the load balancer's).
    pub(crate) load_balancer: Option<String>,
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
    /// The address leads to it, or it is a target of the group the load balancer forwards to.
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
    let mut behind = std::collections::BTreeSet::new();
    for ((app, env), b) in super::balanced::all(client)? {
        behind.extend(super::balanced::serving(client, &b)?);
        let e = entry(&mut envs, &app, &env);
        e.load_balancer = Some(b.lb.dns_name.clone());
        e.digest = b.tags.get(DIGEST_TAG).cloned();
        e.previous_digest = b.tags.get(PREVIOUS_TAG).cloned();
    }
    let mut with = vec![("tag-key", &key[..])];
    with.push(("instance-state-name", LIVE));
    let mut instances = ec2::describe_instances(client, &with)?;
    instances.sort_by(|x, y| x.launch_time.cmp(&y.launch_time));
    for i in instances {
        let (Some(app), Some(env)) = (i.tags.get(APP_TAG), i.tags.get(ENV_TAG)) else {
            continue;
        };
        let serving = behind.contains(&i.id)
            || addresses
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
            load_balancer: None,
            digest: None,
            previous_digest: None,
            instances: Vec::new(),
        })
}

/// The instances that serve an app and environment: the load balancer's targets, else the
/// address's instance, else the newest live one.
pub(crate) fn serving_instances(client: &Client, app: &str, env: &str) -> Result<Vec<String>> {
    if let Some(b) = super::balanced::find(client, app, env)? {
        let serving = super::balanced::serving(client, &b)?;
        if !serving.is_empty() {
            return Ok(serving);
        }
    }
    if let Some(id) = address_of(client, app, env)?.and_then(|a| a.instance) {
        return Ok(vec![id]);
    }
    match live_instances(client, app, env)?.pop() {
        Some(i) => Ok(vec![i.id]),
        None => bail!("{app}/{env} has no instance in this region: see `fuse deploy ls`"),
    }
}

/// What a rollback deploys.
#[derive(Debug, Clone)]
pub(crate) struct RollbackTarget {
    /// The digest the environment served before the current one.
    pub(crate) digest: String,
    /// The serving instance's user-data: the deployment's values stay.
    pub(crate) user_data: String,
    /// The serving instance's type: a rollback changes the release, not the machine.
    pub(crate) instance_type: String,
}

/// What a rollback deploys: the digest the address (or load balancer) served before, with
/// the serving instance's user-data and type.
pub(crate) fn rollback_target(client: &Client, app: &str, env: &str) -> Result<RollbackTarget> {
    let (digest, instance) = match super::balanced::find(client, app, env)? {
        Some(b) => {
            let previous = b.tags.get(PREVIOUS_TAG).cloned().with_context(|| {
                format!(
                    "{app}/{env} has no previous digest to go back to ({} is its first)",
                    b.tags.get(DIGEST_TAG).map(String::as_str).unwrap_or("?")
                )
            })?;
            let instance = super::balanced::serving(client, &b)?
                .into_iter()
                .next()
                .with_context(|| format!("{} forwards to no instance", b.lb.dns_name))?;
            (previous, instance)
        }
        None => {
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
            (previous, instance)
        }
    };
    let ids = [instance.as_str()];
    let instance_type = ec2::describe_instances(client, &[("instance-id", &ids)])?
        .into_iter()
        .find(|i| i.id == instance)
        .map(|i| i.instance_type)
        .filter(|t| !t.is_empty())
        .with_context(|| format!("EC2 did not say which type {instance} is"))?;
    Ok(RollbackTarget {
        digest,
        user_data: ec2::user_data(client, &instance)?,
        instance_type,
    })
}

/// Terminates the app/env's instances, releases its address, deletes its security group.
pub(crate) fn destroy(
    client: &Client,
    app: &str,
    env: &str,
    break_lock: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Destroyed> {
    let Some(group) = instance_group(client, app, env)? else {
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
    super::balanced::destroy(client, app, env, &mut gone, progress)?;
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
    let mut groups = ec2::describe_security_groups(client, &owned(&a, &e))?;
    // The instances' group first: it refers to the load balancer's, which AWS keeps until then.
    groups.sort_by_key(|g| g.tags.contains_key(super::balanced::ROLE_TAG));
    let deadline = Instant::now() + TERMINATE_TIMEOUT;
    for group in groups {
        // EC2 refuses to delete a group an instance still uses (until it is terminated).
        loop {
            match ec2::delete_security_group(client, &group.id) {
                Ok(()) => break,
                Err(e) if has_code(&e, "DependencyViolation") => {
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
    fn client_tokens_fit() {
        assert!(client_token(&"a".repeat(80), "prod", "sha256:00").len() <= 64);
    }
}
