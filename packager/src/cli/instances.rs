//! The VM commands: `fuse run` (foreground and `--detach`), `ps`, `logs`, `kill`, and the
//! hidden supervisor (the logic is in `crate::run`).

use super::args::{BuildFlags, VmFlags};
use super::print::progress_line;
use crate::host::digest;
use crate::image::store::{Store, StoredImage};
use crate::run::instances::{self, human_duration, now_secs, SupervisorRequest};
use crate::run::{Hooks, RunOptions};
use anyhow::Result;
use clap::Args;
use serde_json::json;
use std::time::Duration;

/// How long `fuse run -d` waits for the VM to start when there is no health check (a build
/// happened already; QEMU starts in well under a second).
const START_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// An app (built first) or an image name[:version] or digest.
    target: String,
    #[command(flatten)]
    build: BuildFlags,
    #[command(flatten)]
    vm: VmFlags,
    /// Run in the background: print the instance id and return (see `fuse ps`, `logs`, `kill`).
    #[arg(long, short)]
    detach: bool,
}

/// `fuse run`: builds (given an app) or finds the image, then boots it in the foreground, or
/// with `-d` under a supervisor. Flags are checked before anything is built; the image's own
/// ports and health check (from its fuse.toml) only once it is known.
pub(super) fn run(args: RunArgs) -> Result<i32> {
    let store = Store::open_default()?;
    let options = RunOptions::try_from(&args.vm)?;
    options.check_ports()?;
    if args.detach {
        // An unsafe state directory is refused before anything is built.
        crate::host::paths::runtime_dir()?;
    }
    let image = super::images::resolve(&store, &args.target, &args.build)?;
    if args.detach {
        return detach(&image, options);
    }
    let outcome = crate::run::launch(
        &store,
        &image,
        &options,
        Hooks::default(),
        &mut std::io::stdout(),
        &mut |l| progress_line(l),
    )?;
    Ok(i32::from(outcome.exit_code))
}

/// `fuse run --detach`: starts the supervisor, prints the id once the VM runs (or is healthy).
fn detach(image: &StoredImage, options: RunOptions) -> Result<i32> {
    // Everything that can fail early fails here, in the foreground, as one line.
    let options = options.with_image_defaults(&image.manifest);
    options.check_ports()?;
    crate::run::overlay::check_environment(
        &image.manifest,
        options.selection.environment.as_deref(),
    )?;
    let patience = match &options.health {
        Some(h) => h.timeout + START_PATIENCE,
        None => START_PATIENCE,
    };
    let request = SupervisorRequest {
        digest: image.digest.clone(),
        options,
    };
    let state = instances::detach(&request, patience)?;
    if let (Some(ms), Some(url)) = (state.ready_ms, &state.url) {
        eprintln!("ready in {ms} ms at {url}");
    }
    println!("{}", state.id);
    Ok(0)
}

/// The hidden `fuse __supervise DIR`.
pub(super) fn supervise(dir: &std::path::Path) -> Result<i32> {
    let store = Store::open_default()?;
    Ok(i32::from(instances::supervise(&store, dir)?))
}

/// `fuse ps [--json]`.
pub(super) fn ps(json_output: bool) -> Result<i32> {
    let list = instances::list()?;
    let now = now_secs();
    if json_output {
        let rows: Vec<_> = list
            .iter()
            .map(|i| {
                let s = &i.state;
                json!({
                    "id": s.id,
                    "image": s.image,
                    "digest": s.digest,
                    "ports": s.ports,
                    "volumes": s.volumes,
                    "status": s.status.as_str(),
                    "url": s.url,
                    "uptime_secs": now.saturating_sub(s.started_at),
                    "pid": s.qemu.map(|q| q.pid),
                    "supervisor_pid": s.supervisor.pid,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(0);
    }
    println!(
        "{:<12}  {:<24} {:<12}  {:<20} {:<8} {:>8} {:>8}",
        "ID", "IMAGE", "DIGEST", "PORTS", "STATUS", "UPTIME", "PID"
    );
    for i in list {
        let s = &i.state;
        let ports = if s.ports.is_empty() {
            "-".to_string()
        } else {
            s.ports.join(",")
        };
        println!(
            "{:<12}  {:<24} {:<12}  {:<20} {:<8} {:>8} {:>8}",
            s.id,
            s.image,
            digest::short(&s.digest),
            ports,
            s.status.as_str(),
            human_duration(now.saturating_sub(s.started_at)),
            s.qemu
                .map(|q| q.pid.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(0)
}

/// `fuse logs ID [-f]`.
pub(super) fn logs(id: &str, follow: bool) -> Result<i32> {
    let instance = instances::find(id)?;
    instances::logs(&instance, follow, &mut std::io::stdout())?;
    Ok(0)
}

/// `fuse kill ID...`: stops each, gracefully first.
pub(super) fn kill(ids: &[String]) -> Result<i32> {
    // Resolve every id first: a typo stops nothing.
    let found = ids
        .iter()
        .map(|id| instances::find(id))
        .collect::<Result<Vec<_>>>()?;
    for instance in found {
        let graceful = instances::kill(&instance)?;
        if graceful {
            println!("stopped {}", instance.state.id);
        } else {
            println!(
                "killed {} (it did not stop within its grace period of {}s)",
                instance.state.id, instance.state.grace_secs
            );
        }
    }
    Ok(0)
}
