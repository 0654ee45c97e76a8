//! The VM commands: `fuse run` (foreground and `--detach`), `ps`, `logs`, `kill`, `prune`,
//! and the hidden supervisor (the logic is in `crate::run`).

use super::args::{BuildFlags, VmFlags};
use super::print::progress_line;
use crate::host::{digest, now_secs};
use crate::image::store::{Store, StoredImage};
use crate::run::instances::{
    self, human_ago, human_duration, End, InstanceState, SupervisorRequest,
};
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
    #[command(flatten)]
    registry: super::registry::RegistryFlags,
    /// Run in the background: print the instance id and return (see `fuse ps`, `logs`, `kill`).
    #[arg(long, short)]
    detach: bool,
    /// With --detach: remove the instance when its VM ends instead of keeping it (with its
    /// exit code and logs) for `fuse ps -a` and `fuse logs` until `fuse prune`. A foreground
    /// run keeps nothing anyway.
    #[arg(long)]
    rm: bool,
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
    let image = super::images::resolve(&store, &args.target, &args.build, &args.registry)?;
    if args.detach {
        return detach(&image, options, args.rm);
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
fn detach(image: &StoredImage, options: RunOptions, auto_remove: bool) -> Result<i32> {
    // Everything that can fail early fails here, in the foreground, as one line.
    let options = options.with_image_defaults(&image.manifest);
    options.check_ports()?;
    if !options.cloud.is_set() {
        crate::run::overlay::check_environment(
            &image.manifest,
            options.selection.environment.as_deref(),
        )?;
    }
    let patience = match &options.health {
        Some(h) => h.timeout + START_PATIENCE,
        None => START_PATIENCE,
    };
    let request = SupervisorRequest {
        digest: image.digest.clone(),
        options,
        auto_remove,
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
    Ok(i32::from(instances::supervise(
        &store,
        dir,
        &super::exit::code_of,
    )?))
}

/// The hidden `fuse __relay HOST:PORT` (see `crate::run::relay`): exit 0 when both directions
/// ended, 1 when the server could not be reached. Nothing goes to stderr, which QEMU connects
/// to the guest's connection: it is pointed at /dev/null first.
pub(super) fn relay(target: &str) -> i32 {
    // SAFETY: plain fd calls on the process's own standard error.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
    match crate::run::relay::relay(target) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Docker's STATUS of an ended instance: `Exited (3) 5 seconds ago`, `Exited (unknown) …`.
fn exited_status(s: &InstanceState, now: u64) -> String {
    let code = s
        .exit_code
        .map_or_else(|| "unknown".to_string(), |c| c.to_string());
    let ago = s
        .ended_at
        .map(|t| format!(" {}", human_ago(now.saturating_sub(t))))
        .unwrap_or_default();
    format!("Exited ({code}){ago}")
}

/// `fuse ps [-a] [--json]`.
pub(super) fn ps(all: bool, json_output: bool) -> Result<i32> {
    let list = instances::list(all)?;
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
                    "started_at": s.started_at,
                    "uptime_secs": (!s.has_ended()).then(|| now.saturating_sub(s.started_at)),
                    "pid": s.qemu.filter(|_| !s.has_ended()).map(|q| q.pid),
                    "supervisor_pid": s.supervisor.pid,
                    "end": s.end.map(End::as_str),
                    "exit_code": s.exit_code,
                    "ended_at": s.ended_at,
                    "error": s.error,
                    "auto_remove": s.auto_remove,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(0);
    }
    let rows: Vec<[String; 7]> = list
        .iter()
        .map(|i| {
            let s = &i.state;
            let ports = if s.ports.is_empty() {
                "-".to_string()
            } else {
                s.ports.join(",")
            };
            let (status, uptime, pid) = if s.has_ended() {
                (exited_status(s, now), "-".to_string(), "-".to_string())
            } else {
                (
                    s.status.as_str().to_string(),
                    human_duration(now.saturating_sub(s.started_at)),
                    s.qemu
                        .map(|q| q.pid.to_string())
                        .unwrap_or_else(|| "-".into()),
                )
            };
            [
                s.id.clone(),
                s.image.clone(),
                digest::short(&s.digest).to_string(),
                ports,
                status,
                uptime,
                pid,
            ]
        })
        .collect();
    let status_width = rows.iter().map(|r| r[4].len()).max().unwrap_or(0).max(8);
    let print_row = |r: &[String; 7]| {
        println!(
            "{:<12}  {:<24} {:<12}  {:<20} {:<status_width$} {:>8} {:>8}",
            r[0], r[1], r[2], r[3], r[4], r[5], r[6]
        )
    };
    print_row(&["ID", "IMAGE", "DIGEST", "PORTS", "STATUS", "UPTIME", "PID"].map(String::from));
    rows.iter().for_each(print_row);
    Ok(0)
}

/// `fuse logs ID [-f]`.
pub(super) fn logs(id: &str, follow: bool) -> Result<i32> {
    let instance = instances::find(id)?;
    instances::logs(&instance, follow, &mut std::io::stdout())?;
    Ok(0)
}

/// `fuse kill ID...`: stops each, gracefully first, and says how each ended. Exits 0 once
/// they are all stopped, however (like `docker stop`): the app's code is in the line.
pub(super) fn kill(ids: &[String]) -> Result<i32> {
    // Resolve every id first: a typo, or an instance that is not running, stops nothing.
    let found = ids
        .iter()
        .map(|id| instances::find(id))
        .collect::<Result<Vec<_>>>()?;
    found.iter().try_for_each(instances::ensure_running)?;
    for instance in found {
        let ended = instances::kill(&instance)?;
        println!("{}", kill_line(&ended));
    }
    Ok(0)
}

/// `stopped abc123 (the app exited 143)`, `killed abc123 after the 10 s grace period (exit
/// 137)`.
fn kill_line(s: &InstanceState) -> String {
    let id = &s.id;
    let code = s
        .exit_code
        .map_or_else(|| "unknown".to_string(), |c| c.to_string());
    match (s.end, &s.error) {
        (Some(End::Exited | End::Stopped), _) => format!("stopped {id} (the app exited {code})"),
        (Some(End::Killed), Some(error)) => format!("killed {id}: {error} (exit {code})"),
        (Some(End::Killed), None) if s.grace_secs > 0.0 => format!(
            "killed {id} after the {} s grace period (exit {code})",
            s.grace_secs
        ),
        (Some(End::Killed), None) => {
            format!("killed {id} at once: its grace period is 0 s (exit {code})")
        }
        (_, error) => format!(
            "{id} ended: {} (exit {code})",
            error.as_deref().unwrap_or("how is unknown")
        ),
    }
}

/// `fuse prune [ID...]`: removes the given ended instances, or every ended one. A running
/// instance among the ids is refused before anything is removed.
pub(super) fn prune(ids: &[String]) -> Result<i32> {
    let found = if ids.is_empty() {
        instances::list(true)?
            .into_iter()
            .filter(|i| i.state.has_ended())
            .collect()
    } else {
        let found = ids
            .iter()
            .map(|id| instances::find(id))
            .collect::<Result<Vec<_>>>()?;
        found.iter().try_for_each(instances::ensure_ended)?;
        found
    };
    for instance in found {
        instances::remove(&instance)?;
        println!("removed {}", instance.state.id);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(end: &str, code: Option<i32>, grace: f64, error: Option<&str>) -> InstanceState {
        serde_json::from_value(json!({
            "id": "0123456789ab", "image": "web:1.0", "digest": "sha256:00", "ports": [],
            "supervisor": {"pid": 1, "start_time": 1}, "qemu": {"pid": 2, "start_time": 2},
            "started_at": 100, "status": "exited", "grace_secs": grace,
            "end": end, "exit_code": code, "ended_at": 200, "error": error,
        }))
        .unwrap()
    }

    #[test]
    fn kill_says_how_each_instance_ended() {
        let line = |end, code, grace, error| kill_line(&ended(end, code, grace, error));
        assert_eq!(
            line("stopped", Some(143), 10.0, None),
            "stopped 0123456789ab (the app exited 143)"
        );
        assert_eq!(
            line("killed", Some(137), 10.0, None),
            "killed 0123456789ab after the 10 s grace period (exit 137)"
        );
        assert_eq!(
            line("killed", Some(143), 0.0, None),
            "killed 0123456789ab at once: its grace period is 0 s (exit 143)"
        );
        assert_eq!(
            line("lost", None, 10.0, Some("its supervisor was killed")),
            "0123456789ab ended: its supervisor was killed (exit unknown)"
        );
    }

    #[test]
    fn ended_instances_show_dockers_status() {
        assert_eq!(
            exited_status(&ended("exited", Some(3), 10.0, None), 205),
            "Exited (3) 5 seconds ago"
        );
        assert_eq!(
            exited_status(&ended("lost", None, 10.0, None), 260),
            "Exited (unknown) 1 minute ago"
        );
    }
}
