//! The instance commands of the CLI: `fuse run --detach`, `ps`, `logs`, `kill` (the logic is
//! in [`crate::instances`]).

use crate::digest;
use crate::instances::{self, human_duration, now_secs};
use crate::run::{self, RunRequest};
use crate::store::Store;
use anyhow::Result;
use serde_json::json;
use std::time::Duration;

/// How long `fuse run -d` waits for the VM to start when there is no health check (a build
/// happened already; QEMU starts in well under a second).
const START_PATIENCE: Duration = Duration::from_secs(60);

/// `fuse run --detach`: builds in the foreground, starts the supervisor, prints the id.
pub fn detach(store: &Store, request: &RunRequest) -> Result<i32> {
    // Everything that can fail early fails here, in the foreground, as one line.
    run::check_ports(request)?;
    let image = run::resolve_request(store, request, &mut |l| eprintln!("fuse: {l}"))?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let patience = match &request.health {
        Some(h) => h.timeout + START_PATIENCE,
        None => START_PATIENCE,
    };
    let state = instances::detach(&image.digest, &argv, request.health.is_some(), patience)?;
    if let (Some(ms), Some(url)) = (state.ready_ms, &state.url) {
        eprintln!("ready in {ms} ms at {url}");
    }
    println!("{}", state.id);
    Ok(0)
}

/// `fuse ps [--json]`.
pub fn ps(json_output: bool) -> Result<i32> {
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
pub fn logs(id: &str, follow: bool) -> Result<i32> {
    let instance = instances::find(id)?;
    instances::logs(&instance, follow, &mut std::io::stdout())?;
    Ok(0)
}

/// `fuse kill ID...`: stops each, gracefully first.
pub fn kill(ids: &[String]) -> Result<i32> {
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
