//! The VM's network: passt (Debian package `passt`), one per VM, connected to QEMU by a
//! socket pair (`-netdev stream,addr.type=fd`).
//!
//! Why passt and not QEMU's slirp: slirp maps its host address (10.0.2.2) to the host's
//! 127.0.0.1, so the guest reaches every service bound to the host's loopback, and QEMU has no
//! option to turn that off (`restrict=on` also cuts outbound connections). passt runs with
//! `--no-map-gw`: the gateway it hands out by DHCP is the host's real gateway and leads to
//! the network, never to the host's loopback. Published ports are passt's `-t`/`-u` forwards,
//! bound to 127.0.0.1 only. Like slirp it needs no privilege.
//!
//! No orphan on any path: passt is spawned under a [`ProcessGuard`] (killed and reaped on
//! drop), and it is given its end of the socket pair with `-F`, which makes it exit when the
//! other end closes, i.e. when QEMU and fuse are gone, also after a SIGKILL of fuse (passt
//! drops privileges and enters namespaces of its own, which clears `PR_SET_PDEATHSIG`, so
//! that alone would not do).
//!
//! The guest gets the host's address, netmask and gateway from passt's DHCP (IPv6 by NDP and
//! DHCPv6 where the host has IPv6): the guest cannot reach the host under its own address
//! (that address is the guest's), and the gateway leads to the host's real gateway.
//!
//! Limit: this passt version (0.0~git20230309) also connects a guest's TCP SYN or UDP packet
//! *crafted* with a 127.0.0.1 destination. The guest kernel never routes 127.0.0.0/8 out of
//! eth0, so only a process with `CAP_NET_RAW` in the guest (an app run as root) could.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::config::{PortForward, Proto};
use super::machine::QEMU_NET_FD;
use super::process::ProcessGuard;
use crate::poll;

/// How long passt gets to bind the published ports (it starts in ~0.2 s).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const READY_INTERVAL: Duration = Duration::from_millis(5);
/// What passt logs (info level) when it acknowledges the guest's DHCP request: the guest's
/// network is about to be configured.
const DHCP_ACK: &str = "DHCP: ack to request";

/// passt could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("passt not found: the VM's network needs it (Debian/Ubuntu: apt-get install passt)")]
    Missing,
    #[error("Cannot start passt for the VM's network")]
    Spawn(#[source] io::Error),
    #[error("passt (the VM's network) failed: {0}")]
    Failed(String),
    #[error("passt (the VM's network) did not bind the published ports within {}s", READY_TIMEOUT.as_secs())]
    NotReady,
}

/// A running passt serving one VM.
#[derive(Debug)]
pub(crate) struct Passt {
    process: ProcessGuard,
    /// QEMU's end of the socket pair, until QEMU is spawned.
    qemu_end: Option<OwnedFd>,
    /// Private (0700) directory with passt's log; removed after passt is reaped.
    dir: tempfile::TempDir,
    forwards: Vec<PortForward>,
}

/// The `passt` binary: `$FUSE_PASST` if set, else `passt` on `PATH`.
fn find_passt() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FUSE_PASST").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("passt"))
        .find(|p| p.is_file())
}

/// passt's arguments for a VM with `forwards`, its end of the socket pair on `fd`.
pub(crate) fn passt_args(fd: RawFd, log: &Path, forwards: &[PortForward]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--foreground".into(),
        // The gateway address must not lead to the host's loopback (see the module docs).
        "--no-map-gw".into(),
        "--fd".into(),
        fd.to_string(),
        "--log-file".into(),
        log.display().to_string(),
    ];
    // One flag per port (passt rejects an address repeated in a comma list).
    // No flag: passt forwards nothing (its default).
    for f in forwards {
        let flag = match f.proto {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        };
        args.push(flag.into());
        args.push(format!("127.0.0.1/{}:{}", f.host, f.guest));
    }
    args
}

impl Passt {
    /// Spawns passt for a VM publishing `forwards`. Returns at once: call
    /// [`Passt::wait_ready`] after QEMU is spawned (passt's start overlaps QEMU's).
    pub(crate) fn spawn(forwards: &[PortForward]) -> Result<Passt, PasstError> {
        let binary = find_passt().ok_or(PasstError::Missing)?;
        let dir = tempfile::Builder::new()
            .prefix("fuse-net-")
            .tempdir()
            .map_err(PasstError::Spawn)?;
        let (passt_end, qemu_end) = UnixStream::pair().map_err(PasstError::Spawn)?;
        let (passt_end, qemu_end) = (OwnedFd::from(passt_end), OwnedFd::from(qemu_end));
        let fd = passt_end.as_raw_fd();
        let log = dir.path().join("passt.log");
        let mut cmd = Command::new(&binary);
        cmd.args(passt_args(fd, &log, forwards))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its messages go to the log file; stderr would only say syslog is unreachable.
            .stderr(Stdio::null());
        // SAFETY: fcntl is async-signal-safe; it only clears FD_CLOEXEC on passt's end (the
        // socket pair is close-on-exec, so no other child inherits either end).
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let process = ProcessGuard::spawn(&mut cmd).map_err(PasstError::Spawn)?;
        // passt has its copy: closing ours means passt sees EOF once QEMU's end closes.
        drop(passt_end);
        Ok(Passt {
            process,
            qemu_end: Some(qemu_end),
            dir,
            forwards: forwards.to_vec(),
        })
    }

    /// Makes `cmd` (QEMU) find its end of the socket pair on [`QEMU_NET_FD`].
    pub(crate) fn attach(&self, cmd: &mut Command) {
        let Some(end) = &self.qemu_end else { return };
        let fd = end.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe and only touch descriptors.
        unsafe {
            cmd.pre_exec(move || {
                let r = if fd == QEMU_NET_FD {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    // dup2 leaves FD_CLOEXEC clear on the copy.
                    libc::dup2(fd, QEMU_NET_FD)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// QEMU has been spawned (it holds its end): fuse's copy is closed.
    pub(crate) fn attached(&mut self) {
        self.qemu_end = None;
    }

    /// Waits until passt has bound every published port, or says why it stopped.
    pub(crate) fn wait_ready(&mut self) -> Result<(), PasstError> {
        let ready = poll::wait_until(READY_TIMEOUT, READY_INTERVAL, || {
            match self.process.try_wait() {
                Ok(Some(status)) => {
                    return Some(Err(PasstError::Failed(
                        self.last_error()
                            .unwrap_or_else(|| format!("it exited ({status})")),
                    )))
                }
                Err(e) => return Some(Err(PasstError::Spawn(e))),
                Ok(None) => {}
            }
            // The address summary is logged once passt has its configuration; the ports
            // are bound right after.
            let log = self.log_text();
            let configured = log.contains("DHCP:") || log.contains("NDP/DHCPv6:");
            (configured && self.forwards.iter().all(bound)).then_some(Ok(()))
        });
        ready.unwrap_or(Err(PasstError::NotReady))
    }

    /// The log passt writes (info level: its configuration, DHCP exchanges, errors).
    pub(crate) fn log_path(&self) -> PathBuf {
        self.dir.path().join("passt.log")
    }

    fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// passt's last `ERROR:` line, without its timestamp.
    fn last_error(&self) -> Option<String> {
        let text = self.log_text();
        let line = text.lines().rev().find(|l| l.contains("ERROR:"))?;
        let message = line.split_once("ERROR:").map_or(line, |(_, m)| m).trim();
        Some(match message {
            "External interface not usable" => {
                "the host has no usable network interface (no default route)".to_string()
            }
            other => other.to_string(),
        })
    }
}

/// Whether the host has a default route (IPv4 or IPv6): passt takes the guest's addresses
/// from that interface and refuses to start without one.
pub(crate) fn host_has_default_route() -> bool {
    let v4 = std::fs::read_to_string("/proc/net/route").is_ok_and(|t| {
        t.lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
    });
    // Destination ::/0: 32 zero digits, then prefix length 00.
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").is_ok_and(|t| {
        t.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some("00000000000000000000000000000000")
                && f.next() == Some("00")
                && !l.ends_with(" lo")
        })
    });
    v4 || v6
}

/// Whether passt's log at `log` shows it answered the guest's DHCP request: from then on the
/// guest's network stack answers (a port nothing listens on is refused at once).
pub fn guest_network_up(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|text| text.contains(DHCP_ACK))
}

/// Whether `fwd`'s host port is bound on 127.0.0.1 (a listening TCP socket, or a UDP socket),
/// from `/proc/net/{tcp,udp}`. The port was free before passt started (checked by the
/// caller), so the socket is passt's.
fn bound(fwd: &PortForward) -> bool {
    let (table, state) = match fwd.proto {
        Proto::Tcp => ("/proc/net/tcp", "0A"), // TCP_LISTEN
        Proto::Udp => ("/proc/net/udp", "07"), // TCP_CLOSE: an unconnected UDP socket
    };
    // 127.0.0.1 in /proc's host-order hex on a little- or big-endian host.
    let local = [
        format!("0100007F:{:04X}", fwd.host),
        format!("7F000001:{:04X}", fwd.host),
    ];
    std::fs::read_to_string(table).is_ok_and(|text| {
        text.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let addr = fields.next().unwrap_or("");
            let st = fields.nth(1).unwrap_or("");
            local.iter().any(|l| l == addr) && st == state
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, UdpSocket};

    #[test]
    fn test_args_publish_on_loopback_only() {
        let forwards: Vec<PortForward> = vec![
            "8080:80".parse().unwrap(),
            "8443:443".parse().unwrap(),
            "5353:53/udp".parse().unwrap(),
        ];
        let args = passt_args(7, Path::new("/d/passt.log"), &forwards).join(" ");
        assert_eq!(
            args,
            "--foreground --no-map-gw --fd 7 --log-file /d/passt.log \
             -t 127.0.0.1/8080:80 -t 127.0.0.1/8443:443 -u 127.0.0.1/5353:53"
        );
        let none = passt_args(3, Path::new("/l"), &[]).join(" ");
        assert!(!none.contains("-t") && !none.contains("-u"), "{none}");
    }

    #[test]
    fn test_bound_sees_listening_sockets() {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let t: PortForward = format!("{}:80", tcp.local_addr().unwrap().port())
            .parse()
            .unwrap();
        let u: PortForward = format!("{}:53/udp", udp.local_addr().unwrap().port())
            .parse()
            .unwrap();
        assert!(bound(&t) && bound(&u));
        drop((tcp, udp));
        assert!(!bound(&t) && !bound(&u));
    }
}
