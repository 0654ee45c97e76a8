//! The QEMU side of a VM: which binary (and which Debian package ships it), and the command
//! line for a [`VmConfig`] on each arch.
//!
//! x86_64 guests run on `-M q35` with virtio-pci devices. Measured under TCG on a 2-core
//! host with the fuse kernel (time from spawn to the app's first output line, 3 runs each):
//! `microvm` 0.90-0.97 s, `q35` 1.10-1.15 s, `pc` 1.42-1.51 s. `microvm` is the fastest but
//! has no HPET or ACPI PM timer: on a loaded host the TSC calibration against the PIT fails
//! under TCG ("tsc: Unable to calibrate against PIT"), the kernel is left without a usable
//! clocksource and hangs early in boot (1 run in 6 idle, every run with `pit=off`). q35
//! falls back to HPET calibration and booted every time (8 of 8 with 4 VMs in parallel).
//! fw_cfg in sysfs, ACPI power-off, virtio-rng and user networking with host forwards work
//! on all three (measured with slirp; the network is passt's now, see `vm::passt`). `virtio-net-pci` gets `romfile=` so no iPXE option ROM is loaded.
//! A direct boot runs qboot rather than SeaBIOS before the kernel (see [`qboot_rom`]).
//!
//! aarch64 guests run on `-M virt,acpi=off` (`-cpu max` under TCG) with a PL011 console
//! (`ttyAMA0`), the device tree QEMU generates, virtio-pci devices behind the generic ECAM host
//! bridge and PSCI for power-off. Under TCG on the same 2-core host the hello image gets from
//! spawn to QEMU's exit in 0.75-0.8 s (`-cpu max,pauth-impdef=on` measured no faster).
//!
//! The cloud machine ([`Machine::Cloud`]) plays an EC2 Nitro instance: the same machine types,
//! aarch64's with ACPI (`virt,acpi=on`: AAVMF then hands the kernel ACPI tables, as Graviton's
//! firmware does, and the power button is an ACPI event through the GED), the root disk on
//! NVMe, an Intel e1000 NIC (the non-virtio NIC nearly every hypervisor emulates; ENA has no
//! QEMU model) and no virtio-rng (the kernel takes entropy from RDRAND/RNDR, as on EC2).
//!
//! QEMU is named with `-name fuse,process=fuse-vm` so leak checks can find it.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use fuse_rootfs::Arch;

use super::config::{guest_forward_network, Accel, Firmware, Machine, VmConfig};

/// The x86_64 machine type (see the module documentation for why).
pub(crate) const X86_MACHINE: &str = "q35";
/// The aarch64 machine type. `acpi=off`: UEFI firmware (AAVMF) then hands the kernel QEMU's
/// device tree, as a direct boot does, rather than ACPI tables (the kernel reads both; the
/// cloud machine takes ACPI), so both boot modes see the same hardware description and the
/// power button is the same GPIO line (the init reads it, see `vm::session`).
pub(crate) const AARCH64_MACHINE: &str = "virt,acpi=off";
/// The aarch64 machine type of [`Machine::Cloud`]: ACPI as on Graviton (taken only under UEFI).
pub(crate) const AARCH64_CLOUD_MACHINE: &str = "virt,acpi=on";
/// The file descriptor QEMU finds its end of passt's socket pair on (see `vm::passt`): high,
/// so it cannot clash with the standard streams or with what QEMU opens first.
pub(crate) const QEMU_NET_FD: i32 = 100;
/// The `-name` given to every VM: guest name `fuse`, process name `fuse-vm`.
pub const VM_NAME_ARG: &str = "fuse,process=fuse-vm";

/// The QEMU binary for an arch is not installed.
#[derive(Debug, thiserror::Error)]
#[error("{binary} not found: install QEMU (Debian/Ubuntu: apt-get install {package})")]
pub struct QemuMissing {
    pub binary: String,
    pub package: &'static str,
}

/// The machine type (`-M`) for `arch` and `machine`.
pub(crate) fn machine_type(arch: Arch, machine: Machine) -> &'static str {
    match (arch, machine) {
        (Arch::X86_64, _) => X86_MACHINE,
        (Arch::Aarch64, Machine::Virtio) => AARCH64_MACHINE,
        (Arch::Aarch64, Machine::Cloud) => AARCH64_CLOUD_MACHINE,
    }
}

/// The CPU model (`-cpu`) under `accel`: the host's own under KVM, every feature TCG has
/// otherwise.
pub(crate) fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    }
}

/// The QEMU binary for `arch`: `$FUSE_QEMU` if set, else `qemu-system-<arch>` on `PATH`.
pub fn find_qemu(arch: Arch) -> Result<PathBuf, QemuMissing> {
    if let Some(path) = std::env::var_os("FUSE_QEMU").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let name = qemu_binary_name(arch);
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(&name))
        .find(|candidate| is_executable(candidate))
        .ok_or(QemuMissing {
            binary: name,
            package: qemu_package(arch),
        })
}

fn qemu_binary_name(arch: Arch) -> String {
    format!("qemu-system-{}", arch.qemu_suffix())
}

/// The Debian package that ships the QEMU emulator for `arch`.
pub(crate) fn qemu_package(arch: Arch) -> &'static str {
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

/// Where Debian's `qemu-system-data` (and a QEMU built from source) puts qboot.
const QBOOT_ROMS: [&str; 2] = [
    "/usr/share/qemu/qboot.rom",
    "/usr/local/share/qemu/qboot.rom",
];

/// The firmware of an x86_64 direct boot: qboot, a 64 KiB BIOS that only loads the kernel QEMU
/// was given, instead of QEMU's default SeaBIOS (which probes for boot devices and runs option
/// ROMs first). Measured under TCG, QEMU's spawn to the static hello's output, median of 15
/// alternated runs on an idle host: 902 ms with SeaBIOS, 790 ms with qboot. The kernel gets the
/// same ACPI tables (QEMU's, through fw_cfg), so nothing the guest sees changes. Without qboot
/// installed, SeaBIOS as before.
fn qboot_rom() -> Option<PathBuf> {
    QBOOT_ROMS.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The kernel command line actually passed: the configured one (the image's, which already
/// names the console and says `panic=-1`, see [`crate::cmdline::image_cmdline`]) plus the
/// run-time extras.
pub(crate) fn effective_cmdline(config: &VmConfig, accel: Accel) -> String {
    let mut cmdline = config.cmdline.trim().to_string();
    let mut push = |s: &str| {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(s);
    };
    let has = |key: &str| {
        config
            .cmdline
            .split_whitespace()
            .any(|w| w.starts_with(key))
    };
    // Under TCG the local APIC timer never passes the kernel's calibration check: calibrating
    // and verifying it costs ~190 ms of every boot before the kernel gives up on it anyway.
    // Measured: 1.61 s -> 1.42 s to first app output (median of 5, hello, q35). KVM keeps it.
    if accel == Accel::Tcg && config.arch == Arch::X86_64 && !has("noapictimer") {
        push("noapictimer");
    }
    // TCG's TSC is the host's: its rate saves the kernel a calibration that fails under load.
    if accel == Accel::Tcg && config.arch == Arch::X86_64 && !has("tsc_early_khz=") {
        if let Some(khz) = super::tsc::host_tsc_khz() {
            push(&format!("tsc_early_khz={khz}"));
        }
    }
    // The last loglevel= wins: kernel messages on the console, and the init's progress.
    if config.verbose {
        push("loglevel=7 fuse.debug=1");
    }
    cmdline
}

/// How the VM's NIC reaches the host (see `vm::passt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NetBackend {
    /// passt, on the socket pair end at [`QEMU_NET_FD`]; it forwards the ports itself.
    Passt,
    /// The fallback on a host without a default route (passt refuses to start there), and the
    /// backend of a VM with guest forwards (passt has none): QEMU's slirp with `restrict=on`,
    /// so the guest opens no connection at all (10.0.2.2 included) but to its guest
    /// forwards; published ports still work.
    SlirpRestricted,
}

/// The `-netdev` value for `config` over `net`.
fn netdev(config: &VmConfig, net: NetBackend) -> String {
    match net {
        NetBackend::Passt => {
            format!("stream,id=n0,server=off,addr.type=fd,addr.str={QEMU_NET_FD}")
        }
        NetBackend::SlirpRestricted => {
            let mut netdev = String::from("user,id=n0,restrict=on");
            // slirp forwards only addresses inside its network (checked before the spawn).
            if let Ok(Some(net)) = guest_forward_network(&config.guest_forwards) {
                netdev.push_str(&format!(",net={net}/24"));
            }
            for fwd in &config.port_forwards {
                netdev.push_str(&format!(
                    ",hostfwd={}:127.0.0.1:{}-:{}",
                    fwd.proto.as_str(),
                    fwd.host,
                    fwd.guest
                ));
            }
            for fwd in &config.guest_forwards {
                netdev.push_str(&format!(
                    ",guestfwd=tcp:{}:{}-cmd:{}",
                    fwd.addr.ip(),
                    fwd.addr.port(),
                    fwd.command.replace(',', ",,")
                ));
            }
            netdev
        }
    }
}

/// QEMU's arguments (without the program) for `config` run with `accel`, the network (if any)
/// through passt.
#[cfg(test)]
pub(crate) fn qemu_args(
    config: &VmConfig,
    accel: Accel,
    status_file: Option<&Path>,
) -> Vec<OsString> {
    qemu_args_with(config, accel, status_file, NetBackend::Passt)
}

/// QEMU's arguments (without the program) for `config` run with `accel`, the network (if any)
/// through `net`; `status_file` backs the guest's status port (see [`confinement_args`]).
pub(crate) fn qemu_args_with(
    config: &VmConfig,
    accel: Accel,
    status_file: Option<&Path>,
    net: NetBackend,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    fn arg(args: &mut Vec<OsString>, a: impl Into<OsString>) {
        args.push(a.into());
    }
    // Both machines have PCI: virtio devices are virtio-*-pci.
    let bus = "pci";
    let (machine, cpu) = (machine_type(config.arch, config.machine), cpu_model(accel));
    // The app's own console port (see `confinement_args`) shares QEMU's stdout with the serial.
    let console_port = status_file.is_some() && config.machine == Machine::Virtio;
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
    ] {
        arg(&mut args, a);
    }
    // The console goes to QEMU's stdout, a pipe the runner reads; stdin is /dev/null.
    for a in [
        "-chardev",
        "stdio,id=con0,signal=off",
        "-serial",
        "chardev:con0",
    ] {
        arg(&mut args, a);
    }
    let root_boot = match &config.firmware {
        Firmware::Direct => {
            if config.arch == Arch::X86_64 {
                if let Some(rom) = qboot_rom() {
                    arg(&mut args, "-bios");
                    args.push(rom.into());
                }
            }
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
    arg(
        &mut args,
        match config.machine {
            Machine::Virtio => format!("virtio-blk-{bus},drive=root{root_boot}"),
            // The serial is what the guest sees in /sys/block/nvme0n1/device/serial.
            Machine::Cloud => format!("nvme,serial=fuse-root,drive=root{root_boot}"),
        },
    );
    // Data disks next, so the guest names them vdb, vdc, ... in this order (PCI slot order).
    for (i, disk) in config.data_disks.iter().enumerate() {
        let mut drive = OsString::from(format!("if=none,id=data{i},format=raw,file="));
        drive.push(escape_option(disk.as_os_str()));
        arg(&mut args, "-drive");
        args.push(drive);
        arg(&mut args, "-device");
        arg(&mut args, format!("virtio-blk-{bus},drive=data{i}"));
    }
    // The cloud's configuration disk last, read-only, virtio on both machines (as a NoCloud
    // seed is attached to a cloud VM as a plain extra disk).
    if let Some(disk) = &config.config_disk {
        let mut drive = OsString::from("if=none,id=seed,format=raw,readonly=on,file=");
        drive.push(escape_option(disk.as_os_str()));
        arg(&mut args, "-drive");
        args.push(drive);
        arg(&mut args, "-device");
        arg(&mut args, format!("virtio-blk-{bus},drive=seed"));
    }
    if config.machine == Machine::Virtio {
        arg(&mut args, "-device");
        arg(&mut args, format!("virtio-rng-{bus}"));
    }
    if let Some(socket) = &config.qmp_socket {
        let mut qmp = OsString::from("unix:");
        qmp.push(escape_option(socket.as_os_str()));
        qmp.push(",server=on,wait=off");
        arg(&mut args, "-qmp");
        args.push(qmp);
    }

    if config.network {
        arg(&mut args, "-netdev");
        arg(&mut args, netdev(config, net));
        arg(&mut args, "-device");
        // No option ROM: the kernel is loaded directly, iPXE would only cost boot time.
        let nic = match config.machine {
            Machine::Virtio => format!("virtio-net-{bus}"),
            // QEMU's e1000 negotiates its link for 500 ms after the driver resets it, and
            // the driver sees the link only at its next watchdog run (every 2 s); the init
            // waits for the link before DHCP. Off, the link is up at once: hello under UEFI
            // on x86_64 8.9 s -> 7.3 s to exit (TCG).
            Machine::Cloud => "e1000,autonegotiation=off".to_string(),
        };
        arg(&mut args, format!("{nic},netdev=n0,romfile="));
    }

    // A guest forward's command is spawned by QEMU per connection: its sandbox must let it.
    let spawn = config.network && !config.guest_forwards.is_empty();
    confinement_args(
        status_file,
        console_port,
        &mut args,
        running_as_root(),
        spawn,
    );

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

/// The user QEMU drops to when fuse runs as root.
pub(crate) const QEMU_USER: &str = "nobody";

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether QEMU changes its uid after start-up (`-runas`), and so loses its parent-death
/// signal (see `vm::process`).
pub(crate) fn drops_privileges() -> bool {
    running_as_root()
}

/// What makes the runner's knowledge trustworthy and QEMU confined, in one place:
///
/// - the status port: a virtio-serial port named `fuse.status`, backed by `status`. The
///   init (PID 1) opens it and unlinks its node; a virtio port has one opener at a time, so the
///   app cannot write to it, as it could fake a line on the console;
/// - the console port (`console_port`): a virtio-serial port named `fuse.console` on QEMU's
///   stdout, as the serial. The init relays the app's terminal to it,
///   and holds it alone as it holds the status port; the serial keeps the kernel's and the
///   init's messages. The emulated UART costs an exit per byte under TCG; a port takes up to
///   32 KiB per write. Not on the cloud machine: no cloud has it;
/// - pvpanic: the guest kernel tells QEMU it panicked, and QEMU then exits with status 1
///   (`-action panic=exit-failure`), so a panic is known without reading console text;
/// - `-sandbox`: QEMU's seccomp filter (no obsolete syscalls, no fork/exec, no scheduler or
///   resource changes, no set*id); fork/exec stay allowed (`spawn`) only for a VM with guest
///   forwards, whose commands QEMU spawns;
/// - as root, `-runas nobody`: QEMU opens every file it needs (disks, sockets, the status
///   file, firmware variables) at start-up, then drops to `nobody`. QEMU 7.2 (Debian 12)
///   installs the seccomp filter before that drop, so `elevateprivileges=deny` would kill it
///   (SIGSYS, measured); as `nobody` with no capabilities, set*id cannot raise anything anyway,
///   and `spawn=deny` rules out setuid programs.
fn confinement_args(
    status: Option<&Path>,
    console_port: bool,
    args: &mut Vec<OsString>,
    root: bool,
    spawn: bool,
) {
    if let Some(status) = status {
        let mut chardev = OsString::from("file,id=status,path=");
        chardev.push(escape_option(status.as_os_str()));
        args.extend(["-device", "virtio-serial-pci", "-chardev"].map(OsString::from));
        args.push(chardev);
        args.extend(
            ["-device", "virtserialport,chardev=status,name=fuse.status"].map(OsString::from),
        );
        if console_port {
            // The same pipe as the serial, opened again: a port on a multiplexed chardev never
            // hears that its host side is open (QEMU sends that event to one frontend), so the
            // guest could never write to it.
            args.extend(
                [
                    "-chardev",
                    "file,id=con1,path=/proc/self/fd/1",
                    "-device",
                    "virtserialport,chardev=con1,name=fuse.console",
                ]
                .map(OsString::from),
            );
        }
    }
    args.extend(["-device", "pvpanic-pci", "-action", "panic=exit-failure"].map(OsString::from));
    let mut sandbox = String::from("on,obsolete=deny");
    if !root {
        sandbox.push_str(",elevateprivileges=deny");
    }
    if !spawn {
        sandbox.push_str(",spawn=deny");
    }
    sandbox.push_str(",resourcecontrol=deny");
    args.extend(["-sandbox".into(), sandbox.into()]);
    if root {
        args.extend(["-runas", QEMU_USER].map(OsString::from));
    }
}

/// QEMU option values escape `,` as `,,`.
fn escape_option(value: &OsStr) -> OsString {
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

/// `program args…` as one shell-pasteable string (for error reports).
pub(crate) fn shell_command(program: &Path, args: &[OsString]) -> String {
    let words: Vec<String> = std::iter::once(program.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(|w| w.to_string_lossy().into_owned())
        .collect();
    shell_join(&words)
}

/// `words` quoted for a POSIX shell where needed, joined by spaces.
fn shell_join(words: &[String]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig::new(
            Arch::X86_64,
            "/k/bzImage",
            "/k/initrd",
            "/img/root,1.sqfs",
            crate::cmdline::image_cmdline(Arch::X86_64, "/dev/vda"),
        )
    }

    #[test]
    fn test_cmdline_additions() {
        let mut c = config();
        // The image's line passes unchanged: it names the console and panic=-1 itself.
        assert_eq!(
            effective_cmdline(&c, Accel::Kvm),
            "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init fuse.root=/dev/vda \
             fuse.rootfstype=squashfs"
        );
        let tsc = super::super::tsc::host_tsc_khz()
            .map(|khz| format!(" tsc_early_khz={khz}"))
            .unwrap_or_default();
        assert_eq!(
            effective_cmdline(&c, Accel::Tcg),
            format!("{} noapictimer{tsc}", c.cmdline)
        );
        c.verbose = true;
        assert_eq!(
            effective_cmdline(&c, Accel::Kvm),
            format!("{} loglevel=7 fuse.debug=1", c.cmdline)
        );
        // A command line of its own gets nothing it did not ask for but the extras.
        c.cmdline = "quiet".into();
        assert_eq!(
            effective_cmdline(&c, Accel::Kvm),
            "quiet loglevel=7 fuse.debug=1"
        );
        c.arch = Arch::Aarch64;
        c.verbose = false;
        assert_eq!(effective_cmdline(&c, Accel::Tcg), "quiet");
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
        let args: Vec<String> = qemu_args(&c, Accel::Tcg, None)
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
            "-netdev stream,id=n0,server=off,addr.type=fd,addr.str=100",
            "-device virtio-net-pci,netdev=n0,romfile=",
            "-fw_cfg name=opt/fuse/run,file=/tmp/run",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
        c.port_forwards.truncate(1);
        let slirp = qemu_args_with(&c, Accel::Tcg, None, NetBackend::SlirpRestricted);
        assert!(slirp.windows(2).any(|w| w[0] == "-netdev"
            && w[1] == "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80"));
        // qboot, where the host has it, before the kernel (the same on KVM).
        let bios = args.iter().position(|a| a == "-bios");
        assert_eq!(
            bios.map(|i| args[i + 1].as_str()),
            qboot_rom().as_ref().and_then(|p| p.to_str())
        );
        let kvm = qemu_args(&config(), Accel::Kvm, None);
        assert!(kvm.windows(2).any(|w| w[0] == "-cpu" && w[1] == "host"));
        assert!(!kvm.iter().any(|a| a == "-netdev"));
    }

    #[test]
    fn test_args_aarch64_tcg() {
        let mut c = config();
        c.arch = Arch::Aarch64;
        c.cmdline = crate::cmdline::image_cmdline(Arch::Aarch64, "/dev/vda");
        c.network = true;
        let joined = qemu_args(&c, Accel::Tcg, None)
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
        // The virt machine loads the kernel without any BIOS.
        assert!(!joined.contains("-bios"), "{joined}");
    }

    #[test]
    fn test_args_cloud_machine() {
        for (arch, machine) in [
            (Arch::X86_64, "-M q35 "),
            (Arch::Aarch64, "-M virt,acpi=on "),
        ] {
            let mut c = config();
            c.arch = arch;
            c.machine = Machine::Cloud;
            c.network = true;
            c.firmware = Firmware::Uefi {
                code: "/fw/code.fd".into(),
                vars: "/run/vars.fd".into(),
            };
            c.data_disks = vec!["/v/a.ext4".into()];
            let joined = qemu_args(&c, Accel::Tcg, None)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ");
            for want in [
                machine,
                "-device nvme,serial=fuse-root,drive=root,bootindex=0",
                "-device virtio-blk-pci,drive=data0",
                "-device e1000,autonegotiation=off,netdev=n0,romfile=",
            ] {
                assert!(joined.contains(want), "{want} missing in {joined}");
            }
            for absent in [
                "virtio-net",
                "virtio-rng",
                "virtio-blk-pci,drive=root",
                "-kernel",
            ] {
                assert!(!joined.contains(absent), "{absent} in {joined}");
            }
        }
    }

    #[test]
    fn test_confinement_args() {
        let joined = |status: Option<&Path>, root: bool| {
            let mut args = Vec::new();
            confinement_args(status, status.is_some(), &mut args, root, false);
            args.into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            joined(Some(Path::new("/run/x,y/status")), false),
            "-device virtio-serial-pci -chardev file,id=status,path=/run/x,,y/status \
             -device virtserialport,chardev=status,name=fuse.status \
             -chardev file,id=con1,path=/proc/self/fd/1 \
             -device virtserialport,chardev=con1,name=fuse.console \
             -device pvpanic-pci -action panic=exit-failure \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        );
        assert_eq!(
            joined(None, true),
            "-device pvpanic-pci -action panic=exit-failure \
             -sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny -runas nobody"
        );
    }

    #[test]
    fn test_args_config_disk_after_the_data_disks() {
        for machine in [Machine::Virtio, Machine::Cloud] {
            let mut c = config();
            c.machine = machine;
            c.data_disks = vec!["/v/a.ext4".into()];
            c.config_disk = Some("/s/my,seed.img".into());
            let joined = qemu_args(&c, Accel::Tcg, None)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ");
            let want = "-device virtio-blk-pci,drive=data0 \
                 -drive if=none,id=seed,format=raw,readonly=on,file=/s/my,,seed.img \
                 -device virtio-blk-pci,drive=seed";
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
        assert!(!qemu_args(&config(), Accel::Tcg, None)
            .iter()
            .any(|a| a.to_string_lossy().contains("id=seed")));
    }

    #[test]
    fn test_args_guest_forward_netdev() {
        let mut c = config();
        c.network = true;
        c.port_forwards = vec!["8080:80".parse().unwrap()];
        c.guest_forwards = vec![crate::vm::GuestForward {
            addr: "169.254.169.254:80".parse().unwrap(),
            command: "'/opt/a,b/fuse' __relay 127.0.0.1:9000".into(),
        }];
        let args = qemu_args_with(&c, Accel::Tcg, None, NetBackend::SlirpRestricted);
        assert!(
            args.windows(2).any(|w| {
                w[0] == "-netdev"
                    && w[1]
                        == "user,id=n0,restrict=on,net=169.254.169.0/24,\
                        hostfwd=tcp:127.0.0.1:8080-:80,\
                        guestfwd=tcp:169.254.169.254:80-cmd:'/opt/a,,b/fuse' __relay 127.0.0.1:9000"
            }),
            "{args:?}"
        );
        // QEMU spawns the command per connection: its sandbox allows that, and only then.
        let sandbox = |args: &[OsString]| {
            args.windows(2)
                .find(|w| w[0] == "-sandbox")
                .map(|w| w[1].to_string_lossy().into_owned())
                .unwrap()
        };
        assert!(!sandbox(&args).contains("spawn=deny"), "{args:?}");
        c.guest_forwards.clear();
        let args = qemu_args_with(&c, Accel::Tcg, None, NetBackend::SlirpRestricted);
        assert!(sandbox(&args).contains("spawn=deny"), "{args:?}");
        assert!(!args.iter().any(|a| a.to_string_lossy().contains("net=")));
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
        let err = QemuMissing {
            binary: qemu_binary_name(Arch::Aarch64),
            package: qemu_package(Arch::Aarch64),
        };
        assert_eq!(
            err.to_string(),
            "qemu-system-aarch64 not found: install QEMU (Debian/Ubuntu: apt-get install qemu-system-arm)"
        );
    }
}
