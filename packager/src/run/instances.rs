//! Running instances: `fuse run --detach`, `fuse ps`, `fuse logs`, `fuse kill`.
//!
//! `fuse run -d` resolves (builds) the image in the foreground, writes what to run (the image's
//! digest and the [`RunOptions`], injected values included) to `request.json` (0600) in a new
//! instance directory, then re-executes itself as a hidden supervisor (`fuse __supervise DIR`)
//! in a new session, with stdout going to the instance's `console.log` and stderr to
//! `supervisor.log`. Nothing of the request is on a command line (`ps` shows every local user
//! those); the supervisor reads the file, removes it, and boots through the same
//! [`crate::run::launch`] as `fuse run`, so QEMU is still tied to it (process group,
//! `PR_SET_PDEATHSIG`): kill the supervisor, even with SIGKILL, and the VM goes.
//!
//! State lives in `paths::runtime_dir()/<id>/` (0700, in a runtime directory checked to be
//! ours alone): `state.json` (written atomically), the logs and the QMP socket, all 0600.
//!
//! An instance is kept after its VM ends, as `docker ps -a` keeps containers, until `fuse
//! prune` removes it: the supervisor removes everything but [`KEPT_FILES`] (the QMP socket,
//! any file that held injected values) and records how the VM ended in the state ([`End`],
//! the exit code, when). A supervisor that was SIGKILLed cannot: `fuse ps` (and every other
//! command here) checks that the recorded supervisor and QEMU are alive and are the processes
//! recorded (their start time, and QEMU's command line naming this directory), and records
//! such an instance as [`End::Lost`], its exit code unknown, tidied the same way.
//!
//! `fuse kill` sends the supervisor SIGTERM, which stops the VM gracefully (the app gets
//! SIGTERM, see `fuse_boot::vm`), then waits for the supervisor and reads how it ended; past
//! the grace period and a margin, it SIGKILLs the supervisor (and so QEMU) and records that.

use crate::host::process::ProcessId;
use crate::host::{now_secs, paths};
use crate::image::store::Store;
use crate::run::{launch, Hooks, RunOptions};
use anyhow::{bail, Context, Result};
use fuse_boot::poll;
use fuse_boot::vm::{RunError, Spawned, VmOutcome};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The state file of an instance directory.
pub(crate) const STATE_FILE: &str = "state.json";
/// The app's console output.
pub(crate) const CONSOLE_LOG: &str = "console.log";
/// The supervisor's own messages (fuse notices and errors).
pub(crate) const SUPERVISOR_LOG: &str = "supervisor.log";
/// QEMU's QMP socket.
pub(crate) const QMP_SOCKET: &str = "qmp.sock";
/// What the supervisor runs ([`SupervisorRequest`]), 0600, removed once read.
pub(crate) const REQUEST_FILE: &str = "request.json";
/// Made by `fuse kill` in an auto-removed instance (`--rm`) before it stops it: the
/// supervisor then leaves the ended instance for `fuse kill` to report and remove.
const KILL_MARKER: &str = "kill-waiting";
/// How long an auto-removing supervisor waits for `fuse run -d` to be done with its instance.
const PARENT_PATIENCE: Duration = Duration::from_secs(600);
/// What an ended instance keeps: everything else (the QMP socket, a file that held injected
/// values) goes when the VM ends.
pub(crate) const KEPT_FILES: [&str; 3] = [STATE_FILE, CONSOLE_LOG, SUPERVISOR_LOG];
/// How long a directory without a state file may be "being created" before it is stale.
const CREATION_WINDOW: Duration = Duration::from_secs(60);
/// Added to the grace period before `fuse kill` gives up waiting and SIGKILLs.
const KILL_MARGIN: Duration = Duration::from_secs(10);
/// How long `fuse kill` waits for QEMU to follow its supervisor.
const QEMU_EXIT_PATIENCE: Duration = Duration::from_secs(5);
/// Between two looks at a process or a state file.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Between two reads of a followed console log.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);
/// `fuse logs -f` follows until the instance ends; this only bounds the deadline arithmetic.
const FOLLOW_LIMIT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    /// The supervisor runs; QEMU is not spawned yet.
    Starting,
    /// QEMU runs.
    Running,
    /// QEMU runs and the health check passed.
    Ready,
    /// The VM ended; [`InstanceState::end`] says how.
    Exited,
}

impl Status {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Ready => "ready",
            Status::Exited => "exited",
        }
    }
}

/// How the VM of an ended instance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum End {
    /// The app exited by itself.
    Exited,
    /// A stop signal (`fuse kill`) asked the app to stop, and it exited within the grace
    /// period.
    Stopped,
    /// The app did not exit within the grace period (or the grace period was 0), so the VM
    /// was killed.
    Killed,
    /// `--timeout` passed.
    TimedOut,
    /// The VM failed (QEMU, the boot, a kernel panic, the root's integrity): `error` says how.
    Failed,
    /// The supervisor was killed (SIGKILL) before it could record anything: the code is unknown.
    Lost,
}

impl End {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            End::Exited => "exited",
            End::Stopped => "stopped",
            End::Killed => "killed",
            End::TimedOut => "timed_out",
            End::Failed => "failed",
            End::Lost => "lost",
        }
    }
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct InstanceState {
    pub(crate) id: String,
    /// `name:version`.
    pub(crate) image: String,
    pub(crate) digest: String,
    /// Published ports, `HOST:GUEST/PROTO`.
    pub(crate) ports: Vec<String>,
    /// Volumes, `NAME:/PATH`.
    #[serde(default)]
    pub(crate) volumes: Vec<String>,
    pub(crate) supervisor: ProcessId,
    pub(crate) qemu: Option<ProcessId>,
    /// Seconds since the epoch when the instance was started.
    pub(crate) started_at: u64,
    pub(crate) status: Status,
    /// Where the app answers, once healthy.
    #[serde(default)]
    pub(crate) url: Option<String>,
    /// How long the app took to become healthy, from QEMU's spawn.
    #[serde(default)]
    pub(crate) ready_ms: Option<u64>,
    /// The grace period of a graceful stop, in seconds.
    pub(crate) grace_secs: f64,
    /// How the VM ended, once it has.
    #[serde(default)]
    pub(crate) end: Option<End>,
    /// The app's exit code (or fuse's, as `fuse run` would exit: 124 for a timeout, 137 when
    /// killed at the end of the grace period), once ended; none when unknown ([`End::Lost`]).
    #[serde(default)]
    pub(crate) exit_code: Option<i32>,
    /// Seconds since the epoch when the VM ended (or, for [`End::Lost`], was found gone).
    #[serde(default)]
    pub(crate) ended_at: Option<u64>,
    /// What went wrong, one line, for [`End::Failed`], [`End::TimedOut`] and [`End::Lost`].
    #[serde(default)]
    pub(crate) error: Option<String>,
    /// `--rm`: removed when the VM ends instead of kept.
    #[serde(default)]
    pub(crate) auto_remove: bool,
}

impl InstanceState {
    /// Whether the VM has ended (the instance stays listed by `fuse ps -a` until pruned).
    pub(crate) fn has_ended(&self) -> bool {
        self.status == Status::Exited
    }
}

/// An instance directory and its state.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub(crate) dir: PathBuf,
    pub(crate) state: InstanceState,
}

/// A new instance id: 12 random hex digits.
pub(crate) fn new_id() -> Result<String> {
    let mut bytes = [0u8; 6];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("Cannot read /dev/urandom for an instance id")?;
    Ok(hex::encode(bytes))
}

/// Writes `state` to `dir/state.json` atomically (readers never see half a file), 0600 (the
/// temporary file it is renamed from is made so).
pub(crate) fn write_state(dir: &Path, state: &InstanceState) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state)?;
    bytes.push(b'\n');
    crate::host::fs::write_atomic(&dir.join(STATE_FILE), &bytes)
        .with_context(|| format!("Cannot write the state of instance {}", state.id))
}

pub(crate) fn read_state(dir: &Path) -> Result<InstanceState> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

/// Whether QEMU `q` is the VM of the instance in `dir`: alive, same start time, and its
/// command line names the instance's QMP socket.
fn is_instance_qemu(q: &ProcessId, dir: &Path) -> bool {
    if !q.is_alive() {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{}/cmdline", q.pid)).unwrap_or_default();
    let needle = dir.join(QMP_SOCKET);
    let needle = needle.to_string_lossy();
    String::from_utf8_lossy(&cmdline).contains(needle.as_ref())
}

/// What `fuse ps` concludes about an instance directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// The supervisor (and QEMU, once spawned) run.
    Alive,
    /// The VM ended and the supervisor recorded how.
    Ended,
    /// Being created or wound down by a live process: leave it alone, do not list it.
    Transient,
    /// Its supervisor is gone without recording the end (SIGKILLed): record it as lost.
    Lost,
    /// A directory that never got a state: remove it.
    Stale,
}

/// Decides from the state (if readable) and the directory's age.
pub(crate) fn liveness(dir: &Path, state: Option<&InstanceState>, dir_age: Duration) -> Liveness {
    let Some(state) = state else {
        return if dir_age < CREATION_WINDOW {
            Liveness::Transient
        } else {
            Liveness::Stale
        };
    };
    if state.has_ended() {
        return Liveness::Ended;
    }
    if !state.supervisor.is_alive() {
        return Liveness::Lost;
    }
    match &state.qemu {
        None if state.status == Status::Starting => Liveness::Alive,
        None => Liveness::Transient,
        Some(q) if is_instance_qemu(q, dir) => Liveness::Alive,
        // The supervisor lives but its VM is gone: it is cleaning up.
        Some(_) => Liveness::Transient,
    }
}

/// The instances, oldest first: the running ones, and with `all` the ended ones too. Lost
/// instances are recorded as such on the way, and directories that never got a state removed.
pub(crate) fn list(all: bool) -> Result<Vec<Instance>> {
    let root = paths::runtime_dir()?;
    let entries = fs::read_dir(&root).with_context(|| format!("Cannot read {}", root.display()))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let state = read_state(&dir).ok();
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let Some(state) = state else {
            if liveness(&dir, None, age) == Liveness::Stale {
                let _ = fs::remove_dir_all(&dir);
            }
            continue;
        };
        let state = match liveness(&dir, Some(&state), age) {
            Liveness::Alive => state,
            Liveness::Ended if all => state,
            Liveness::Lost => match record_lost(&dir) {
                Some(state) if all => state,
                _ => continue,
            },
            Liveness::Ended | Liveness::Transient | Liveness::Stale => continue,
        };
        found.push(Instance { dir, state });
    }
    found.sort_by_key(|i| (i.state.started_at, i.state.id.clone()));
    Ok(found)
}

/// Records that the instance in `dir`, whose supervisor is gone, ended without saying how
/// (unless it did after all: its state is read again now that it is known to be gone). Returns
/// the ended state, if there is one.
fn record_lost(dir: &Path) -> Option<InstanceState> {
    let mut state = read_state(dir).ok()?;
    if state.has_ended() {
        return Some(state);
    }
    // A QEMU that outlived its supervisor (it cannot, with PDEATHSIG, but the state says
    // exactly which process it would be) must not run on unseen.
    if let Some(q) = state.qemu {
        if is_instance_qemu(&q, dir) {
            // SAFETY: kill(2) on a pid verified just now to be this instance's QEMU (start
            // time and command line); no memory is involved.
            unsafe { libc::kill(q.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    let error = format!(
        "its supervisor (pid {}) was killed before it could record how the VM ended",
        state.supervisor.pid
    );
    record_end(dir, &mut state, End::Lost, None, Some(error));
    Some(state)
}

/// Tidies `dir` down to [`KEPT_FILES`] (the QMP socket and anything that held secrets go),
/// then records the end in its state: anyone who reads "exited" finds the directory tidied.
fn record_end(
    dir: &Path,
    state: &mut InstanceState,
    end: End,
    exit_code: Option<i32>,
    error: Option<String>,
) {
    tidy(dir);
    state.status = Status::Exited;
    state.end = Some(end);
    state.exit_code = exit_code;
    state.error = error;
    state.ended_at = Some(now_secs());
    if let Err(e) = write_state(dir, state) {
        eprintln!("fuse: warning: {e:#}");
    }
}

/// Removes every entry of `dir` but [`KEPT_FILES`].
fn tidy(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if KEPT_FILES.iter().any(|k| name == *k) {
            continue;
        }
        let path = entry.path();
        let _ = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
    }
}

/// The instance, running or ended, whose id starts with `prefix` (unique).
pub(crate) fn find(prefix: &str) -> Result<Instance> {
    if prefix.is_empty() {
        bail!("No instance id given: see `fuse ps -a`");
    }
    let matching: Vec<Instance> = list(true)?
        .into_iter()
        .filter(|i| i.state.id.starts_with(prefix))
        .collect();
    match matching.len() {
        0 => bail!("No instance '{prefix}': see `fuse ps -a`"),
        1 => Ok(matching.into_iter().next().expect("one")),
        n => bail!("'{prefix}' matches {n} instances: give more of the id (see `fuse ps -a`)"),
    }
}

/// Refuses an instance that has not ended (before removing it).
pub(crate) fn ensure_ended(instance: &Instance) -> Result<()> {
    let id = &instance.state.id;
    if !instance.state.has_ended() {
        bail!("Instance {id} is running: stop it with `fuse kill {id}` first");
    }
    Ok(())
}

/// Refuses an instance that has ended (before stopping it), saying how it ended.
pub(crate) fn ensure_running(instance: &Instance) -> Result<()> {
    let state = &instance.state;
    let id = &state.id;
    if state.has_ended() {
        bail!(
            "Instance {id} is not running: it {} (see `fuse logs {id}`; `fuse prune {id}` \
             removes it)",
            describe_end(state)
        );
    }
    Ok(())
}

/// Removes an ended instance: its state and logs. A running one is refused.
pub(crate) fn remove(instance: &Instance) -> Result<()> {
    ensure_ended(instance)?;
    fs::remove_dir_all(&instance.dir)
        .with_context(|| format!("Cannot remove {}", instance.dir.display()))
}

/// How long ago, as Docker says it: `Less than a second ago`, `5 seconds ago`, `1 minute ago`,
/// `3 hours ago`, `2 days ago`.
pub(crate) fn human_ago(secs: u64) -> String {
    let (n, unit) = match secs {
        0 => return "Less than a second ago".into(),
        s if s < 60 => (s, "second"),
        s if s < 3600 => (s / 60, "minute"),
        s if s < 86400 => (s / 3600, "hour"),
        s => (s / 86400, "day"),
    };
    let plural = if n == 1 { "" } else { "s" };
    format!("{n} {unit}{plural} ago")
}

/// `3s`, `4m`, `2h5m`, `3d`.
pub(crate) fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// What `fuse run -d` hands its supervisor, through [`REQUEST_FILE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SupervisorRequest {
    /// The image, resolved (built) by `fuse run -d` already.
    pub(crate) digest: String,
    pub(crate) options: RunOptions,
    /// `--rm`: remove the instance when its VM ends.
    #[serde(default)]
    pub(crate) auto_remove: bool,
}

/// Writes `request` to `dir/request.json`, readable by its owner only.
fn write_request(dir: &Path, request: &SupervisorRequest) -> Result<()> {
    let path = dir.join(REQUEST_FILE);
    let bytes = serde_json::to_vec(request)?;
    create_private(&path)
        .and_then(|mut f| f.write_all(&bytes))
        .with_context(|| format!("Cannot write {}", path.display()))
}

/// A new file readable by its owner only: every file of an instance is (the logs hold the
/// app's output, the request its injected values).
fn create_private(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Reads the supervisor's request from `dir` and removes the file: the values it holds live
/// on in the supervisor's memory only.
pub(crate) fn take_request(dir: &Path) -> Result<SupervisorRequest> {
    let path = dir.join(REQUEST_FILE);
    let bytes = fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?;
    fs::remove_file(&path).with_context(|| format!("Cannot remove {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))
}

/// Starts the supervisor for a new instance of `request` and waits until the VM runs (and,
/// with a health check, is healthy). Returns the instance's state.
pub(crate) fn detach(request: &SupervisorRequest, patience: Duration) -> Result<InstanceState> {
    use std::os::unix::fs::DirBuilderExt;
    let root = paths::runtime_dir()?;
    let id = new_id()?;
    let dir = root.join(&id);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("Cannot create {}", dir.display()))?;
    let started = start_supervisor(&dir, request, patience);
    if started.is_err() {
        let _ = fs::remove_dir_all(&dir);
    }
    started
}

fn start_supervisor(
    dir: &Path,
    request: &SupervisorRequest,
    patience: Duration,
) -> Result<InstanceState> {
    write_request(dir, request)?;
    let open_log = |name: &str| {
        let path = dir.join(name);
        create_private(&path).with_context(|| format!("Cannot create {}", path.display()))
    };
    let console = open_log(CONSOLE_LOG)?;
    let log = open_log(SUPERVISOR_LOG)?;
    let exe = std::env::current_exe().context("Cannot find the fuse executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("__supervise")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it runs between fork and exec and touches no
    // memory of the parent. Its own session: the terminal's Ctrl-C and hang-up do not reach
    // the supervisor, and it outlives this command.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("Cannot start the fuse supervisor")?;
    let wait_ready = request.options.health.is_some();
    wait_started(dir, &mut child, wait_ready, patience).inspect_err(|_| {
        // The supervisor may be stuck or gone: make sure nothing of it runs on.
        let _ = child.kill();
        let _ = child.wait();
    })
}

/// Waits for the supervisor's state to say the VM runs (or is ready), or for it to fail.
fn wait_started(
    dir: &Path,
    child: &mut Child,
    wait_ready: bool,
    patience: Duration,
) -> Result<InstanceState> {
    let waited = poll::wait_until(
        patience,
        POLL_INTERVAL,
        || -> Option<Result<InstanceState>> {
            if let Ok(state) = read_state(dir) {
                let done = match state.status {
                    Status::Ready => true,
                    Status::Running => !wait_ready,
                    Status::Starting => false,
                    // It ran (and was healthy, if it had to be) and has ended already, like
                    // `docker run -d` of a container that exits at once; otherwise the
                    // supervisor is about to exit with the reason.
                    Status::Exited => ran_for_detach(&state, wait_ready),
                };
                if done {
                    return Some(Ok(state));
                }
            }
            let status = match child.try_wait() {
                Ok(None) => return None,
                Ok(Some(status)) => status,
                Err(e) => return Some(Err(e.into())),
            };
            Some(Err(anyhow::anyhow!(
                "The instance did not start: {}",
                why_not_started(dir, status)
            )))
        },
    );
    waited.unwrap_or_else(|| {
        bail!(
            "The instance did not start within {}s; see {}",
            patience.as_secs(),
            dir.join(SUPERVISOR_LOG).display()
        )
    })
}

/// Whether an ended instance started as far as `fuse run -d` is concerned: its VM ran and,
/// when `fuse run -d` waits for health, was healthy. Otherwise `fuse run -d` fails and removes
/// it.
fn ran_for_detach(state: &InstanceState, needs_ready: bool) -> bool {
    state.qemu.is_some() && (!needs_ready || state.ready_ms.is_some())
}

/// Why a supervisor that exited with `status` did not start its instance: its error line, else
/// the app's exit code; then the app's last output lines, as a foreground run shows them.
fn why_not_started(dir: &Path, status: std::process::ExitStatus) -> String {
    let log = fs::read_to_string(dir.join(SUPERVISOR_LOG)).unwrap_or_default();
    let mut message = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("fuse: error: "))
        .map(str::to_string)
        .unwrap_or_else(|| match status.code() {
            // The supervisor exits with the app's code once the VM has run.
            Some(code) => format!("the app exited with exit code {code} before it was ready"),
            None => format!("the supervisor ended ({status}): {}", log.trim()),
        });
    let console = fs::read_to_string(dir.join(CONSOLE_LOG)).unwrap_or_default();
    let lines: Vec<&str> = console.lines().filter(|l| !l.trim().is_empty()).collect();
    if !lines.is_empty() {
        message.push_str("; its last output:");
        for line in &lines[lines.len().saturating_sub(LAST_LINES)..] {
            message.push_str("\n  ");
            message.push_str(line);
        }
    }
    message
}

/// How many of the app's last output lines a failed start shows.
const LAST_LINES: usize = 10;

/// Stops a running instance gracefully (SIGTERM to its supervisor: the app gets SIGTERM),
/// forcing after its grace period and a margin. Returns its ended state: how it ended and the
/// exit code, as the supervisor recorded them (or this function, when it had to force).
pub(crate) fn kill(instance: &Instance) -> Result<InstanceState> {
    let state = &instance.state;
    let id = &state.id;
    ensure_running(instance)?;
    if state.auto_remove {
        // Tells the supervisor to leave the ended instance for us to report, then remove.
        let marker = instance.dir.join(KILL_MARKER);
        match create_private(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("Cannot create {}", marker.display()));
            }
            _ => {}
        }
    }
    let sup = state.supervisor;
    // SAFETY: kill(2) on the supervisor, verified alive with its recorded start time by
    // `list`; no memory is involved.
    unsafe { libc::kill(sup.pid as libc::pid_t, libc::SIGTERM) };
    let grace = Duration::from_secs_f64(state.grace_secs.max(0.0));
    let gone = |p: ProcessId| (!p.is_alive()).then_some(());
    let graceful = poll::wait_until(grace + KILL_MARGIN, POLL_INTERVAL, || gone(sup)).is_some();
    if !graceful {
        // SAFETY: as above; QEMU dies with it (PR_SET_PDEATHSIG).
        unsafe { libc::kill(sup.pid as libc::pid_t, libc::SIGKILL) };
        poll::wait_until(QEMU_EXIT_PATIENCE, POLL_INTERVAL, || gone(sup));
    }
    // QEMU dies with its supervisor; wait for that, so "stopped" means gone.
    if let Some(q) = state.qemu {
        poll::wait_until(QEMU_EXIT_PATIENCE, POLL_INTERVAL, || gone(q));
    }
    let ended = match read_state(&instance.dir) {
        Ok(ended) if ended.has_ended() => ended,
        Ok(mut unrecorded) => {
            let error = if graceful {
                "its supervisor ended without recording how the VM ended".to_string()
            } else {
                format!(
                    "its supervisor did not end within {}s of SIGTERM, so fuse kill killed it",
                    (grace + KILL_MARGIN).as_secs_f64()
                )
            };
            let (end, code) = if graceful {
                (End::Lost, None)
            } else {
                (End::Killed, Some(128 + libc::SIGKILL))
            };
            record_end(&instance.dir, &mut unrecorded, end, code, Some(error));
            unrecorded
        }
        Err(e) => {
            return Err(e.context(format!("Instance {id} was stopped, but its state is gone")))
        }
    };
    if ended.auto_remove {
        fs::remove_dir_all(&instance.dir)
            .with_context(|| format!("Cannot remove {}", instance.dir.display()))?;
    }
    Ok(ended)
}

/// How an ended instance ended, after "it": `exited with code 3 5 seconds ago`.
pub(crate) fn describe_end(state: &InstanceState) -> String {
    let ago = state
        .ended_at
        .map(|t| {
            format!(
                " {}",
                human_ago(now_secs().saturating_sub(t)).to_lowercase()
            )
        })
        .unwrap_or_default();
    let code = match state.exit_code {
        Some(c) => format!("code {c}"),
        None => "an unknown code".to_string(),
    };
    match state.end {
        Some(End::Stopped) => format!("was stopped (exit {code}){ago}"),
        Some(End::Killed) => format!("was killed (exit {code}){ago}"),
        Some(End::TimedOut) => format!("timed out (exit {code}){ago}"),
        Some(End::Failed) => format!("failed (exit {code}){ago}"),
        Some(End::Lost) => format!("ended with {code}{ago}"),
        Some(End::Exited) | None => format!("exited with {code}{ago}"),
    }
}

/// Writes the console output so far to `out`; with `follow`, goes on until the instance ends.
pub(crate) fn logs(instance: &Instance, follow: bool, out: &mut dyn Write) -> Result<()> {
    let path = instance.dir.join(CONSOLE_LOG);
    let mut file =
        fs::File::open(&path).with_context(|| format!("Cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    let mut copy = |out: &mut dyn Write| -> Result<()> {
        file.seek(SeekFrom::Start(pos))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            out.write_all(&buf[..n])?;
        }
        out.flush()?;
        Ok(())
    };
    copy(out)?;
    if !follow {
        return Ok(());
    }
    // Follow for as long as the instance lives: until its state says it ended, its supervisor
    // is gone, or `fuse prune` removed it (the open file stays readable); one last read
    // after that gets everything.
    let ended = || {
        instance.state.has_ended()
            || !instance.state.supervisor.is_alive()
            || read_state(&instance.dir).map_or(true, |s| s.has_ended())
    };
    poll::wait_until(FOLLOW_LIMIT, FOLLOW_INTERVAL, || match copy(out) {
        Err(e) => Some(Err(e)),
        Ok(()) if ended() => Some(Ok(())),
        Ok(()) => None,
    })
    .unwrap_or(Ok(()))?;
    copy(out)
}

/// The hidden `fuse __supervise DIR`: runs the VM of the instance in `dir` (created by
/// [`detach`], with its request) like `fuse run`, keeping `state.json` up to date, and at the
/// end tidies `dir` and records how the VM ended, with the exit code `fuse run` would have
/// (`exit_code_of` maps an error to it). Its stdout is the console log, its stderr the
/// supervisor log.
pub(crate) fn supervise(
    store: &Store,
    dir: &Path,
    exit_code_of: &dyn Fn(&anyhow::Error) -> i32,
) -> Result<u8> {
    let SupervisorRequest {
        digest,
        options,
        auto_remove,
    } = take_request(dir)?;
    // SAFETY: getppid has no preconditions. The parent is the `fuse run -d` that waits for
    // this instance to start.
    let parent = unsafe { libc::getppid() };
    let request = &options;
    let image = store
        .find(&digest)?
        .with_context(|| format!("Image {digest} is no longer in the store"))?;
    let supervisor = ProcessId::current().context("Cannot read /proc/self/stat")?;
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let state = InstanceState {
        id,
        image: image.name.to_string(),
        digest: image.digest.clone(),
        ports: request.publish.iter().map(|p| p.to_string()).collect(),
        volumes: request
            .volumes
            .iter()
            .map(|v| format!("{}:{}", v.name, v.mount))
            .collect(),
        supervisor,
        qemu: None,
        started_at: now_secs(),
        status: Status::Starting,
        url: None,
        ready_ms: None,
        grace_secs: request.grace.as_secs_f64(),
        end: None,
        exit_code: None,
        ended_at: None,
        error: None,
        auto_remove,
    };
    write_state(dir, &state)?;
    let shared = Arc::new(Mutex::new(state));
    let update = |f: &dyn Fn(&mut InstanceState)| {
        let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state);
        if let Err(e) = write_state(dir, &state) {
            eprintln!("fuse: warning: {e:#}");
        }
    };
    let mut on_spawn = |s: &Spawned| {
        let qemu = ProcessId::of(s.pid);
        update(&|state| {
            state.qemu = qemu;
            state.status = Status::Running;
        });
    };
    let ready_state = (shared.clone(), dir.to_path_buf());
    let on_ready = Arc::new(move |after: Duration, url: &str| {
        let (shared, dir) = &ready_state;
        let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
        state.status = Status::Ready;
        state.ready_ms = Some(after.as_millis() as u64);
        state.url = Some(url.to_string());
        if let Err(e) = write_state(dir, &state) {
            eprintln!("fuse: warning: {e:#}");
        }
    });
    let hooks = Hooks {
        on_spawn: Some(&mut on_spawn),
        on_ready: Some(on_ready),
        qmp_socket: Some(dir.join(QMP_SOCKET)),
        private_dir: Some(dir.to_path_buf()),
        stop: None,
    };
    let result = launch(
        store,
        &image,
        request,
        hooks,
        &mut std::io::stdout(),
        &mut |l| eprintln!("fuse: {l}"),
    );
    // Kept until `fuse prune`. A VM that never started, or ended before the ready state
    // `fuse run -d` waits for, is reported and removed by `fuse run -d`.
    let (end, error) = ending_of(&result);
    let code = match &result {
        Ok(outcome) => i32::from(outcome.exit_code),
        Err(e) => exit_code_of(e),
    };
    // `fuse kill` of an auto-removed instance reports how it ended, then removes it.
    let kill_waits = dir.join(KILL_MARKER).exists();
    let started = {
        let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
        record_end(dir, &mut state, end, Some(code), error);
        ran_for_detach(&state, request.health.is_some())
    };
    // One that did not start is `fuse run -d`'s to report and remove, once this exits.
    if auto_remove && started && !kill_waits {
        // Once `fuse run -d` has seen it start, which it has when it exits.
        // SAFETY: getppid has no preconditions.
        let parent_done = || (unsafe { libc::getppid() } != parent).then_some(());
        poll::wait_until(PARENT_PATIENCE, POLL_INTERVAL, parent_done);
        let _ = fs::remove_dir_all(dir);
    }
    Ok(result?.exit_code)
}

/// How a run ended, and what went wrong (one line) when it failed.
fn ending_of(result: &Result<VmOutcome>) -> (End, Option<String>) {
    let err = match result {
        Ok(outcome) if outcome.stopped_by.is_some() => return (End::Stopped, None),
        Ok(_) => return (End::Exited, None),
        Err(e) => e,
    };
    let line = format!("{err:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    match err.chain().find_map(|e| e.downcast_ref::<RunError>()) {
        Some(RunError::StopTimeout { .. } | RunError::Interrupted { .. }) => (End::Killed, None),
        Some(RunError::Timeout { .. }) => (End::TimedOut, Some(line)),
        _ => (End::Failed, Some(line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(supervisor: ProcessId) -> InstanceState {
        InstanceState {
            id: "0123456789ab".into(),
            image: "web:1.0".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            ports: vec!["8080:80/tcp".into()],
            volumes: vec!["db:/data".into()],
            supervisor,
            qemu: None,
            started_at: 1_700_000_000,
            status: Status::Starting,
            url: None,
            ready_ms: None,
            grace_secs: 10.0,
            end: None,
            exit_code: None,
            ended_at: None,
            error: None,
            auto_remove: false,
        }
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let me = ProcessId::current().unwrap();
        let mut state = sample(me);
        state.qemu = Some(me);
        state.status = Status::Ready;
        state.url = Some("http://localhost:8080".into());
        write_state(dir.path(), &state).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), state);
        let text = fs::read_to_string(dir.path().join(STATE_FILE)).unwrap();
        assert!(text.contains("\"status\": \"ready\""), "{text}");
    }

    #[test]
    fn stale_and_live_entries_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let me = ProcessId::current().unwrap();
        // No state yet: being created, then stale once old.
        assert_eq!(
            liveness(dir.path(), None, Duration::ZERO),
            Liveness::Transient
        );
        assert_eq!(
            liveness(dir.path(), None, Duration::from_secs(3600)),
            Liveness::Stale
        );
        let starting = sample(me);
        assert_eq!(
            liveness(dir.path(), Some(&starting), Duration::ZERO),
            Liveness::Alive
        );
        // A dead supervisor (SIGKILLed fuse): lost, unless it recorded the end.
        let dead = dead_process();
        assert_eq!(
            liveness(dir.path(), Some(&sample(dead)), Duration::ZERO),
            Liveness::Lost
        );
        let mut ended = sample(dead);
        ended.status = Status::Exited;
        assert_eq!(
            liveness(dir.path(), Some(&ended), Duration::ZERO),
            Liveness::Ended
        );
        // A recorded QEMU that is some other process (this test binary): not alive.
        let mut running = sample(me);
        running.status = Status::Running;
        running.qemu = Some(me);
        assert_eq!(
            liveness(dir.path(), Some(&running), Duration::ZERO),
            Liveness::Transient
        );
    }

    fn dead_process() -> ProcessId {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        let dead = ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 1 });
        child.wait().unwrap();
        dead
    }

    /// A lost instance is recorded as ended with an unknown code, and its directory keeps its
    /// logs and state only: the QMP socket and any file of injected values go.
    #[test]
    fn a_lost_instance_is_recorded_and_tidied() {
        let dir = tempfile::tempdir().unwrap();
        let mut running = sample(dead_process());
        running.status = Status::Running;
        write_state(dir.path(), &running).unwrap();
        for name in [CONSOLE_LOG, SUPERVISOR_LOG, QMP_SOCKET, "run-overlay"] {
            fs::write(dir.path().join(name), "x").unwrap();
        }
        fs::create_dir(dir.path().join("scratch")).unwrap();
        let lost = record_lost(dir.path()).unwrap();
        assert_eq!(lost.status, Status::Exited);
        assert_eq!(lost.end, Some(End::Lost));
        assert_eq!(lost.exit_code, None);
        assert!(lost.ended_at.is_some());
        assert!(lost.error.as_deref().unwrap().contains("was killed"));
        assert_eq!(read_state(dir.path()).unwrap(), lost);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [CONSOLE_LOG, STATE_FILE, SUPERVISOR_LOG]);
        // Recorded once: a second look keeps the first record.
        let again = record_lost(dir.path()).unwrap();
        assert_eq!(again, lost);
    }

    #[test]
    fn ends_are_told_apart() {
        let outcome = |stopped_by| VmOutcome {
            exit_code: 3,
            first_output: None,
            total: Duration::ZERO,
            accel: fuse_boot::vm::Accel::Tcg,
            stopped_by,
        };
        assert_eq!(ending_of(&Ok(outcome(None))), (End::Exited, None));
        assert_eq!(
            ending_of(&Ok(outcome(Some(libc::SIGTERM)))),
            (End::Stopped, None)
        );
        let killed: Result<VmOutcome> = Err(anyhow::Error::new(RunError::StopTimeout {
            signal: libc::SIGTERM,
            grace: Duration::from_secs(1),
        })
        .context("Image x:1 did not run to completion"));
        assert_eq!(ending_of(&killed), (End::Killed, None));
        let corrupt: Result<VmOutcome> = Err(anyhow::Error::new(RunError::Integrity {
            block: Some(7),
            volume: None,
        }));
        let (end, error) = ending_of(&corrupt);
        assert_eq!(end, End::Failed);
        assert!(error.unwrap().contains("block 7"));
    }

    #[test]
    fn ended_instances_are_described() {
        let mut state = sample(dead_process());
        state.status = Status::Exited;
        state.end = Some(End::Exited);
        state.exit_code = Some(3);
        state.ended_at = Some(now_secs().saturating_sub(5));
        assert_eq!(describe_end(&state), "exited with code 3 5 seconds ago");
        state.end = Some(End::Lost);
        state.exit_code = None;
        assert_eq!(
            describe_end(&state),
            "ended with an unknown code 5 seconds ago"
        );
        assert_eq!(human_ago(0), "Less than a second ago");
        assert_eq!(human_ago(1), "1 second ago");
        assert_eq!(human_ago(125), "2 minutes ago");
        assert_eq!(human_ago(7300), "2 hours ago");
        assert_eq!(human_ago(90000), "1 day ago");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(7300), "2h1m");
        assert_eq!(human_duration(90000), "1d1h");
    }
}
