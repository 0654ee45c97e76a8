//! `fuse deploy`: an image to AWS. `fuse deploy IMAGE --env ENV` deploys it blue/green
//! (`cloud::deploy`); `ls`, `logs`, `rollback` and `destroy` read and change what it made;
//! `ami` makes (or finds) the image's AMI in a region.

use super::print::progress_line;
use crate::cloud::ami;
use crate::cloud::aws::http::Client;
use crate::cloud::aws::{self, profile::AwsOptions};
use crate::cloud::deploy::{self, Deployed, Deployment};
use crate::image::disk;
use crate::image::store::{Store, StoredImage};
use crate::run::overlay::Selection;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fuse_rootfs::Arch;
use std::path::PathBuf;
use std::time::Duration;

/// `fuse deploy IMAGE --env ENV`, or one of the subcommands.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(super) struct DeployArgs {
    #[command(subcommand)]
    command: Option<DeployCommand>,
    #[command(flatten)]
    deploy: DeployFlags,
}

/// Deploy an image blue/green to an environment: a new instance replaces the old one only
/// once healthy.
#[derive(Debug, Args)]
pub(super) struct DeployFlags {
    /// Image (name[:version] or digest).
    #[arg(required = true)]
    image: Option<String>,
    /// The environment to deploy to (one instance and address per app and environment, or
    /// N instances behind a load balancer with --instances); the
    /// image's environment of that name is booted when it has one. Boxfuse's `-env=prod`
    /// works too.
    #[arg(long = "env", short = 'E', value_name = "ENV", required = true)]
    env: Option<String>,
    #[command(flatten)]
    aws: AwsFlags,
    /// The EC2 instance type (default: t3.micro for x86_64 images, t4g.micro for aarch64).
    #[arg(long)]
    instance_type: Option<String>,
    /// Set a variable for this deployment (in the instance's user-data, never in the AMI;
    /// repeatable); `-e KEY` passes KEY's value from your environment.
    #[arg(short = 'e', value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Read variables from a dotenv file (KEY=VALUE lines; repeatable; `-e` wins).
    #[arg(long = "env-file", value_name = "FILE")]
    env_files: Vec<PathBuf>,
    /// How long the new instance may take to run and pass the image's health check before
    /// it is terminated and the deployment fails (default: 300).
    #[arg(long, value_name = "SECONDS")]
    health_timeout: Option<u64>,
    /// Put the environment behind an application load balancer with N instances (one
    /// target group per release, switched to only when every new instance is healthy). An
    /// environment behind a load balancer keeps its count when this is left out.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_INSTANCES))]
    instances: Option<u32>,
    /// Behind a load balancer: how long a replaced instance keeps serving the requests it has
    /// after it leaves the load balancer, before it is terminated (default: 30).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    deregistration_delay: Option<u64>,
    /// Machine-readable output (no progress lines).
    #[arg(long)]
    json: bool,
    /// Deploy to a protected environment without a passing `fuse test` result for the
    /// image's digest (the instance is tagged fuse:forced=true).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    lock: LockFlags,
}

/// Taking over another run's lock of the environment.
#[derive(Debug, Clone, Copy, Default, Args)]
pub(super) struct LockFlags {
    /// Take over the environment's lock from a run that holds it (when that run is gone:
    /// a lock older than 30 min, or of a dead fuse on this host, is taken over anyway).
    #[arg(long)]
    break_lock: bool,
}

/// An app and environment (for the subcommands that act on one).
#[derive(Debug, Args)]
pub(super) struct AppEnv {
    /// The app (its image's name, without the version).
    app: String,
    /// The environment.
    #[arg(long = "env", short = 'E', value_name = "ENV")]
    env: String,
    #[command(flatten)]
    aws: AwsFlags,
}

#[derive(Debug, Subcommand)]
pub(super) enum DeployCommand {
    /// List the deployed apps and environments: addresses (or load balancers), digests,
    /// instances and states.
    Ls {
        #[command(flatten)]
        aws: AwsFlags,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the console output of the instance(s) serving an app's environment.
    Logs {
        #[command(flatten)]
        target: AppEnv,
    },
    /// Deploy the digest an environment served before the current one (blue/green, with the
    /// current deployment's user-data); the image must be in the local store.
    Rollback {
        #[command(flatten)]
        target: AppEnv,
        /// How long the instance may take to become healthy (default: 300).
        #[arg(long, value_name = "SECONDS")]
        health_timeout: Option<u64>,
        /// The EC2 instance type (default: the type the environment runs now).
        #[arg(long)]
        instance_type: Option<String>,
        /// Machine-readable output (no progress lines).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        lock: LockFlags,
    },
    /// Remove everything a deployment of an app's environment made: its load balancer,
    /// listener and target groups, its instances, its address and its security groups (the
    /// AMIs stay, for other environments).
    Destroy {
        #[command(flatten)]
        target: AppEnv,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        lock: LockFlags,
    },
    /// Make the image an AMI in a region, once per digest.
    ///
    /// An AMI tagged with the image's digest (fuse:digest) is reused; otherwise the image's
    /// disk is uploaded with the EBS direct APIs (its non-zero 512 KiB blocks only) and
    /// registered: UEFI, ENA, IMDSv2 required, the image's architecture. A new version of an
    /// app whose earlier version's snapshot is in the region (fuse:name) and whose disk is in
    /// the local store is uploaded incrementally: only the blocks that differ from it.
    Ami {
        /// Image (name[:version] or digest).
        image: String,
        #[command(flatten)]
        aws: AwsFlags,
        /// Machine-readable output (no progress lines).
        #[arg(long)]
        json: bool,
    },
}

/// Where and as whom: as the AWS CLI takes them (environment and ~/.aws files otherwise).
#[derive(Debug, Clone, Default, Args)]
pub(super) struct AwsFlags {
    /// AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's region).
    #[arg(long)]
    region: Option<String>,
    /// A profile of ~/.aws/credentials and ~/.aws/config (default: AWS_PROFILE, else default).
    #[arg(long)]
    profile: Option<String>,
}

impl From<&AwsFlags> for AwsOptions {
    fn from(f: &AwsFlags) -> Self {
        AwsOptions {
            region: f.region.clone(),
            profile: f.profile.clone(),
        }
    }
}

/// From RunInstances to healthy, unless --health-timeout says otherwise.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(300);
/// `--instances` at most (a bound against typos: `--instances 100` is a bill).
const MAX_INSTANCES: i64 = 20;

pub(super) fn command(args: DeployArgs) -> Result<i32> {
    match args.command {
        Some(DeployCommand::Ami { image, aws, json }) => deploy_ami(&image, &aws, json),
        Some(DeployCommand::Ls { aws, json }) => ls(&aws, json),
        Some(DeployCommand::Logs { target }) => {
            let client = client(&target.aws)?;
            let instances = deploy::serving_instances(&client, &target.app, &target.env)?;
            for (n, instance) in instances.iter().enumerate() {
                // Behind a load balancer, each serving instance's, headed as tail(1) does.
                if instances.len() > 1 {
                    println!("{}==> {instance} <==", if n > 0 { "\n" } else { "" });
                }
                print!(
                    "{}",
                    crate::cloud::aws::ec2::console_output(&client, instance)?
                );
            }
            Ok(0)
        }
        Some(DeployCommand::Rollback {
            target,
            health_timeout,
            instance_type,
            json,
            lock,
        }) => rollback(
            &target,
            health_timeout,
            instance_type,
            json,
            lock.break_lock,
        ),
        Some(DeployCommand::Destroy { target, json, lock }) => {
            let client = client(&target.aws)?;
            let gone = deploy::destroy(
                &client,
                &target.app,
                &target.env,
                lock.break_lock,
                &mut |l| {
                    if !json {
                        progress_line(l)
                    }
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&gone)?);
            } else {
                let lb = if gone.load_balancers.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{} load balancer(s) and {} target group(s) deleted, ",
                        gone.load_balancers.len(),
                        gone.target_groups.len()
                    )
                };
                println!(
                    "{}/{}: {lb}{} instance(s) terminated, {} address(es) released, {} security group(s) deleted",
                    target.app,
                    target.env,
                    gone.instances.len(),
                    gone.addresses.len(),
                    gone.security_groups.len()
                );
            }
            Ok(0)
        }
        None => deploy_image(&args.deploy),
    }
}

fn client(flags: &AwsFlags) -> Result<Client> {
    aws::client(&AwsOptions::from(flags))
}

fn find_image(store: &Store, reference: &str) -> Result<StoredImage> {
    store
        .find(reference)?
        .with_context(|| format!("No image '{reference}' in the store: see `fuse ls`"))
}

fn deploy_image(flags: &DeployFlags) -> Result<i32> {
    let (Some(reference), Some(env)) = (&flags.image, &flags.env) else {
        anyhow::bail!("fuse deploy needs an image and --env ENV: see `fuse deploy --help`");
    };
    let store = Store::open_default()?;
    let image = find_image(&store, reference)?;
    // Before anything is sent to AWS.
    let forced = promotion_gate(&store, &image, reference, env, flags.force)?;
    // The image's environment of the deployment's name, when it has one; else its default.
    let environment = image
        .manifest
        .config
        .environments
        .iter()
        .any(|e| e == env)
        .then_some(env.as_str());
    let selection = Selection::from_flags(environment, &flags.set, &flags.env_files)?;
    crate::run::overlay::check_sizes(&selection.env, &[])?;
    let user_data = crate::run::userdata::user_data(&image.manifest, &selection, &[])?;
    let deployment = Deployment {
        app: image.name.name.clone(),
        env: env.clone(),
        instance_type: flags.instance_type.clone().unwrap_or_else(|| {
            match image.manifest.arch {
                Arch::X86_64 => "t3.micro",
                Arch::Aarch64 => "t4g.micro",
            }
            .to_string()
        }),
        user_data,
        health_timeout: flags
            .health_timeout
            .map(Duration::from_secs)
            .unwrap_or(HEALTH_TIMEOUT),
        break_lock: flags.lock.break_lock,
        forced,
        instances: flags.instances,
        deregistration_delay: flags.deregistration_delay.map(Duration::from_secs),
    };
    run_deployment(&store, &image, &flags.aws, &deployment, flags.json)
}

/// An environment the image's configuration marks protected (`[deploy] protected`) takes
/// only a digest with a passing `fuse test` result in the store, unless `force`; whether the
/// gate was forced.
fn promotion_gate(
    store: &Store,
    image: &StoredImage,
    reference: &str,
    env: &str,
    force: bool,
) -> Result<bool> {
    if !image.manifest.config.protected.iter().any(|p| p == env) {
        return Ok(false);
    }
    let short = crate::host::digest::short(&image.digest);
    let result = store.test_result(&image.digest)?;
    if let Some(r) = result.as_ref().filter(|r| r.passed) {
        progress_line(&format!(
            "{env} is protected: {} ({short}) passed `fuse test` at {}",
            image.name, r.at
        ));
        return Ok(false);
    }
    let why = match &result {
        Some(r) => format!("its last `fuse test` failed (at {})", r.at),
        None => "it has no `fuse test` result".into(),
    };
    if force {
        eprintln!(
            "fuse: WARNING: --force: deploying {} ({short}) to the protected environment {env} although {why}; the instance is tagged {}=true",
            image.name,
            deploy::FORCED_TAG
        );
        return Ok(true);
    }
    anyhow::bail!(
        "{env} is protected and {} ({short}) is untested: {why}: run `fuse test {reference}` first, or deploy with --force",
        image.name
    )
}

fn rollback(
    target: &AppEnv,
    health_timeout: Option<u64>,
    instance_type: Option<String>,
    json: bool,
    break_lock: bool,
) -> Result<i32> {
    let client = client(&target.aws)?;
    let back = deploy::rollback_target(&client, &target.app, &target.env)?;
    let digest = back.digest;
    let store = Store::open_default()?;
    let image = store.find(&digest)?.with_context(|| {
        format!("The previous image {digest} is not in the local store: `fuse pull` it, then roll back again")
    })?;
    let deployment = Deployment {
        app: target.app.clone(),
        env: target.env.clone(),
        instance_type: instance_type.unwrap_or(back.instance_type),
        user_data: back.user_data,
        health_timeout: health_timeout
            .map(Duration::from_secs)
            .unwrap_or(HEALTH_TIMEOUT),
        break_lock,
        // A digest this environment served before: it passed the gate then.
        forced: false,
        // The environment's mode and count stay.
        instances: None,
        deregistration_delay: None,
    };
    if !json {
        progress_line(&format!(
            "rolling {}/{} back to {} ({digest})",
            target.app, target.env, image.name
        ));
    }
    run_deployment(&store, &image, &target.aws, &deployment, json)
}

/// The AMI, then the blue/green switch; exit 1 when the new instance was not healthy.
fn run_deployment(
    store: &Store,
    image: &StoredImage,
    flags: &AwsFlags,
    deployment: &Deployment,
    json: bool,
) -> Result<i32> {
    let disk = disk::verified_disk_path(store, image)?;
    let client = client(flags)?;
    let mut progress = |line: &str| {
        if !json {
            progress_line(line);
        }
    };
    deploy::refuse_if_deploying(&client, deployment)?;
    // A mode the environment cannot take is refused before an AMI is made.
    deploy::resolve_mode(&client, image, deployment)?;
    let ami = ami::ensure_ami(&client, store, image, &disk, &mut progress)?;
    if !ami.reused {
        progress(&format!("{} made from {}", ami.ami, image.name));
    }
    let outcome = deploy::deploy(&client, image, &ami.ami, deployment, &mut progress)?;
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        print_outcome(&outcome);
    }
    Ok(if outcome.healthy { 0 } else { 1 })
}

fn print_outcome(o: &Deployed) {
    if o.healthy {
        let replaced = if o.terminated.is_empty() {
            String::new()
        } else {
            format!(", replacing {}", o.terminated.join(", "))
        };
        let at = match &o.load_balancer {
            Some(lb) => format!("behind {lb}"),
            None => format!("at {}", o.address.as_deref().unwrap_or("-")),
        };
        println!(
            "{}/{}: {} ({}) on {} {at}{replaced}",
            o.app,
            o.env,
            o.image,
            crate::host::digest::short(&o.digest),
            o.instances.join(", "),
        );
    } else {
        let launched = if o.instances.is_empty() {
            "nothing launched".to_string()
        } else {
            format!("{} terminated", o.instances.join(", "))
        };
        eprintln!(
            "fuse: deployment of {} to {}/{} failed: {}; {launched}, {}",
            o.image,
            o.app,
            o.env,
            o.reason.as_deref().unwrap_or("unhealthy"),
            o.kept()
        );
        if let Some(tail) = o.console_tail.as_deref().filter(|t| !t.is_empty()) {
            let failing = o.console_of.as_deref().unwrap_or(&o.instance);
            eprintln!("fuse: the last lines of {failing}'s console:\n{tail}");
        }
    }
}

fn ls(flags: &AwsFlags, json: bool) -> Result<i32> {
    let client = client(flags)?;
    let envs = deploy::list(&client)?;
    if json {
        println!("{}", serde_json::to_string(&envs)?);
        return Ok(0);
    }
    println!(
        "{:<16} {:<10} {:<16} {:<14} {:<20} {:<10} {:<16}",
        "APP", "ENV", "ADDRESS", "DIGEST", "INSTANCE", "STATE", "INSTANCE IP"
    );
    for e in &envs {
        let address = e.load_balancer.as_ref().or(e.address.as_ref());
        let short = |d: &Option<String>| {
            d.as_deref()
                .map(|d| crate::host::digest::short(d).to_string())
                .unwrap_or_else(|| "-".into())
        };
        if e.instances.is_empty() {
            println!(
                "{:<16} {:<10} {:<16} {:<14} {:<20} {:<10} {:<16}",
                e.app,
                e.env,
                address.map(String::as_str).unwrap_or("-"),
                short(&e.digest),
                "-",
                "-",
                "-"
            );
        }
        for i in &e.instances {
            println!(
                "{:<16} {:<10} {:<16} {:<14} {:<20} {:<10} {:<16}",
                e.app,
                e.env,
                if i.serving {
                    address.map(String::as_str).unwrap_or("-")
                } else {
                    "-"
                },
                short(&i.digest),
                i.id,
                i.state,
                i.public_ip.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(0)
}

fn deploy_ami(reference: &str, flags: &AwsFlags, json: bool) -> Result<i32> {
    let store = Store::open_default()?;
    let image = store
        .find(reference)?
        .with_context(|| format!("No image '{reference}' in the store: see `fuse ls`"))?;
    let disk = disk::verified_disk_path(&store, &image)?;
    // Credentials and region first: a missing one fails before anything is sent.
    let client = client(flags)?;
    let mut progress = |line: &str| {
        if !json {
            progress_line(line);
        }
    };
    let outcome = ami::ensure_ami(&client, &store, &image, &disk, &mut progress)?;
    if json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if outcome.reused {
        println!(
            "{} {} (reused: {} is tagged {}; nothing uploaded)",
            outcome.ami,
            outcome.region,
            outcome.name,
            ami::DIGEST_TAG
        );
    } else {
        let on = outcome
            .parent_snapshot
            .as_deref()
            .map(|p| format!(", incremental on {p}"))
            .unwrap_or_default();
        println!(
            "{} {} {} ({} of {} blocks sent, {:.1} MiB, in {:.1} s{on})",
            outcome.ami,
            outcome.region,
            outcome.snapshot.as_deref().unwrap_or("-"),
            outcome.blocks_sent,
            outcome.blocks_sent + outcome.blocks_skipped,
            outcome.bytes_sent as f64 / 1048576.0,
            outcome.seconds
        );
    }
    Ok(0)
}
