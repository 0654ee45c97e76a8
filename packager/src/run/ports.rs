//! Published ports (`fuse run -p HOST:GUEST`): parsing with clear messages, and the checks
//! made before boot so a port problem is one line, not a QEMU failure after the build.
//!
//! Ports are forwarded by the VM's user-mode network (passt's `-t`/`-u`, see
//! `fuse_boot::vm`), bound to 127.0.0.1 only: rootless, and nothing is exposed beyond the host.

use anyhow::{bail, Result};
use fuse_boot::vm::{PortForward, Proto};
use std::io;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};

/// Bit of `CAP_NET_BIND_SERVICE` in the capability sets of `/proc/self/status`.
const CAP_NET_BIND_SERVICE: u32 = 10;

/// Parses `HOST:GUEST[/tcp|/udp]` or `PORT`, saying which part is wrong (clap value parser).
pub(crate) fn parse_publish(s: &str) -> Result<PortForward, String> {
    let ports = s.split_once('/').map_or(s, |(ports, _)| ports);
    for part in ports.split(':') {
        match part.parse::<u64>() {
            Ok(0) => return Err("port 0 is not a port: use 1 to 65535".to_string()),
            Ok(p) if p > 65535 => return Err(format!("port {p} is out of range: use 1 to 65535")),
            _ => {}
        }
    }
    s.parse::<PortForward>().map_err(|e| e.to_string())
}

/// The lowest port an unprivileged process may bind (Linux's
/// `net.ipv4.ip_unprivileged_port_start`, 1024 unless changed).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// This process's effective capability set, from `/proc/self/status`.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Whether a process with this euid and effective capabilities may bind `port`.
pub(crate) fn may_bind(port: u16, euid: u32, cap_eff: u64, unprivileged_start: u16) -> bool {
    port >= unprivileged_start || euid == 0 || cap_eff & (1 << CAP_NET_BIND_SERVICE) != 0
}

/// Checks every forward before boot: no host port twice, no privileged port without the
/// privilege, no port already in use on 127.0.0.1.
pub(crate) fn check_host_ports(forwards: &[PortForward]) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let caps = effective_capabilities();
    let start = unprivileged_port_start();
    for (i, fwd) in forwards.iter().enumerate() {
        if forwards[..i]
            .iter()
            .any(|f| f.host == fwd.host && f.proto == fwd.proto)
        {
            bail!(
                "Host port {}/{} is published twice: give each -p its own host port",
                fwd.host,
                fwd.proto.as_str()
            );
        }
        if !may_bind(fwd.host, euid, caps, start) {
            bail!(
                "Host port {} is privileged (below {start}): run as root, or publish a port from {start} up, e.g. -p {}:{}",
                fwd.host,
                8000 + fwd.guest % 1000,
                fwd.guest
            );
        }
        if let Err(e) = try_bind(fwd) {
            if e.kind() == io::ErrorKind::AddrInUse {
                bail!(
                    "Host port {} is already in use on 127.0.0.1: stop what listens there, or publish another, e.g. -p {}:{}",
                    fwd.host,
                    fwd.host.wrapping_add(1).max(1024),
                    fwd.guest
                );
            }
            bail!("Cannot use host port {} on 127.0.0.1: {e}", fwd.host);
        }
    }
    Ok(())
}

/// Binds the host side of `fwd` for a moment, as passt will. (There is a short window in
/// which another process could take the port; passt then fails to bind it and fuse says so.)
fn try_bind(fwd: &PortForward) -> io::Result<()> {
    match fwd.proto {
        Proto::Tcp => TcpListener::bind((Ipv4Addr::LOCALHOST, fwd.host)).map(drop),
        Proto::Udp => UdpSocket::bind((Ipv4Addr::LOCALHOST, fwd.host)).map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_ports_need_root_or_the_capability() {
        let cap = 1u64 << CAP_NET_BIND_SERVICE;
        assert!(!may_bind(80, 1000, 0, 1024));
        assert!(!may_bind(1023, 1000, 1 << 12, 1024));
        assert!(may_bind(80, 0, 0, 1024), "root may");
        assert!(may_bind(80, 1000, cap, 1024), "CAP_NET_BIND_SERVICE may");
        assert!(may_bind(1024, 1000, 0, 1024));
        assert!(
            may_bind(80, 1000, 0, 80),
            "lowered ip_unprivileged_port_start"
        );
    }

    #[test]
    fn out_of_range_ports_say_so() {
        assert_eq!(
            parse_publish("70000:80").unwrap_err(),
            "port 70000 is out of range: use 1 to 65535"
        );
        assert_eq!(
            parse_publish("8080:0").unwrap_err(),
            "port 0 is not a port: use 1 to 65535"
        );
        assert!(parse_publish("a:b")
            .unwrap_err()
            .contains("expected HOST:GUEST"));
        let p = parse_publish("8080:80").unwrap();
        assert_eq!((p.host, p.guest), (8080, 80));
        assert_eq!(parse_publish("53:53/udp").unwrap().proto, Proto::Udp);
    }

    #[test]
    fn port_in_use_is_reported() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let fwd: PortForward = format!("{port}:80").parse().unwrap();
        let err = check_host_ports(&[fwd]).unwrap_err().to_string();
        assert!(err.contains("already in use"), "{err}");
        drop(taken);
        check_host_ports(&[fwd]).unwrap();
        let err = check_host_ports(&[fwd, fwd]).unwrap_err().to_string();
        assert!(err.contains("published twice"), "{err}");
    }
}
