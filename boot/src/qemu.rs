//! Boots an image under QEMU and passes the app's console output on, live.
//!
//! # Machine
//!
//! x86_64 guests run on `-M q35` with virtio-pci devices. Measured under TCG on a 2-core
//! host with the fuse kernel (time from spawn to the app's first output line, 3 runs each):
//! `microvm` 0.90-0.97 s, `q35` 1.10-1.15 s, `pc` 1.42-1.51 s. `microvm` is the fastest but
//! has no HPET or ACPI PM timer: on a loaded host the TSC calibration against the PIT fails
//! under TCG ("tsc: Unable to calibrate against PIT"), the kernel is left without a usable
//! clocksource and hangs early in boot (1 run in 6 idle, every run with `pit=off`). q35
//! falls back to HPET calibration and booted every time (8 of 8 with 4 VMs in parallel).
//! fw_cfg in sysfs, ACPI power-off, virtio-rng and user networking with host forwards work
//! on all three. `virtio-net-pci` gets `romfile=` so no iPXE option ROM is loaded.
//!
//! aarch64 guests run on `-M virt,acpi=off` (`-cpu max` under TCG) with a PL011 console
//! (`ttyAMA0`), the device tree QEMU generates, virtio-pci devices behind the generic ECAM host
//! bridge and PSCI for power-off. Under TCG on the same 2-core host the hello image gets from
//! spawn to QEMU's exit in 0.75-0.8 s (`-cpu max,pauth-impdef=on` measured no faster).
//!
//! # Processes
//!
//! QEMU runs in its own process group (so the terminal's Ctrl-C reaches fuse only), with
//! `PR_SET_PDEATHSIG = SIGKILL` (so it dies with fuse, even when fuse is SIGKILLed), owned by
//! a [`ProcessGuard`] whose `Drop` kills the group and reaps it (panics, early returns).
//! QEMU is named with `-name fuse,process=fuse-vm` so leak checks can find it.
//!
//! # Stopping
//!
//! SIGINT/SIGTERM/SIGHUP while a VM runs stop it gracefully: the runner presses the ACPI power
//! button through QMP (see [`crate::qmp`]), the guest kernel sends SIGTERM to the init, which
//! forwards it to the app and powers off when the app has exited (aarch64 `virt` has no ACPI:
//! `system_powerdown` raises a GPIO line the kernel's gpio-keys driver reports as KEY_POWER,
//! and the init reads that from /dev/input as SIGTERM). If the app exits within
//! [`VmConfig::stop_grace`], [`run`] returns its exit code as usual; otherwise the VM is
//! killed and [`run`] returns [`RunError::StopTimeout`]. A second stop signal kills the VM at
//! once ([`RunError::Interrupted`]), as does the first when the grace period is zero.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuse_rootfs::Arch;

use crate::accel::{self, Accel, AccelChoice, AccelError, AccelSelection};
use crate::console::{ConsoleEvent, ConsoleParser};
use crate::qmp;
use crate::signals::{self, SignalWatch};

/// The x86_64 machine type (see the module documentation for why).
pub const X86_MACHINE: &str = "q35";
/// The aarch64 machine type. `acpi=off`: the fuse kernel describes arm64 hardware by device
/// tree only; without it UEFI firmware (AAVMF) hands the kernel ACPI tables instead of the
/// device tree and it finds no console. It also keeps the power button a GPIO line under
/// firmware too (the init reads it, see the module documentation).
pub const AARCH64_MACHINE: &str = "virt,acpi=off";
/// The `-name` given to every VM: guest name `fuse`, process name `fuse-vm`.
pub const VM_NAME_ARG: &str = "fuse,process=fuse-vm";
/// Console lines kept for error reports.
const TAIL_LINES: usize = 20;
/// QEMU stderr kept for error reports.
const MAX_STDERR: usize = 16 * 1024;
/// How long an unterminated line may wait before it is passed on anyway.
const PARTIAL_FLUSH: Duration = Duration::from_millis(50);
/// How long QEMU may take to exit after the init reported the exit code (power-off).
const POWEROFF_GRACE: Duration = Duration::from_secs(5);
/// How long the kernel may go on printing after "Kernel panic" (the trace) before the VM is
/// stopped; with `panic=-1` it reboots, and so QEMU exits, right away.
const PANIC_GRACE: Duration = Duration::from_secs(2);
/// How long QEMU may take to exit after closing the console.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// The default time an app gets between SIGTERM (graceful stop) and the VM being killed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for QEMU's QMP socket when asking for a graceful stop.
const QMP_PATIENCE: Duration = Duration::from_secs(1);
/// How often the power button is pressed again while the guest shows no sign of life.
const REPRESS_INTERVAL: Duration = Duration::from_secs(1);

/// A forwarded port of the VM's user-mode network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// The port on the host's 127.0.0.1.
    pub host: u16,
    /// The port in the guest.
    pub guest: u16,
    pub proto: Proto,
}

/// The transport of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A port forward that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("Invalid port forward '{0}': expected HOST:GUEST or HOST:GUEST/udp, e.g. 8080:80")]
pub struct InvalidPortForward(pub String);

impl FromStr for PortForward {
    type Err = InvalidPortForward;

    /// `HOST:GUEST[/tcp|/udp]`, or `PORT` for the same port on both sides.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidPortForward(s.to_string());
        let (ports, proto) = match s.split_once('/') {
            Some((ports, "tcp")) => (ports, Proto::Tcp),
            Some((ports, "udp")) => (ports, Proto::Udp),
            Some(_) => return Err(invalid()),
            None => (s, Proto::Tcp),
        };
        let (host, guest) = ports.split_once(':').unwrap_or((ports, ports));
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0);
        Ok(PortForward {
            host: port(host).ok_or_else(invalid)?,
            guest: port(guest).ok_or_else(invalid)?,
            proto,
        })
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.guest, self.proto.as_str())
    }
}

/// How the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Firmware {
    /// QEMU loads `kernel` and `initrd` itself (`-kernel`), with `cmdline`: the fastest path.
    #[default]
    Direct,
    /// UEFI firmware (OVMF, AAVMF) in pflash boots the root disk's ESP, as a cloud does;
    /// `kernel`, `initrd` and `cmdline` are not used. `vars` is written by the firmware: give
    /// each run its own copy.
    Uefi { code: PathBuf, vars: PathBuf },
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub arch: Arch,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line. `console=` and `panic=-1` are added when missing;
    /// `loglevel=7` is appended when `verbose`.
    pub cmdline: String,
    /// The root disk, attached read-only as the first virtio-blk disk (`/dev/vda`): the
    /// image's GPT disk (the init finds the root partition by `fuse.root=PARTUUID=`), or a
    /// bare squashfs with `fuse.root=/dev/vda`.
    pub root_disk: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: AccelChoice,
    /// fw_cfg entries (`opt/...` name, file), readable in the guest under
    /// `/sys/firmware/qemu_fw_cfg/by_name/<name>/raw`.
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// Whether the guest gets a NIC (QEMU user-mode networking).
    pub network: bool,
    pub port_forwards: Vec<PortForward>,
    /// Stop the VM after this long (from QEMU's start).
    pub timeout: Option<Duration>,
    /// Show kernel messages on the console.
    pub verbose: bool,
    /// Where QEMU listens for QMP (graceful stop); `None`: a socket in a private temporary
    /// directory.
    pub qmp_socket: Option<PathBuf>,
    /// How long the app gets to exit after a stop signal before the VM is killed.
    pub stop_grace: Duration,
    /// Raw disk images attached read-write after the root, as `/dev/vdb`, `/dev/vdc`, ...
    pub data_disks: Vec<PathBuf>,
    pub firmware: Firmware,
}

impl VmConfig {
    /// A configuration with 512 MiB, one vCPU, `auto` acceleration and no network.
    pub fn new(
        arch: Arch,
        kernel: impl Into<PathBuf>,
        initrd: impl Into<PathBuf>,
        root_disk: impl Into<PathBuf>,
        cmdline: impl Into<String>,
    ) -> VmConfig {
        VmConfig {
            arch,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: cmdline.into(),
            root_disk: root_disk.into(),
            memory_mib: 512,
            cpus: 1,
            accel: AccelChoice::Auto,
            fw_cfg: Vec::new(),
            network: false,
            port_forwards: Vec::new(),
            timeout: None,
            verbose: false,
            qmp_socket: None,
            stop_grace: DEFAULT_STOP_GRACE,
            data_disks: Vec::new(),
            firmware: Firmware::Direct,
        }
    }
}

/// How a VM run ended, when the init reported the app's exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOutcome {
    /// The app's exit code (125: init failure, 126/127: app not executable / not found).
    pub exit_code: u8,
    /// From QEMU's start to the first console output. With `verbose`, kernel messages count.
    pub first_output: Option<Duration>,
    /// From QEMU's start to its exit.
    pub total: Duration,
    pub accel: Accel,
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

/// Errors running a VM.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{binary} not found: install QEMU (Debian/Ubuntu: apt-get install {package})")]
    QemuMissing {
        binary: String,
        package: &'static str,
    },
    #[error(transparent)]
    Accel(#[from] AccelError),
    #[error("Cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read {path}: {source}")]
    MissingInput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error while the VM ran: {0}")]
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
    #[error("Cannot write the app's output: {0}; the VM was stopped")]
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

/// The QEMU binary for `arch`: `$FUSE_QEMU` if set, else `qemu-system-<arch>` on `PATH`.
pub fn find_qemu(arch: Arch) -> Result<PathBuf, RunError> {
    if let Some(path) = std::env::var_os("FUSE_QEMU").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let name = qemu_binary_name(arch);
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(&name))
        .find(|candidate| is_executable(candidate))
        .ok_or(RunError::QemuMissing {
            binary: name,
            package: qemu_package(arch),
        })
}

fn qemu_binary_name(arch: Arch) -> String {
    format!("qemu-system-{}", arch.qemu_suffix())
}

/// The Debian package that ships the QEMU emulator for `arch`.
pub fn qemu_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The kernel's name of the serial console the runner reads.
pub fn console_device(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// The kernel command line actually passed: the configured one plus what the runner needs.
pub fn effective_cmdline(config: &VmConfig, accel: Accel) -> String {
    let mut cmdline = config.cmdline.trim().to_string();
    let has = |cmdline: &str, key: &str| cmdline.split_whitespace().any(|w| w.starts_with(key));
    let mut push = |s: &str| {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(s);
    };
    if !has(&config.cmdline, "console=") {
        push(&format!("console={}", console_device(config.arch)));
    }
    // Reboot at once on panic: with -no-reboot QEMU then exits instead of hanging.
    if !has(&config.cmdline, "panic=") {
        push("panic=-1");
    }
    // Under TCG the local APIC timer never passes the kernel's calibration check: calibrating
    // and verifying it costs ~190 ms of every boot before the kernel gives up on it anyway.
    // Measured: 1.61 s -> 1.42 s to first app output (median of 5, hello, q35). KVM keeps it.
    if accel == Accel::Tcg && config.arch == Arch::X86_64 && !has(&config.cmdline, "noapictimer") {
        push("noapictimer");
    }
    if config.verbose {
        push("loglevel=7");
    }
    cmdline
}

/// QEMU's arguments (without the program) for `config` run with `accel`.
pub fn qemu_args(config: &VmConfig, accel: Accel) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    fn arg(args: &mut Vec<OsString>, a: impl Into<OsString>) {
        args.push(a.into());
    }
    let (machine, bus, cpu) = match (config.arch, accel) {
        (Arch::X86_64, Accel::Kvm) => (X86_MACHINE, "pci", "host"),
        (Arch::X86_64, Accel::Tcg) => (X86_MACHINE, "pci", "max"),
        (Arch::Aarch64, Accel::Kvm) => (AARCH64_MACHINE, "pci", "host"),
        (Arch::Aarch64, Accel::Tcg) => (AARCH64_MACHINE, "pci", "max"),
    };
    for a in [
        "-name",
        VM_NAME_ARG,
        "-M",
        machine,
        "-accel",
        accel.as_str(),
        "-cpu",
        cpu,
    ] {
        arg(&mut args, a);
    }
    arg(&mut args, "-m");
    arg(&mut args, format!("{}M", config.memory_mib));
    arg(&mut args, "-smp");
    arg(&mut args, config.cpus.max(1).to_string());
    for a in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        // The console goes to QEMU's stdout, a pipe the runner reads; stdin is /dev/null.
        "-chardev",
        "stdio,id=con0,signal=off",
        "-serial",
        "chardev:con0",
    ] {
        arg(&mut args, a);
    }
    let root_boot = match &config.firmware {
        Firmware::Direct => {
            arg(&mut args, "-kernel");
            args.push(config.kernel.clone().into());
            arg(&mut args, "-initrd");
            args.push(config.initrd.clone().into());
            arg(&mut args, "-append");
            arg(&mut args, effective_cmdline(config, accel));
            ""
        }
        Firmware::Uefi { code, vars } => {
            for (unit, file, ro) in [(0, code, ",readonly=on"), (1, vars, "")] {
                let mut drive =
                    OsString::from(format!("if=pflash,format=raw,unit={unit}{ro},file="));
                drive.push(escape_option(file.as_os_str()));
                arg(&mut args, "-drive");
                args.push(drive);
            }
            // The firmware boots the root disk first, without trying the network.
            ",bootindex=0"
        }
    };

    let mut drive = OsString::from("if=none,id=root,format=raw,readonly=on,file=");
    drive.push(escape_option(config.root_disk.as_os_str()));
    arg(&mut args, "-drive");
    args.push(drive);
    arg(&mut args, "-device");
    arg(&mut args, format!("virtio-blk-{bus},drive=root{root_boot}"));
    // Data disks next, so the guest names them vdb, vdc, ... in this order (PCI slot order).
    for (i, disk) in config.data_disks.iter().enumerate() {
        let mut drive = OsString::from(format!("if=none,id=data{i},format=raw,file="));
        drive.push(escape_option(disk.as_os_str()));
        arg(&mut args, "-drive");
        args.push(drive);
        arg(&mut args, "-device");
        arg(&mut args, format!("virtio-blk-{bus},drive=data{i}"));
    }
    arg(&mut args, "-device");
    arg(&mut args, format!("virtio-rng-{bus}"));
    if let Some(socket) = &config.qmp_socket {
        let mut qmp = OsString::from("unix:");
        qmp.push(escape_option(socket.as_os_str()));
        qmp.push(",server=on,wait=off");
        arg(&mut args, "-qmp");
        args.push(qmp);
    }

    if config.network {
        let mut netdev = String::from("user,id=n0");
        for fwd in &config.port_forwards {
            netdev.push_str(&format!(
                ",hostfwd={}:127.0.0.1:{}-:{}",
                fwd.proto.as_str(),
                fwd.host,
                fwd.guest
            ));
        }
        arg(&mut args, "-netdev");
        arg(&mut args, &netdev);
        arg(&mut args, "-device");
        // No option ROM: the kernel is loaded directly, iPXE would only cost boot time.
        arg(&mut args, format!("virtio-net-{bus},netdev=n0,romfile="));
    }

    for (name, file) in &config.fw_cfg {
        let mut value = OsString::from("name=");
        value.push(escape_option(name.as_ref()));
        value.push(",file=");
        value.push(escape_option(file.as_os_str()));
        args.push("-fw_cfg".into());
        args.push(value);
    }
    args
}

/// QEMU option values escape `,` as `,,`.
fn escape_option(value: &std::ffi::OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The full command line, program first, as printable strings (for `--verbose` and errors).
pub fn command_line(config: &VmConfig, accel: Accel) -> Vec<String> {
    let program = find_qemu(config.arch)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| qemu_binary_name(config.arch));
    std::iter::once(program)
        .chain(
            qemu_args(config, accel)
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned()),
        )
        .collect()
}

/// `command_line` joined into one shell-pasteable string.
pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
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
    let qemu = find_qemu(config.arch)?;
    let boot_files = match &config.firmware {
        Firmware::Direct => vec![&config.kernel, &config.initrd],
        Firmware::Uefi { code, vars } => vec![code, vars],
    };
    for path in boot_files
        .into_iter()
        .chain([&config.root_disk])
        .chain(config.fw_cfg.iter().map(|(_, p)| p))
        .chain(config.data_disks.iter())
    {
        std::fs::metadata(path).map_err(|source| RunError::MissingInput {
            path: path.clone(),
            source,
        })?;
    }
    let AccelSelection {
        accel,
        notice: accel_notice,
    } = accel::select(config.accel, config.arch, &qemu)?;
    if let Some(text) = accel_notice {
        notice(&text);
    }
    // Every VM gets a QMP socket: it is how a stop signal becomes a graceful stop.
    let mut private_dir = None;
    let mut config = config.clone();
    let qmp_socket = match &config.qmp_socket {
        Some(path) => path.clone(),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("fuse-qmp-")
                .tempdir()
                .map_err(RunError::Io)?;
            let path = dir.path().join("qmp.sock");
            private_dir = Some(dir);
            config.qmp_socket = Some(path.clone());
            path
        }
    };
    let config = &config;
    let args = qemu_args(config, accel);
    let command = shell_join(
        &std::iter::once(qemu.display().to_string())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>(),
    );

    let mut cmd = Command::new(&qemu);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Installed before the spawn, so a signal arriving from now on is seen.
    let watch = SignalWatch::install().map_err(RunError::Io)?;
    let started = Instant::now();
    let vm = ProcessGuard::spawn(&mut cmd).map_err(|source| RunError::Spawn {
        binary: qemu.display().to_string(),
        source,
    })?;
    let RunControl { stop, on_spawn } = control;
    if let Some(on_spawn) = on_spawn {
        on_spawn(&Spawned {
            pid: vm.child.id(),
            started,
            qmp_socket: qmp_socket.clone(),
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
                ConsoleParser::new(TAIL_LINES).skip_firmware_output(crate::console::EDK2_LAST_LINE)
            }
        },
        stderr: Vec::new(),
        first_output: None,
        qmp_socket,
        stop_request: stop,
        stopping: None,
        notice,
    };
    let result = session.run(out);
    // The socket's directory goes only after QEMU is reaped (the session's guard).
    drop(session);
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
    /// The kernel panicked and did not reboot.
    Panicked,
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
        if let Some(exit_code) = self.parser.exit_code() {
            return Ok(VmOutcome {
                exit_code,
                first_output: self.first_output,
                total,
                accel: self.accel,
            });
        }
        let diagnostics = Box::new(self.diagnostics());
        Err(match ending {
            Ending::TimedOut => RunError::Timeout {
                timeout: self.config.timeout.unwrap_or_default(),
                diagnostics,
            },
            Ending::Panicked | Ending::Exited(_) if self.parser.panicked() => {
                RunError::BootFailed {
                    reason: self.parser.panic_line().unwrap_or_default().to_string(),
                    diagnostics,
                }
            }
            Ending::Exited(status) if !status.success() && diagnostics.console.is_empty() => {
                RunError::QemuFailed {
                    status: describe(status),
                    diagnostics,
                }
            }
            // Asked to stop, and the VM went without the app reporting: the init itself
            // ended (or QEMU quit) on the power button.
            Ending::Exited(_) if self.stopping.is_some() => RunError::Interrupted {
                signal: self.stopping.map(|(s, _)| s).unwrap_or(libc::SIGTERM),
            },
            Ending::Exited(status) => RunError::BootFailed {
                reason: format!(
                    "QEMU {} without an exit line from the init",
                    describe(status)
                ),
                diagnostics,
            },
            Ending::Signal(_)
            | Ending::NoPowerOff
            | Ending::Panicked
            | Ending::StopTimedOut(_)
            | Ending::Aborted(_) => {
                unreachable!("handled above")
            }
        })
    }

    /// Moves console output to `out` until the VM is gone; the VM is reaped when it returns.
    fn pump(&mut self, out: &mut dyn Write) -> Result<Ending, RunError> {
        let mut console = self.vm.child.stdout.take();
        let mut stderr = self.vm.child.stderr.take();
        let mut panic_at: Option<Instant> = None;
        let mut exit_at: Option<Instant> = None;
        let mut closed_at: Option<Instant> = None;
        let deadline = self.config.timeout.map(|t| self.started + t);
        let mut buf = vec![0u8; 16 * 1024];
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
                if now >= kill_at && self.parser.exit_code().is_none() {
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
            if panic_at.is_some_and(|t| now >= t + PANIC_GRACE) {
                self.stop();
                return Ok(Ending::Panicked);
            }
            if exit_at.is_some_and(|t| now >= t + POWEROFF_GRACE) {
                // The app is done and its code known: a VM that does not power off is not
                // the app's failure.
                self.stop();
                return Ok(Ending::NoPowerOff);
            }
            if closed_at.is_some_and(|t| now >= t + EXIT_GRACE) {
                self.stop();
                let status = self.vm.status.unwrap_or_else(|| ExitStatus::from_raw(9));
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
            if self.parser.panicked() {
                panic_at.get_or_insert(Instant::now());
            }
            if self.parser.exit_code().is_some() {
                exit_at.get_or_insert(Instant::now());
            }
        }
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
        for event in events {
            if let ConsoleEvent::Output(bytes) = event {
                self.first_output
                    .get_or_insert_with(|| self.started.elapsed());
                if let Err(e) = out.write_all(&bytes) {
                    self.stop();
                    return Err(RunError::Output(e));
                }
                wrote = true;
            }
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
        if self.parser.exit_code().is_some() {
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
                (self.notice)(&format!("Cannot stop the VM gracefully ({e}): killing it"));
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

/// Makes the process spawned by `cmd` die with its parent (even on SIGKILL).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is async-signal-safe and called before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Owns a child process that leads its own process group: `Drop` kills the whole group and
/// reaps the child, unless it was reaped already.
#[derive(Debug)]
pub(crate) struct ProcessGuard {
    child: Child,
    /// The exit status, once reaped.
    status: Option<ExitStatus>,
}

impl ProcessGuard {
    /// Spawns `cmd` in a new process group that dies with this process.
    pub(crate) fn spawn(cmd: &mut Command) -> io::Result<ProcessGuard> {
        cmd.process_group(0);
        die_with_parent(cmd);
        Ok(ProcessGuard {
            child: cmd.spawn()?,
            status: None,
        })
    }

    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the child has exited (it is then reaped).
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// SIGKILLs the process group and reaps the child.
    pub(crate) fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        // The group id is the child's pid; the unreaped child keeps it from being reused.
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: sends a signal to a process group we created; no memory is involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        self.status = self.child.wait().ok();
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig::new(
            Arch::X86_64,
            "/k/bzImage",
            "/k/initrd",
            "/img/root,1.sqfs",
            "quiet loglevel=1",
        )
    }

    #[test]
    fn test_port_forward_parse() {
        let p: PortForward = "8080:80".parse().unwrap();
        assert_eq!((p.host, p.guest, p.proto), (8080, 80, Proto::Tcp));
        let p: PortForward = "53:5353/udp".parse().unwrap();
        assert_eq!((p.host, p.guest, p.proto), (53, 5353, Proto::Udp));
        let p: PortForward = "9000".parse().unwrap();
        assert_eq!((p.host, p.guest), (9000, 9000));
        assert_eq!(p.to_string(), "9000:9000/tcp");
        for bad in ["", "0:80", "a:b", "80:80/sctp", "70000:1"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
    }

    #[test]
    fn test_cmdline_additions() {
        let mut c = config();
        assert_eq!(
            effective_cmdline(&c, Accel::Kvm),
            "quiet loglevel=1 console=ttyS0 panic=-1"
        );
        assert_eq!(
            effective_cmdline(&c, Accel::Tcg),
            "quiet loglevel=1 console=ttyS0 panic=-1 noapictimer"
        );
        c.verbose = true;
        c.cmdline = "console=hvc0 panic=5".into();
        assert_eq!(
            effective_cmdline(&c, Accel::Kvm),
            "console=hvc0 panic=5 loglevel=7"
        );
    }

    #[test]
    fn test_args_x86_tcg() {
        let mut c = config();
        c.network = true;
        c.port_forwards = vec!["8080:80".parse().unwrap(), "53:53/udp".parse().unwrap()];
        c.fw_cfg = vec![("opt/fuse/run".into(), "/tmp/run".into())];
        c.cpus = 2;
        c.data_disks = vec!["/v/a.ext4".into(), "/v/b,c.ext4".into()];
        c.qmp_socket = Some("/run/x/qmp.sock".into());
        let args: Vec<String> = qemu_args(&c, Accel::Tcg)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for want in [
            "-name fuse,process=fuse-vm",
            "-M q35 -accel tcg -cpu max -m 512M -smp 2",
            "-nodefaults -no-user-config -display none -no-reboot",
            "-drive if=none,id=root,format=raw,readonly=on,file=/img/root,,1.sqfs",
            "-device virtio-blk-pci,drive=root \
             -drive if=none,id=data0,format=raw,file=/v/a.ext4 -device virtio-blk-pci,drive=data0 \
             -drive if=none,id=data1,format=raw,file=/v/b,,c.ext4 -device virtio-blk-pci,drive=data1 \
             -device virtio-rng-pci",
            "-qmp unix:/run/x/qmp.sock,server=on,wait=off",
            "-netdev user,id=n0,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.1:53-:53",
            "-device virtio-net-pci,netdev=n0,romfile=",
            "-fw_cfg name=opt/fuse/run,file=/tmp/run",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
        let kvm = qemu_args(&config(), Accel::Kvm);
        assert!(kvm.windows(2).any(|w| w[0] == "-cpu" && w[1] == "host"));
        assert!(!kvm.iter().any(|a| a == "-netdev"));
    }

    #[test]
    fn test_args_aarch64_tcg() {
        let mut c = config();
        c.arch = Arch::Aarch64;
        c.network = true;
        let joined = qemu_args(&c, Accel::Tcg)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        for want in [
            "-M virt,acpi=off -accel tcg -cpu max",
            "-device virtio-blk-pci,drive=root",
            "-device virtio-net-pci,netdev=n0,romfile=",
            "console=ttyAMA0",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
    }

    #[test]
    fn test_shell_join() {
        let words = [
            "qemu".to_string(),
            "a b".into(),
            "it's".into(),
            "x=1,y".into(),
        ];
        assert_eq!(shell_join(&words), r"qemu 'a b' 'it'\''s' x=1,y");
    }

    #[test]
    fn test_missing_qemu_error() {
        let err = RunError::QemuMissing {
            binary: qemu_binary_name(Arch::Aarch64),
            package: qemu_package(Arch::Aarch64),
        };
        assert_eq!(
            err.to_string(),
            "qemu-system-aarch64 not found: install QEMU (Debian/Ubuntu: apt-get install qemu-system-arm)"
        );
    }

    #[test]
    fn test_guard_kills_group_on_drop() {
        let mut cmd = Command::new("sh");
        // A grandchild in the same group must die too.
        cmd.args(["-c", "sleep 100 & echo $!; wait"])
            .stdout(Stdio::piped());
        let mut guard = ProcessGuard::spawn(&mut cmd).unwrap();
        let mut line = String::new();
        let mut stdout = guard.child_mut().stdout.take().unwrap();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        let grandchild: libc::pid_t = line.trim().parse().unwrap();
        drop(guard);
        // The grandchild is reparented and reaped by init (or a subreaper): wait for it.
        let gone = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            stat.map_or(true, |s| s.contains(") Z "))
        });
        assert!(gone, "sleep {grandchild} survived");
    }
}

/// Real boots: need `FUSE_TEST_KERNEL` (a bzImage), QEMU, and gcc with a static libc.
#[cfg(test)]
mod boot_tests {
    use super::*;
    use std::fs;

    const TEST_INIT: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
int main(void) {
    mkdir("/sys", 0755);
    mount("sysfs", "/sys", "sysfs", 0, 0);
    const char *mode = getenv("MODE");
    if (!mode) mode = "exit";
    printf("hello from app\n");
    if (!strcmp(mode, "hang")) {
        printf("partial no newline");
        fflush(stdout);
        for (;;) pause();
    }
    if (!strcmp(mode, "panic")) return 0; /* PID 1 exiting panics the kernel */
    char buf[64] = {0};
    int fd = open("/sys/firmware/qemu_fw_cfg/by_name/opt/fuse/test/raw", O_RDONLY);
    if (fd >= 0) { read(fd, buf, sizeof buf - 1); close(fd); }
    printf("fw_cfg: %s\n", buf);
    printf("unterminated");
    printf("<<fuse:exit 3>>\r\n");
    fflush(stdout);
    reboot(RB_POWER_OFF);
    return 0;
}
"#;

    struct Fixture {
        dir: tempfile::TempDir,
        kernel: PathBuf,
    }

    /// Builds the test initramfs, or says why the boot tests cannot run.
    fn fixture() -> Option<Fixture> {
        let Some(kernel) = std::env::var_os("FUSE_TEST_KERNEL").map(PathBuf::from) else {
            eprintln!("skipped: set FUSE_TEST_KERNEL to a bzImage to run boot tests");
            return None;
        };
        if find_qemu(Arch::X86_64).is_err() {
            eprintln!("skipped: qemu-system-x86_64 not installed");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("fuse-boot-test")
            .tempdir()
            .unwrap();
        let src = dir.path().join("init.c");
        fs::write(&src, TEST_INIT).unwrap();
        let init = dir.path().join("init");
        let built = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&init)
            .arg(&src)
            .status();
        if !built.is_ok_and(|s| s.success()) {
            eprintln!("skipped: gcc -static failed (static libc missing?)");
            return None;
        }
        let cpio = newc(&[("init", &fs::read(&init).unwrap())]);
        fs::write(dir.path().join("initrd"), cpio).unwrap();
        fs::write(dir.path().join("disk"), vec![0u8; 4096]).unwrap();
        fs::write(dir.path().join("fwcfg"), b"injected").unwrap();
        Some(Fixture { dir, kernel })
    }

    /// A minimal newc archive of regular files at the root.
    fn newc(files: &[(&str, &[u8])]) -> Vec<u8> {
        fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
            let header = format!(
                "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
                0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
            );
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            out.resize(out.len().next_multiple_of(4), 0);
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        let mut out = Vec::new();
        for (i, (name, data)) in files.iter().enumerate() {
            entry(&mut out, i as u32 + 1, name, 0o100755, data);
        }
        entry(&mut out, 0, "TRAILER!!!", 0, &[]);
        out
    }

    impl Fixture {
        fn config(&self, mode: &str) -> VmConfig {
            let d = self.dir.path();
            let mut c = VmConfig::new(
                Arch::X86_64,
                &self.kernel,
                d.join("initrd"),
                d.join("disk"),
                format!("quiet loglevel=1 MODE={mode}"),
            );
            c.memory_mib = 256;
            c.accel = AccelChoice::Tcg;
            c.fw_cfg = vec![("opt/fuse/test".into(), d.join("fwcfg"))];
            c.timeout = Some(Duration::from_secs(60));
            c
        }

        /// QEMU processes still alive that were started for this fixture.
        fn leftovers(&self) -> Vec<String> {
            let marker = self.dir.path().to_string_lossy().into_owned();
            let mut found = Vec::new();
            for entry in fs::read_dir("/proc").unwrap().flatten() {
                if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
                    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    if cmdline.contains("qemu-system") && cmdline.contains(&marker) {
                        found.push(cmdline);
                    }
                }
            }
            found
        }
    }

    #[test]
    fn test_boot_exit_code_and_output() {
        let _serial = signals::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fx) = fixture() else { return };
        let mut out = Vec::new();
        let outcome = run(&fx.config("exit"), &mut out).unwrap();
        assert_eq!(outcome.exit_code, 3);
        assert_eq!(outcome.accel, Accel::Tcg);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "hello from app\nfw_cfg: injected\nunterminated"
        );
        let first = outcome.first_output.unwrap();
        assert!(first <= outcome.total);
        eprintln!("first output after {first:?}, total {:?}", outcome.total);
        assert_eq!(fx.leftovers(), Vec::<String>::new());
    }

    #[test]
    fn test_boot_timeout_kills_vm() {
        let _serial = signals::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fx) = fixture() else { return };
        let mut config = fx.config("hang");
        config.timeout = Some(Duration::from_secs(8));
        let mut out = Vec::new();
        let err = run(&config, &mut out).unwrap_err();
        let RunError::Timeout { diagnostics, .. } = &err else {
            panic!("expected a timeout, got {err}");
        };
        assert!(diagnostics
            .console
            .iter()
            .any(|l| l == "partial no newline"));
        // The unterminated line was passed on live.
        assert!(String::from_utf8_lossy(&out).ends_with("partial no newline"));
        let text = format!("{err:#}");
        assert!(text.contains("did not finish within 8s"), "{text}");
        assert!(text.contains("QEMU command: "), "{text}");
        assert_eq!(fx.leftovers(), Vec::<String>::new());
    }

    #[test]
    fn test_boot_kernel_panic_reported() {
        let _serial = signals::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fx) = fixture() else { return };
        let err = run(&fx.config("panic"), &mut Vec::new()).unwrap_err();
        let RunError::BootFailed {
            reason,
            diagnostics,
        } = &err
        else {
            panic!("expected a boot failure, got {err}");
        };
        assert!(reason.starts_with("Kernel panic - not syncing"), "{err}");
        assert!(
            diagnostics.console.iter().any(|l| l == "hello from app"),
            "{err}"
        );
        assert_eq!(fx.leftovers(), Vec::<String>::new());
    }

    /// Writes like `Vec`, and sends this process SIGTERM on the first write.
    struct TermOnFirstWrite(Vec<u8>);

    impl Write for TermOnFirstWrite {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                // SAFETY: the run's SignalWatch catches SIGTERM while the VM runs.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            }
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_boot_signal_stops_vm() {
        let _serial = signals::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fx) = fixture() else { return };
        let started = Instant::now();
        // No grace: the first signal kills at once.
        let mut config = fx.config("hang");
        config.stop_grace = Duration::ZERO;
        let err = run(&config, &mut TermOnFirstWrite(Vec::new())).unwrap_err();
        assert!(
            matches!(err, RunError::Interrupted { signal } if signal == libc::SIGTERM),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "Interrupted by SIGTERM; the VM was stopped"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        assert_eq!(fx.leftovers(), Vec::<String>::new());
    }

    #[test]
    fn test_boot_signal_with_grace_kills_an_app_that_does_not_stop() {
        let _serial = signals::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fx) = fixture() else { return };
        // The test init ignores SIGTERM (PID 1 without a handler): the grace period ends it.
        let mut config = fx.config("hang");
        config.stop_grace = Duration::from_secs(2);
        let started = Instant::now();
        let err = run(&config, &mut TermOnFirstWrite(Vec::new())).unwrap_err();
        assert!(
            matches!(err, RunError::StopTimeout { signal, .. } if signal == libc::SIGTERM),
            "{err}"
        );
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert_eq!(fx.leftovers(), Vec::<String>::new());
    }

    /// Env of the re-executed test binary in `test_boot_sigkill_of_runner_kills_vm`.
    const CHILD_ENV: &str = "FUSE_TEST_RUNNER_CHILD";

    /// Not a test on its own: the runner process that the next test SIGKILLs.
    #[test]
    fn child_runs_hanging_vm() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let fx = Fixture {
            dir: tempfile::TempDir::with_prefix_in("unused", &dir).unwrap(),
            kernel: std::env::var_os("FUSE_TEST_KERNEL").unwrap().into(),
        };
        let mut config = fx.config("hang");
        let d = PathBuf::from(dir);
        config.initrd = d.join("initrd");
        config.root_disk = d.join("disk");
        config.fw_cfg.clear();
        let mut stdout = io::stdout();
        let _ = run(&config, &mut stdout);
    }

    #[test]
    fn test_boot_sigkill_of_runner_kills_vm() {
        let _serial = signals::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fx) = fixture() else { return };
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "qemu::boot_tests::child_runs_hanging_vm",
                "--nocapture",
            ])
            .env(CHILD_ENV, fx.dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("partial no newline") {
            let n = stdout.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "child ended early: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(fx.leftovers().len(), 1, "the VM should be running");
        child.kill().unwrap(); // SIGKILL: no handler, no Drop runs in the child
        child.wait().unwrap();
        let gone = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            fx.leftovers().is_empty()
        });
        assert!(
            gone,
            "QEMU outlived its SIGKILLed runner: {:?}",
            fx.leftovers()
        );
    }

    #[test]
    fn test_qemu_failure_reported() {
        let _serial = signals::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fx) = fixture() else { return };
        let mut config = fx.config("exit");
        config.memory_mib = 1; // too little: QEMU refuses or the kernel cannot boot
        config.cpus = 100_000; // QEMU refuses this at once
        let err = run(&config, &mut Vec::new()).unwrap_err();
        let RunError::QemuFailed { diagnostics, .. } = &err else {
            panic!("expected QEMU to fail, got {err}");
        };
        assert!(!diagnostics.qemu_stderr.is_empty(), "{err}");
    }
}
