//! One VM run, from spawn to exit: [`run`] / [`run_with`] / [`run_controlled`] check the
//! inputs, choose the accelerator, spawn QEMU, pump its console to the caller (the app's output,
//! live) and say how it ended ([`VmOutcome`], or a [`RunError`] with [`Diagnostics`]).
//!
//! # Stopping
//!
//! SIGINT/SIGTERM/SIGHUP while a VM runs stop it gracefully: the runner presses the ACPI power
//! button through QMP (see [`crate::qmp`]), the guest kernel sends SIGTERM to the init, which
//! forwards it to the app and powers off when the app has exited (aarch64 `virt` without ACPI,
//! the default: `system_powerdown` raises a GPIO line the kernel's gpio-keys driver reports as
//! KEY_POWER, and the init reads that from /dev/input as SIGTERM; the cloud machine's
//! `virt,acpi=on` signals it through the GED as an ACPI power button, as on x86_64). If the app exits within
//! [`VmConfig::stop_grace`], [`run`] returns its exit code as usual; otherwise the VM is
//! killed and [`run`] returns [`RunError::StopTimeout`]. A second stop signal kills the VM at
//! once ([`RunError::Interrupted`]), as does the first when the grace period is zero. Another
//! thread stops it with a [`StopRequest`].
//!
//! # What the runner trusts
//!
//! The console is the app's, so nothing on it decides how a run ended. The app's exit status
//! comes from a virtio-serial port the init (PID 1) alone holds open (`fuse.status`, a file in
//! the run's private directory, see `boot/init/status.c`); a guest kernel panic from QEMU's
//! pvpanic device, which makes QEMU exit with [`QEMU_PANIC_STATUS`]. The console's
//! `Kernel panic - not syncing: REASON` line only names the reason ([`panic_error`]).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::accel::{self, AccelError, AccelSelection};
use super::config::{Accel, Firmware, VmConfig};
use super::machine::{self, NetBackend, QemuMissing};
use super::passt::{self, Passt, PasstError};
use super::process::ProcessGuard;
use super::pvh;
use crate::console::{ConsoleEvent, ConsoleParser, EDK2_LAST_LINE};
use crate::error::with_causes;
use crate::qmp;
use crate::signals::{self, SignalWatch};
use fuse_rootfs::Arch;

/// Console lines kept for error reports.
const TAIL_LINES: usize = 20;
/// QEMU stderr kept for error reports.
const MAX_STDERR: usize = 16 * 1024;
/// The console pipe's size (Linux's unprivileged maximum is 1 MiB by default).
const CONSOLE_PIPE_SIZE: libc::c_int = 1024 * 1024;
/// How long an unterminated line may wait before it is passed on anyway.
const PARTIAL_FLUSH: Duration = Duration::from_millis(50);
/// How long QEMU may take to exit after the init reported the exit code (power-off).
const POWEROFF_GRACE: Duration = Duration::from_secs(5);
/// How often the run loop looks at the status file while the VM runs.
const STATUS_POLL: Duration = Duration::from_millis(100);
/// QEMU's exit status when the guest kernel panicked (`-action panic=exit-failure`, see
/// `vm::machine`): a panic is known from the pvpanic device, never from console text.
pub(crate) const QEMU_PANIC_STATUS: i32 = 1;
/// The file behind the status port, in the run's private directory.
const STATUS_FILE: &str = "status";
/// How long QEMU may take to exit after closing the console.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for QEMU's QMP socket when asking for a graceful stop.
const QMP_PATIENCE: Duration = Duration::from_secs(1);
/// How often the power button is pressed again while the guest shows no sign of life.
const REPRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How a VM run ended, when the init reported the app's exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutcome {
    /// The app's exit code, or the init's own: [`crate::spec::EXIT_INIT_FAILURE`] (125),
    /// [`crate::spec::EXIT_NOT_EXECUTABLE`] (126), [`crate::spec::EXIT_NOT_FOUND`] (127).
    pub exit_code: u8,
    /// From QEMU's start to the first console output. With `verbose`, kernel messages count.
    pub first_output: Option<Duration>,
    /// From QEMU's start to its exit.
    pub total: Duration,
    pub accel: Accel,
    /// The stop signal that asked the app to stop, when it then exited within the grace
    /// period (a detached instance records that it was stopped, not that it ended by itself).
    pub stopped_by: Option<i32>,
}

/// What went wrong, with what is needed to understand it: console tail, QEMU's stderr and
/// command line. Printed as a multi-line block under the error's first line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics {
    /// The last console lines, kernel messages included.
    pub console: Vec<String>,
    /// What QEMU wrote to its stderr.
    pub qemu_stderr: String,
    /// The full QEMU command line, shell-quoted.
    pub command: String,
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.console.is_empty() {
            write!(f, "\n  console: (no output)")?;
        } else {
            write!(f, "\n  last console lines:")?;
            for line in &self.console {
                write!(f, "\n    | {line}")?;
            }
        }
        let stderr = self.qemu_stderr.trim_end();
        if !stderr.is_empty() {
            write!(f, "\n  QEMU said:")?;
            for line in stderr.lines() {
                write!(f, "\n    | {line}")?;
            }
        }
        write!(f, "\n  QEMU command: {}", self.command)
    }
}

/// Which of the image's verified filesystems a dm-verity error was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptVolume {
    Root,
    App,
}

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    QemuMissing(#[from] QemuMissing),
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error(transparent)]
    Network(#[from] PasstError),
    #[error(transparent)]
    GuestForward(#[from] super::config::InvalidGuestForward),
    #[error("Cannot start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read {path}")]
    MissingInput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error while the VM ran")]
    Io(#[source] io::Error),
    #[error("QEMU failed to start the VM ({status}){diagnostics}")]
    QemuFailed {
        status: String,
        diagnostics: Box<Diagnostics>,
    },
    #[error("The VM failed before the app reported an exit code: {reason}{diagnostics}")]
    BootFailed {
        reason: String,
        diagnostics: Box<Diagnostics>,
    },
    #[error(
        "The image's {} is corrupt: {} failed dm-verity verification, so the kernel stopped \
         the VM before the app could read it; `fuse verify IMAGE` locates the damage (then \
         rebuild the image)",
        match .volume {
            Some(CorruptVolume::Root) => "root filesystem",
            Some(CorruptVolume::App) => "app filesystem (/app)",
            None => "root or app filesystem",
        },
        match .block { Some(b) => format!("block {b}"), None => "a block".to_string() }
    )]
    Integrity {
        /// The data block the kernel refused, and in which filesystem, when its message
        /// reached the console (`--verbose`: it is not an emergency-level message).
        block: Option<u64>,
        volume: Option<CorruptVolume>,
    },
    #[error("The guest kernel panicked: {reason}{diagnostics}")]
    KernelPanic {
        /// What the kernel's panic line says, or that it said nothing.
        reason: String,
        diagnostics: Box<Diagnostics>,
    },
    #[error("The VM did not finish within {}s and was stopped{diagnostics}", .timeout.as_secs_f64())]
    Timeout {
        timeout: Duration,
        diagnostics: Box<Diagnostics>,
    },
    #[error("Interrupted by {}; the VM was stopped", signals::signal_name(*.signal))]
    Interrupted { signal: i32 },
    #[error(
        "Stopped by {}: the app did not exit within {}s of SIGTERM, so the VM was killed \
         (give it longer with --grace SECONDS)",
        signals::signal_name(*.signal),
        .grace.as_secs_f64()
    )]
    StopTimeout { signal: i32, grace: Duration },
    #[error("{reason}; the VM was stopped")]
    Aborted { reason: String },
    #[error("Cannot write the app's output; the VM was stopped")]
    Output(#[source] io::Error),
}

impl RunError {
    /// Whether a stop signal ended the run (the CLI then exits with 128 + signal, or 137).
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            RunError::Interrupted { .. } | RunError::StopTimeout { .. }
        )
    }
}

/// What dm-verity panics with when a root block fails verification (`panic_on_corruption`).
const VERITY_PANIC: &str = "dm-verity device corrupted";

/// The one place a guest kernel panic (known from QEMU, see [`QEMU_PANIC_STATUS`]) becomes an
/// error. `reason` is the text after `Kernel panic - not syncing: ` on the console, if the
/// kernel printed it: it only says why, QEMU already said that it happened. dm-verity's reason
/// is the image's corruption ([`RunError::Integrity`], with the block when the kernel's error
/// line reached the console).
fn panic_error(reason: Option<&str>, diagnostics: Diagnostics) -> RunError {
    if reason.is_some_and(|r| r.contains(VERITY_PANIC)) {
        // "device-mapper: verity: 254:4: data block 42 is corrupted" names the data
        // partition's device: on fuse's machines (one disk, vda or nvme0n1) its minor is the
        // partition's number, 2 the root's and 4 the app's (see `disk`).
        let found = diagnostics.console.iter().find_map(|line| {
            let rest = line.split("device-mapper: verity: ").nth(1)?;
            let (device, rest) = rest.split_once(": data block ")?;
            let block = rest.strip_suffix(" is corrupted")?.parse().ok()?;
            let volume = match device.split_once(':')?.1 {
                "2" => Some(CorruptVolume::Root),
                "4" => Some(CorruptVolume::App),
                _ => None,
            };
            Some((block, volume))
        });
        return RunError::Integrity {
            block: found.map(|f| f.0),
            volume: found.and_then(|f| f.1),
        };
    }
    RunError::KernelPanic {
        reason: reason
            .unwrap_or("no reason on the console (run with --verbose for kernel messages)")
            .to_string(),
        diagnostics: Box::new(diagnostics),
    }
}

/// Boots the VM, writes the app's output to `out` as it comes, and returns the app's exit
/// code. The accelerator notice (KVM unusable) goes to stderr as `fuse: <notice>`; use
/// [`run_with`] to route it elsewhere.
pub fn run(config: &VmConfig, out: &mut dyn Write) -> Result<VmOutcome, RunError> {
    run_with(config, out, &mut |notice| eprintln!("fuse: {notice}"))
}

/// [`run`], with the accelerator notice (one line, no `fuse: ` prefix) passed to `notice`.
pub fn run_with(
    config: &VmConfig,
    out: &mut dyn Write,
    notice: &mut dyn FnMut(&str),
) -> Result<VmOutcome, RunError> {
    run_controlled(config, out, notice, RunControl::default())
}

/// What a caller learns when QEMU has been spawned (before the guest boots).
#[derive(Debug, Clone)]
pub struct Spawned {
    /// QEMU's pid (also its process group id).
    pub pid: u32,
    /// When QEMU was spawned: the origin of every time the runner reports.
    pub started: Instant,
    /// Where QEMU listens for QMP.
    pub qmp_socket: PathBuf,
    /// The VM's network, if it has one.
    pub network: Option<GuestNetwork>,
}

/// How the guest's network reaches the host (see `vm::passt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestNetwork {
    /// passt; `log` is its log (see [`crate::vm::guest_network_up`]).
    Passt { log: PathBuf },
    /// QEMU's slirp with `restrict=on` (a host without a default route): published ports
    /// only, QEMU itself accepts every host connection (`info usernet` tells the guest's).
    SlirpRestricted,
}

/// Lets other threads stop a running VM (a failed health check, for one). The run loop looks
/// at it at least every 250 ms.
#[derive(Debug, Default)]
pub struct StopRequest {
    requested: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl StopRequest {
    pub fn new() -> Arc<StopRequest> {
        Arc::new(StopRequest::default())
    }

    /// Asks the run loop to kill the VM; [`run_controlled`] then returns
    /// [`RunError::Aborted`] with `reason` (the first reason given wins).
    pub fn abort(&self, reason: impl Into<String>) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert_with(|| reason.into());
        self.requested.store(true, Ordering::SeqCst);
    }

    fn taken(&self) -> Option<String> {
        if !self.requested.load(Ordering::SeqCst) {
            return None;
        }
        let slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        Some(slot.clone().unwrap_or_else(|| "Stopped".into()))
    }
}

/// Hooks into a run: see [`run_controlled`].
#[derive(Default)]
pub struct RunControl<'a> {
    /// Polled by the run loop: lets another thread stop the VM.
    pub stop: Option<Arc<StopRequest>>,
    /// Called once, right after QEMU is spawned.
    pub on_spawn: Option<&'a mut dyn FnMut(&Spawned)>,
}

impl fmt::Debug for RunControl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunControl")
            .field("stop", &self.stop)
            .field("on_spawn", &self.on_spawn.is_some())
            .finish()
    }
}

/// [`run_with`], with hooks: a callback when QEMU is spawned (health checks, instance state)
/// and a [`StopRequest`] other threads can use to stop the VM.
pub fn run_controlled(
    config: &VmConfig,
    out: &mut dyn Write,
    notice: &mut dyn FnMut(&str),
    control: RunControl<'_>,
) -> Result<VmOutcome, RunError> {
    let qemu = machine::find_qemu(config.arch)?;
    let boot_files = match &config.firmware {
        Firmware::Direct => vec![&config.kernel, &config.initrd],
        Firmware::Uefi { code, vars } => vec![code, vars],
    };
    for path in boot_files
        .into_iter()
        .chain([&config.root_disk])
        .chain(config.fw_cfg.iter().map(|(_, p)| p))
        .chain(config.data_disks.iter())
        .chain(config.config_disk.iter())
    {
        std::fs::metadata(path).map_err(|source| RunError::MissingInput {
            path: path.clone(),
            source,
        })?;
    }
    let AccelSelection {
        accel,
        notice: accel_notice,
    } = accel::select_accel(config.accel, config.arch, &qemu)?;
    if let Some(text) = accel_notice {
        notice(&text);
    }
    // Every VM gets a private directory (0700) for the file behind its status port, and a
    // QMP socket: it is how a stop signal becomes a graceful stop.
    let private_dir = tempfile::Builder::new()
        .prefix("fuse-vm-")
        .tempdir()
        .map_err(RunError::Io)?;
    let mut config = config.clone();
    // x86_64 direct boot starts the uncompressed kernel at its PVH entry (see `vm::pvh`).
    if config.arch == Arch::X86_64 && config.firmware == Firmware::Direct {
        let bzimage = std::fs::read(&config.kernel).map_err(|source| RunError::MissingInput {
            path: config.kernel.clone(),
            source,
        })?;
        if let Some(elf) = pvh::vmlinux(&bzimage) {
            let path = private_dir.path().join("vmlinux");
            std::fs::write(&path, elf).map_err(RunError::Io)?;
            config.kernel = path;
        }
    }
    let status_file = private_dir.path().join(STATUS_FILE);
    let qmp_socket = config
        .qmp_socket
        .get_or_insert_with(|| private_dir.path().join("qmp.sock"))
        .clone();
    let config = &config;
    // passt only for a VM given fuse's run overlay: without one a fuse init looks for its
    // configuration on the cloud, a metadata service included, which must not be found
    // through the host's network (on a cloud host, the host's own IMDS). Otherwise, and for
    // guest forwards (passt has none) or a host without a default route (passt refuses to
    // start there), QEMU's restricted slirp.
    super::config::guest_forward_network(&config.guest_forwards)?;
    let has_overlay = config
        .fw_cfg
        .iter()
        .any(|(name, _)| name == crate::spec::RUN_OVERLAY_FW_CFG_NAME);
    let passt = has_overlay && config.guest_forwards.is_empty();
    let net = match passt && passt::host_has_default_route() {
        true => NetBackend::Passt,
        false => NetBackend::SlirpRestricted,
    };
    let args = machine::qemu_args_with(config, accel, Some(&status_file), net);
    let command = machine::shell_command(&qemu, &args);
    if config.verbose {
        notice(&format!("QEMU command: {command}"));
    }

    // passt starts while QEMU does; it is waited for right after QEMU's spawn.
    let mut passt = match config.network && net == NetBackend::Passt {
        true => Some(Passt::spawn(&config.port_forwards)?),
        false => None,
    };
    let mut cmd = Command::new(&qemu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(passt) = &passt {
        passt.attach(&mut cmd);
    }
    // Installed before the spawn, so a signal arriving from now on is seen.
    let watch = SignalWatch::install().map_err(RunError::Io)?;
    let started = Instant::now();
    let mut vm = ProcessGuard::spawn(&mut cmd).map_err(|source| RunError::Spawn {
        binary: qemu.display().to_string(),
        source,
    })?;
    if machine::drops_privileges() {
        vm.watch_over().map_err(RunError::Io)?;
    }
    if let Some(passt) = &mut passt {
        passt.attached();
        // On failure the guard kills QEMU, which never got a network.
        passt.wait_ready()?;
    }
    let RunControl { stop, on_spawn } = control;
    if let Some(on_spawn) = on_spawn {
        on_spawn(&Spawned {
            pid: vm.pid(),
            started,
            qmp_socket: qmp_socket.clone(),
            network: match (&passt, config.network) {
                (Some(passt), _) => Some(GuestNetwork::Passt {
                    log: passt.log_path(),
                }),
                (None, true) => Some(GuestNetwork::SlirpRestricted),
                (None, false) => None,
            },
        });
    }
    let mut session = Session {
        vm,
        watch,
        started,
        config,
        accel,
        command,
        parser: match config.firmware {
            Firmware::Direct => ConsoleParser::new(TAIL_LINES),
            Firmware::Uefi { .. } => {
                ConsoleParser::new(TAIL_LINES).skip_firmware_output(EDK2_LAST_LINE)
            }
        },
        stderr: Vec::new(),
        first_output: None,
        qmp_socket,
        status_file,
        reported: None,
        status_checked: None,
        stop_request: stop,
        stopping: None,
        notice,
    };
    let result = session.run(out);
    // The socket's directory goes only after QEMU is reaped (the session's guard).
    drop(session);
    drop(passt);
    drop(private_dir);
    result
}

/// One running VM and what the run loop tracks about it.
struct Session<'a> {
    vm: ProcessGuard,
    watch: SignalWatch,
    started: Instant,
    config: &'a VmConfig,
    accel: Accel,
    command: String,
    parser: ConsoleParser,
    stderr: Vec<u8>,
    first_output: Option<Duration>,
    qmp_socket: PathBuf,
    /// The file behind the status port, and the exit code once the init wrote it there.
    status_file: PathBuf,
    reported: Option<u8>,
    status_checked: Option<Instant>,
    stop_request: Option<Arc<StopRequest>>,
    /// A graceful stop in progress: the signal that asked for it, and when the VM is killed.
    stopping: Option<(i32, Instant)>,
    notice: &'a mut dyn FnMut(&str),
}

/// Why the run loop ended.
enum Ending {
    /// QEMU exited by itself.
    Exited(ExitStatus),
    /// The timeout passed.
    TimedOut,
    /// A stop signal arrived.
    Signal(i32),
    /// The init reported the exit code but QEMU did not power off in time.
    NoPowerOff,
    /// A graceful stop asked by this signal did not finish within the grace period.
    StopTimedOut(i32),
    /// Another thread asked to stop the VM ([`StopRequest`]).
    Aborted(String),
}

impl Session<'_> {
    fn run(&mut self, out: &mut dyn Write) -> Result<VmOutcome, RunError> {
        let ending = self.pump(out)?;
        let total = self.started.elapsed();
        match ending {
            Ending::Signal(signal) => return Err(RunError::Interrupted { signal }),
            Ending::StopTimedOut(signal) => {
                return Err(RunError::StopTimeout {
                    signal,
                    grace: self.config.stop_grace,
                })
            }
            Ending::Aborted(reason) => return Err(RunError::Aborted { reason }),
            _ => {}
        }
        if let Some(exit_code) = self.read_status() {
            return Ok(VmOutcome {
                exit_code,
                first_output: self.first_output,
                total,
                accel: self.accel,
                stopped_by: self.stopping.map(|(signal, _)| signal),
            });
        }
        let diagnostics = Box::new(self.diagnostics());
        Err(match ending {
            Ending::TimedOut => RunError::Timeout {
                timeout: self.config.timeout.unwrap_or_default(),
                diagnostics,
            },
            Ending::Exited(status) if !status.success() && diagnostics.console.is_empty() => {
                RunError::QemuFailed {
                    status: describe(status),
                    diagnostics,
                }
            }
            Ending::Exited(status) if status.code() == Some(QEMU_PANIC_STATUS) => {
                panic_error(self.parser.panic_reason(), *diagnostics)
            }
            // Asked to stop, and the VM went without the app reporting: the init itself
            // ended (or QEMU quit) on the power button.
            Ending::Exited(_) if self.stopping.is_some() => RunError::Interrupted {
                signal: self.stopping.map(|(s, _)| s).unwrap_or(libc::SIGTERM),
            },
            Ending::Exited(status) => RunError::BootFailed {
                reason: format!(
                    "QEMU {} without an exit status from the init (images built by an older \
                     fuse report it only on the console, which fuse no longer trusts: rebuild \
                     the image)",
                    describe(status)
                ),
                diagnostics,
            },
            Ending::Signal(_)
            | Ending::NoPowerOff
            | Ending::StopTimedOut(_)
            | Ending::Aborted(_) => {
                unreachable!("handled above")
            }
        })
    }

    /// Moves console output to `out` until the VM is gone; the VM is reaped when it returns.
    fn pump(&mut self, out: &mut dyn Write) -> Result<Ending, RunError> {
        let mut console = self.vm.child_mut().stdout.take();
        if let Some(c) = &console {
            // A deeper pipe: QEMU holds the guest's console port back while the pipe is full
            // (one main-loop turn to resume), so a log-heavy app stalls less. Best effort.
            // SAFETY: F_SETPIPE_SZ on a pipe descriptor we own; no memory is involved.
            unsafe { libc::fcntl(c.as_raw_fd(), libc::F_SETPIPE_SZ, CONSOLE_PIPE_SIZE) };
        }
        let mut stderr = self.vm.child_mut().stderr.take();
        let mut exit_at: Option<Instant> = None;
        let mut closed_at: Option<Instant> = None;
        let deadline = self.config.timeout.map(|t| self.started + t);
        let mut buf = vec![0u8; 64 * 1024];
        let mut signals_seen = 0;
        let mut last_press = Instant::now();
        loop {
            let received = self.watch.count();
            if received != signals_seen {
                signals_seen = received;
                let signal = self.watch.received().unwrap_or(libc::SIGTERM);
                if let Some(ending) = self.on_stop_signal(signal) {
                    return Ok(ending);
                }
                last_press = Instant::now();
            }
            if let Some(reason) = self.stop_request.as_ref().and_then(|r| r.taken()) {
                self.stop();
                return Ok(Ending::Aborted(reason));
            }
            if let Some(status) = self.vm.try_wait().map_err(RunError::Io)? {
                // Drain what QEMU wrote before exiting.
                if let Some(c) = console.as_mut() {
                    let mut rest = Vec::new();
                    let _ = c.read_to_end(&mut rest);
                    self.console(&rest, out)?;
                }
                if let Some(e) = stderr.as_mut() {
                    let mut rest = Vec::new();
                    let _ = e.read_to_end(&mut rest);
                    self.stderr.extend_from_slice(&rest);
                }
                self.flush_console(out)?;
                return Ok(Ending::Exited(status));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.stop();
                return Ok(Ending::TimedOut);
            }
            if let Some((signal, kill_at)) = self.stopping {
                // Once the app has reported, the power-off grace below applies instead.
                if now >= kill_at && self.poll_status(now).is_none() {
                    self.stop();
                    return Ok(Ending::StopTimedOut(signal));
                }
                // A power button pressed while the guest still boots goes unheard (no ACPI
                // driver yet, or an init that does not take signals yet): while nothing has
                // shown that the app runs, press it again every second.
                if self.first_output.is_none() && now >= last_press + REPRESS_INTERVAL {
                    last_press = now;
                    let _ = qmp::powerdown(&self.qmp_socket, Duration::ZERO);
                }
            }
            if exit_at.is_some_and(|t| now >= t + POWEROFF_GRACE) {
                // The app is done and its code known: a VM that does not power off is not
                // the app's failure.
                self.stop();
                return Ok(Ending::NoPowerOff);
            }
            if closed_at.is_some_and(|t| now >= t + EXIT_GRACE) {
                self.stop();
                let status = self.vm.status().unwrap_or_else(|| ExitStatus::from_raw(9));
                return Ok(Ending::Exited(status));
            }

            // Sleep until output, a signal, or the next thing to check.
            let mut wait = Duration::from_millis(250);
            if self.parser.has_partial() {
                wait = wait.min(PARTIAL_FLUSH);
            }
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(now));
            }
            if let Some((_, kill_at)) = self.stopping {
                wait = wait.min(kill_at.saturating_duration_since(now));
                wait = wait.min(REPRESS_INTERVAL);
            }
            if console.is_none() && stderr.is_none() {
                wait = wait.min(Duration::from_millis(10));
            }
            let mut fds = vec![libc::pollfd {
                fd: self.watch.fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            for pipe in [
                console.as_ref().map(|c| c.as_raw_fd()),
                stderr.as_ref().map(|e| e.as_raw_fd()),
            ] {
                fds.push(libc::pollfd {
                    fd: pipe.unwrap_or(-1), // poll ignores negative descriptors
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let timeout_ms = wait.as_millis().clamp(1, 1000) as libc::c_int;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
            let ready =
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.stop();
                return Err(RunError::Io(err));
            }
            if fds[0].revents != 0 {
                self.watch.drain();
            }
            let readable = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
            if fds[1].revents & readable != 0 {
                if let Some(c) = console.as_mut() {
                    let n = read_retrying(c, &mut buf).map_err(RunError::Io)?;
                    if n == 0 {
                        console = None;
                        closed_at.get_or_insert(Instant::now());
                    } else {
                        let data = buf[..n].to_vec();
                        self.console(&data, out)?;
                    }
                }
            } else if self.parser.has_partial() {
                self.flush_console(out)?;
            }
            if fds[2].revents & readable != 0 {
                if let Some(e) = stderr.as_mut() {
                    let n = read_retrying(e, &mut buf).map_err(RunError::Io)?;
                    if n == 0 {
                        stderr = None;
                    } else if self.stderr.len() < MAX_STDERR {
                        self.stderr.extend_from_slice(&buf[..n]);
                    }
                }
            }
            if self.poll_status(Instant::now()).is_some() {
                exit_at.get_or_insert(Instant::now());
            }
        }
    }

    /// The exit code the init wrote to the status port, read now.
    fn read_status(&mut self) -> Option<u8> {
        if self.reported.is_none() {
            self.reported = std::fs::read(&self.status_file)
                .ok()
                .and_then(|bytes| parse_status(&bytes));
        }
        self.reported
    }

    /// [`Session::read_status`], at most every [`STATUS_POLL`].
    fn poll_status(&mut self, now: Instant) -> Option<u8> {
        if self.reported.is_none() && self.status_checked.is_none_or(|t| now >= t + STATUS_POLL) {
            self.status_checked = Some(now);
            self.read_status();
        }
        self.reported
    }

    /// Feeds console bytes to the parser and passes app output on.
    fn console(&mut self, data: &[u8], out: &mut dyn Write) -> Result<(), RunError> {
        let events = self.parser.feed(data);
        self.emit(events, out)
    }

    fn flush_console(&mut self, out: &mut dyn Write) -> Result<(), RunError> {
        let events = self.parser.flush_partial();
        self.emit(events, out)
    }

    fn emit(&mut self, events: Vec<ConsoleEvent>, out: &mut dyn Write) -> Result<(), RunError> {
        let mut wrote = false;
        for ConsoleEvent::Output(bytes) in events {
            self.first_output
                .get_or_insert_with(|| self.started.elapsed());
            if let Err(e) = out.write_all(&bytes) {
                self.stop();
                return Err(RunError::Output(e));
            }
            wrote = true;
        }
        if wrote {
            if let Err(e) = out.flush() {
                self.stop();
                return Err(RunError::Output(e));
            }
        }
        Ok(())
    }

    /// A stop signal arrived. The first one starts a graceful stop (ACPI power button: the
    /// app gets SIGTERM) and returns `None`: the loop goes on passing output until the VM
    /// powers off or the grace period ends. A second one, a zero grace period or a VM that
    /// cannot be asked (no QMP) stop it now.
    fn on_stop_signal(&mut self, signal: i32) -> Option<Ending> {
        if self.poll_status(Instant::now()).is_some() {
            // The app is done; the VM is powering off anyway.
            return None;
        }
        if self.stopping.is_some() || self.config.stop_grace.is_zero() {
            self.stop();
            return Some(Ending::Signal(signal));
        }
        let grace = self.config.stop_grace;
        match qmp::powerdown(&self.qmp_socket, QMP_PATIENCE) {
            Ok(()) => {
                (self.notice)(&format!(
                    "Interrupted by {}: stopping the app (SIGTERM, up to {}s; again to force)",
                    signals::signal_name(signal),
                    grace.as_secs_f64()
                ));
                self.stopping = Some((signal, Instant::now() + grace));
                None
            }
            Err(e) => {
                (self.notice)(&format!(
                    "Cannot stop the VM gracefully ({}): killing it",
                    with_causes(&e)
                ));
                self.stop();
                Some(Ending::Signal(signal))
            }
        }
    }

    /// Stops the VM now: SIGKILL to QEMU's process group, then reaps it. The graceful path
    /// ([`Session::on_stop_signal`]) ends here too when the grace period runs out.
    fn stop(&mut self) {
        self.vm.kill();
    }

    fn diagnostics(&self) -> Diagnostics {
        Diagnostics {
            console: self.parser.tail(),
            qemu_stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
            command: self.command.clone(),
        }
    }
}

/// `exit N\n`, as `boot/init/status.c` writes it; anything else is no status.
fn parse_status(bytes: &[u8]) -> Option<u8> {
    let text = std::str::from_utf8(bytes).ok()?;
    let code = text.strip_prefix("exit ")?.strip_suffix('\n')?;
    if code.is_empty() || code.len() > 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

fn read_retrying(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "exited".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_dm_verity_panic_is_an_integrity_error() {
        let console = |lines: &[&str]| Diagnostics {
            console: lines.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        };
        let line = "Kernel panic - not syncing: dm-verity device corrupted";
        let reason = Some("dm-verity device corrupted");
        let verbose = |minor: u32| {
            console(&[
                &format!(
                    "[    1.2] device-mapper: verity: 254:{minor}: data block 42 is corrupted"
                ),
                line,
            ])
        };
        let e = panic_error(reason, verbose(2));
        assert!(
            matches!(
                e,
                RunError::Integrity {
                    block: Some(42),
                    volume: Some(CorruptVolume::Root)
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("root filesystem is corrupt: block 42 failed dm-verity"),
            "{e}"
        );
        assert!(e.to_string().contains("fuse verify"), "{e}");
        let app = panic_error(reason, verbose(4));
        assert!(
            app.to_string()
                .contains("app filesystem (/app) is corrupt: block 42"),
            "{app}"
        );
        let quiet = panic_error(reason, console(&[line]));
        assert!(matches!(
            quiet,
            RunError::Integrity {
                block: None,
                volume: None
            }
        ));
        assert!(
            quiet
                .to_string()
                .contains("root or app filesystem is corrupt: a block"),
            "{quiet}"
        );
        let other = panic_error(Some("VFS"), console(&[]));
        assert!(matches!(other, RunError::KernelPanic { .. }), "{other:?}");
    }

    #[test]
    fn test_parse_status() {
        assert_eq!(parse_status(b"exit 0\n"), Some(0));
        assert_eq!(parse_status(b"exit 255\n"), Some(255));
        for bad in [
            &b""[..],
            b"exit 3",
            b"exit 256\n",
            b"exit -1\n",
            b"exit +1\n",
            b"3\n",
        ] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn test_panic_error_names_the_reason() {
        let err = panic_error(Some("VFS: Unable to mount root fs"), Diagnostics::default());
        assert!(err
            .to_string()
            .starts_with("The guest kernel panicked: VFS: Unable to mount root fs"));
        let err = panic_error(None, Diagnostics::default());
        assert!(
            err.to_string().contains("no reason on the console"),
            "{err}"
        );
    }
}
