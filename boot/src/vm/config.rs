//! What a VM is asked to be: [`VmConfig`] and the types in it (ports, firmware, accelerator).
//! Plain data; how it becomes a QEMU command line is `vm::machine`.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use fuse_rootfs::Arch;

/// The default time an app gets between SIGTERM (graceful stop) and the VM being killed.
pub(crate) const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// A forwarded (published) port of the VM's user-mode network.
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

/// A TCP address in the guest whose connections QEMU hands, one spawned `command` each, to
/// the host (slirp's `guestfwd`): how `fuse run --metadata-server` plays a cloud's instance
/// metadata service at 169.254.169.254:80. The guest then gets QEMU's slirp with
/// `restrict=on` (nothing else is reachable) on the /24 holding `addr`, since slirp forwards
/// only addresses inside its own network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestForward {
    /// The guest's destination.
    pub addr: SocketAddrV4,
    /// What QEMU spawns per connection, its stdin and stdout the connection: a command line
    /// as a POSIX shell splits it (QEMU uses `g_shell_parse_argv`; quote paths).
    pub command: String,
}

/// Guest forwards slirp cannot serve.
#[derive(Debug, thiserror::Error)]
#[error("Invalid guest forward to {addr}: {why}")]
pub struct InvalidGuestForward {
    pub addr: SocketAddrV4,
    pub why: &'static str,
}

/// The /24 the guest's slirp network gets for `forwards` (that of the first), or `None`
/// without forwards. Every forward must be in it, and not on an address slirp keeps: the
/// network and broadcast addresses, its host (.2), DNS (.3) and DHCP range (.15 to .30).
pub fn guest_forward_network(
    forwards: &[GuestForward],
) -> Result<Option<Ipv4Addr>, InvalidGuestForward> {
    let Some(first) = forwards.first() else {
        return Ok(None);
    };
    let net = u32::from(*first.addr.ip()) & 0xffff_ff00;
    for fwd in forwards {
        let ip = u32::from(*fwd.addr.ip());
        let why = if ip & 0xffff_ff00 != net {
            Some("every guest forward must be in one /24 (slirp's network)")
        } else if matches!(ip & 0xff, 0 | 2 | 3 | 15..=30 | 255) {
            Some("slirp keeps .0, .2, .3, .15 to .30 and .255 of its network")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(InvalidGuestForward {
                addr: fwd.addr,
                why,
            });
        }
    }
    Ok(Some(Ipv4Addr::from(net)))
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

/// The hardware a VM is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Machine {
    /// QEMU's paravirtual devices: `q35`, or `virt` described by device tree; a virtio-blk
    /// root disk, virtio-net and virtio-rng. The fastest.
    #[default]
    Virtio,
    /// The hardware of a cloud instance (EC2 Nitro, x86_64 and Graviton): `q35`, or `virt`
    /// with ACPI tables (`acpi=on`, which only UEFI firmware hands the kernel); the root disk
    /// on NVMe, an Intel e1000 NIC (no virtio-net) and no virtio-rng. Data disks stay
    /// virtio-blk.
    Cloud,
}

/// An unknown `--machine` value.
#[derive(Debug, thiserror::Error)]
#[error("Unknown machine '{0}': use virtio or cloud")]
pub struct UnknownMachine(pub String);

impl FromStr for Machine {
    type Err = UnknownMachine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "virtio" => Ok(Machine::Virtio),
            "cloud" => Ok(Machine::Cloud),
            other => Err(UnknownMachine(other.to_string())),
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Virtio => "virtio",
            Machine::Cloud => "cloud",
        })
    }
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub arch: Arch,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line: the image's (see [`crate::cmdline::image_cmdline`]), which
    /// names the console and says `panic=-1`. The runner only adds run-time extras
    /// (`noapictimer` under TCG on x86_64, `loglevel=7` when `verbose`).
    pub cmdline: String,
    /// The root disk, attached read-only as the first virtio-blk disk (`/dev/vda`; on the
    /// [`Machine::Cloud`] an NVMe namespace, `/dev/nvme0n1`): the image's GPT disk (the init finds the root partition by `fuse.root=PARTUUID=`), or a
    /// bare squashfs with `fuse.root=/dev/vda`.
    pub root_disk: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: AccelChoice,
    /// fw_cfg entries (`opt/...` name, file), readable in the guest under
    /// `/sys/firmware/qemu_fw_cfg/by_name/<name>/raw`.
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// Whether the guest gets a NIC (user-mode networking by passt, see `vm::passt`).
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
    /// A raw disk image attached read-only as the virtio disk after the data disks: a cloud's
    /// configuration disk (a NoCloud seed, `fuse export --format nocloud`), on both machines.
    pub config_disk: Option<PathBuf>,
    /// Guest TCP addresses served by host commands; any makes the network QEMU's slirp with
    /// `restrict=on` (see [`GuestForward`]).
    pub guest_forwards: Vec<GuestForward>,
    pub firmware: Firmware,
    pub machine: Machine,
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
            config_disk: None,
            guest_forwards: Vec::new(),
            firmware: Firmware::Direct,
            machine: Machine::Virtio,
        }
    }
}

/// What the user asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if it works here, else TCG.
    #[default]
    Auto,
    /// KVM, or an error.
    Kvm,
    /// TCG (emulation), always available.
    Tcg,
}

/// An unknown `--accel` value.
#[derive(Debug, thiserror::Error)]
#[error("Unknown accelerator '{0}': use auto, kvm or tcg")]
pub struct UnknownAccel(pub String);

impl FromStr for AccelChoice {
    type Err = UnknownAccel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(UnknownAccel(other.to_string())),
        }
    }
}

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn test_guest_forward_network() {
        let fwd = |a: &str| GuestForward {
            addr: a.parse().unwrap(),
            command: "relay".into(),
        };
        assert_eq!(guest_forward_network(&[]).unwrap(), None);
        assert_eq!(
            guest_forward_network(&[fwd("169.254.169.254:80"), fwd("169.254.169.123:123")])
                .unwrap(),
            Some(Ipv4Addr::new(169, 254, 169, 0))
        );
        for bad in [
            vec![fwd("169.254.169.254:80"), fwd("10.0.2.100:80")],
            vec![fwd("169.254.169.2:80")],
            vec![fwd("169.254.169.20:80")],
            vec![fwd("169.254.169.255:80")],
        ] {
            assert!(guest_forward_network(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_parse_machine() {
        for m in [Machine::Virtio, Machine::Cloud] {
            assert_eq!(m.to_string().parse::<Machine>().unwrap(), m);
        }
        assert_eq!(
            "ec2".parse::<Machine>().unwrap_err().to_string(),
            "Unknown machine 'ec2': use virtio or cloud"
        );
    }

    #[test]
    fn test_parse_choice() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("kvm".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert!("hvf".parse::<AccelChoice>().is_err());
    }
}
