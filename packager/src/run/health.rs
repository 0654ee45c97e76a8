//! Health checks: `fuse run` waits until the app answers through its published port.
//!
//! The probe runs in its own thread while the runner's loop passes the console on; it goes
//! through the forwarded host port, as a client would. Healthy: a line
//! `ready in N ms at http://localhost:PORT` on stderr (N from QEMU's spawn). Not healthy
//! within the timeout: the VM is stopped through a [`StopRequest`] and the run fails.
//!
//! With user-mode networking (passt) a TCP connect to the host port always succeeds at once:
//! passt accepts, then asks the guest. Once the guest's network is up the guest refuses a
//! port nothing listens on at once, and passt closes our connection; before that the guest
//! does not answer at all and the connection just stays open. So a `tcp` check counts only
//! once passt has answered the guest's DHCP request (its log says so) and a little later
//! ([`NET_SETTLE`]: the init configures the address right after), and then needs the
//! connection to stay open for [`PASST_TCP_SETTLE`] (a refusal is a round trip through the
//! guest, slow under TCG on a loaded host). On a host without a default route the VM has
//! QEMU's slirp instead, which also accepts at once: there QMP's `info usernet` says whether
//! the guest accepted. An `http` check needs a real HTTP status line.

use anyhow::{bail, Result};
use fuse_boot::poll;
use fuse_boot::vm::{GuestNetwork, PortForward, Proto, StopRequest};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The default time an app gets to become healthy (boots under TCG take seconds).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Between two probes.
const INTERVAL: Duration = Duration::from_millis(200);
/// How long a `tcp` connection must stay open to count (see the module documentation).
const TCP_SETTLE: Duration = Duration::from_millis(500);
/// The same through passt: the guest's refusal reaches us only after a round trip through a
/// guest that may be emulated on a loaded host.
const PASST_TCP_SETTLE: Duration = Duration::from_millis(2000);
/// How long after passt's DHCP answer a `tcp` probe trusts the guest to answer (the init sets
/// the address within milliseconds of the answer; this is far more).
const NET_SETTLE: Duration = Duration::from_millis(300);
/// Between two looks at QEMU's `info usernet` (slirp fallback).
const USERNET_INTERVAL: Duration = Duration::from_millis(50);
/// Connect, read and write timeouts of one probe.
const PROBE_IO: Duration = Duration::from_secs(2);

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HealthKind {
    /// `GET path` must answer with a 2xx or 3xx status.
    Http { path: String },
    /// A TCP connection must be accepted by the guest.
    Tcp,
}

/// A health check: what to probe, on which guest port, for how long at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct HealthCheck {
    pub(crate) kind: HealthKind,
    /// The port in the guest; `None`: the guest port of the first published TCP port.
    pub(crate) guest_port: Option<u16>,
    pub(crate) timeout: Duration,
}

impl FromStr for HealthCheck {
    type Err = String;

    /// `http:/PATH[@PORT]`, `tcp[@PORT]` (the `--health` flag); the timeout is the default.
    fn from_str(s: &str) -> Result<Self, String> {
        let invalid = || {
            format!("invalid health check '{s}': use http:/PATH[@GUEST_PORT] or tcp[@GUEST_PORT], e.g. http:/healthz@8080")
        };
        let (what, port) = match s.rsplit_once('@') {
            Some((what, port)) => {
                let port = port
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(invalid)?;
                (what, Some(port))
            }
            None => (s, None),
        };
        let kind = if what == "tcp" {
            HealthKind::Tcp
        } else if let Some(path) = what.strip_prefix("http:") {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(invalid());
            }
            HealthKind::Http { path: path.into() }
        } else {
            return Err(invalid());
        };
        Ok(HealthCheck {
            kind,
            guest_port: port,
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

impl HealthCheck {
    /// The host port that reaches the checked guest port.
    pub(crate) fn host_port(&self, forwards: &[PortForward]) -> Result<u16> {
        self.ports(forwards).map(|(host, _)| host)
    }

    /// The checked (host port, guest port).
    pub(crate) fn ports(&self, forwards: &[PortForward]) -> Result<(u16, u16)> {
        let tcp = || forwards.iter().filter(|f| f.proto == Proto::Tcp);
        let Some(guest) = self.guest_port.or_else(|| tcp().next().map(|f| f.guest)) else {
            bail!("The health check needs a published TCP port: add -p HOST:GUEST");
        };
        match tcp().find(|f| f.guest == guest) {
            Some(f) => Ok((f.host, guest)),
            None => bail!(
                "The health check probes guest port {guest}, but no -p publishes it: add -p HOST:{guest}"
            ),
        }
    }

    /// Where the app is reached from the host, for the ready line.
    pub(crate) fn url(&self, host_port: u16) -> String {
        match &self.kind {
            HealthKind::Http { .. } => format!("http://localhost:{host_port}"),
            HealthKind::Tcp => format!("tcp://localhost:{host_port}"),
        }
    }

    /// One probe through `host_port`; the error says what was seen. `guest` says what is known
    /// of the guest's side (see [`Guest`]).
    pub(crate) fn probe(&self, host_port: u16, guest: Guest<'_>) -> Result<(), String> {
        if let HealthKind::Http { path } = &self.kind {
            return match http_status(host_port, path)? {
                200..=399 => Ok(()),
                status => Err(format!("answered HTTP {status}")),
            };
        }
        if guest == (Guest::Passt { net_up: false }) {
            return Err("the guest's network is not up yet".into());
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, host_port));
        let mut stream = TcpStream::connect_timeout(&addr, PROBE_IO).map_err(|e| e.to_string())?;
        let _ = stream.set_write_timeout(Some(PROBE_IO));
        match &self.kind {
            HealthKind::Tcp if matches!(guest, Guest::Usernet { .. }) => {
                let Guest::Usernet { port: guest, qmp } = guest else {
                    unreachable!("matched")
                };
                // Our connection (kept open) makes QEMU connect to the guest.
                let accepted = poll::wait_until(TCP_SETTLE, USERNET_INTERVAL, || {
                    match fuse_boot::qmp::human_monitor(qmp, "info usernet") {
                        Err(e) => Some(Err(fuse_boot::error::with_causes(&e))),
                        Ok(info) => {
                            fuse_boot::qmp::usernet_established(&info, guest).then_some(Ok(()))
                        }
                    }
                });
                accepted.unwrap_or_else(|| {
                    Err(format!("guest port {guest} does not accept connections"))
                })
            }
            HealthKind::Tcp => {
                // A guest under TCG on a loaded host can take well over TCP_SETTLE to refuse.
                let settle = match guest {
                    Guest::Passt { .. } => PASST_TCP_SETTLE,
                    _ => TCP_SETTLE,
                };
                let _ = stream.set_read_timeout(Some(settle));
                let mut byte = [0u8; 1];
                match stream.read(&mut byte) {
                    Ok(0) => Err("connection closed (nothing listens in the guest yet)".into()),
                    Ok(_) => Ok(()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            HealthKind::Http { .. } => unreachable!("answered above"),
        }
    }
}

/// One HTTP/1.0 GET of `path` through `127.0.0.1:port`: the status code, or why there is none.
/// Shared by the health wait of `fuse run` and the HTTP expectation of `fuse test`.
pub(crate) fn http_status(port: u16, path: &str) -> Result<u16, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_IO).map_err(|e| e.to_string())?;
    let _ = stream.set_read_timeout(Some(PROBE_IO));
    let _ = stream.set_write_timeout(Some(PROBE_IO));
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\nUser-Agent: fuse\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        // QEMU's user network accepts, then closes when nothing listens in the guest yet.
        return Err("connection closed without an answer".into());
    }
    line.strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP answer: '{line}'"))
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            HealthKind::Http { path } => write!(f, "GET {path}")?,
            HealthKind::Tcp => write!(f, "TCP connect")?,
        }
        if let Some(port) = self.guest_port {
            write!(f, " on guest port {port}")?;
        }
        Ok(())
    }
}

/// A probe running in its own thread; see [`spawn`].
#[derive(Debug)]
pub(crate) struct Probe {
    done: Arc<AtomicBool>,
    ready: Arc<Mutex<Option<Duration>>>,
    thread: Option<JoinHandle<()>>,
}

impl Probe {
    /// When the app became healthy (from QEMU's spawn), if it did.
    pub(crate) fn ready_after(&self) -> Option<Duration> {
        *self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops probing (the VM is gone) and waits for the thread.
    pub(crate) fn finish(mut self) -> Option<Duration> {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.ready_after()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// What a probe knows of the guest's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Guest<'a> {
    /// Nothing: a connection that stays open counts.
    Unknown,
    /// passt: whether the guest's network answers by now.
    Passt { net_up: bool },
    /// QEMU's slirp (a host without a default route), which accepts every host connection
    /// itself: whether the guest accepted on `port` is asked through QMP (`info usernet`).
    Usernet { port: u16, qmp: &'a Path },
}

/// Where a probe learns about the guest's side: the VM's network, the guest port probed, and
/// QEMU's QMP socket.
pub(crate) struct GuestSide {
    pub(crate) network: Option<GuestNetwork>,
    pub(crate) port: Option<u16>,
    pub(crate) qmp_socket: PathBuf,
}

/// Probes `check` through `host_port` every 200 ms from now until healthy (then calls
/// `on_ready` with the time since `started`), or until `started + check.timeout` (then asks
/// the run loop to stop the VM through `stop`).
pub(crate) fn spawn(
    check: HealthCheck,
    host_port: u16,
    side: GuestSide,
    started: Instant,
    stop: Arc<StopRequest>,
    on_ready: Box<dyn FnOnce(Duration) + Send>,
) -> Probe {
    let done = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Mutex::new(None));
    let thread = {
        let (done, ready) = (done.clone(), ready.clone());
        std::thread::spawn(move || {
            let mut net_up_at: Option<Instant> = None;
            let mut last = String::new();
            let remaining = check.timeout.saturating_sub(started.elapsed());
            // `Some(true)`: healthy; `Some(false)`: the VM is gone, nothing to report.
            let outcome = poll::wait_until(remaining, INTERVAL, || {
                if done.load(Ordering::SeqCst) {
                    return Some(false);
                }
                let guest = match (&side.network, side.port) {
                    (Some(GuestNetwork::Passt { log }), _) => {
                        if net_up_at.is_none() && fuse_boot::vm::guest_network_up(log) {
                            net_up_at = Some(Instant::now());
                        }
                        Guest::Passt {
                            net_up: net_up_at.is_some_and(|at| at.elapsed() >= NET_SETTLE),
                        }
                    }
                    (Some(GuestNetwork::SlirpRestricted), Some(port)) => Guest::Usernet {
                        port,
                        qmp: &side.qmp_socket,
                    },
                    _ => Guest::Unknown,
                };
                match check.probe(host_port, guest) {
                    Ok(()) => Some(true),
                    Err(e) => {
                        last = e;
                        None
                    }
                }
            });
            match outcome {
                Some(true) => {
                    let after = started.elapsed();
                    *ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(after);
                    on_ready(after);
                }
                Some(false) => {}
                None => stop.abort(format!(
                    "Health check failed: {check} at {} did not succeed within {}s (last: {last})",
                    check.url(host_port),
                    check.timeout.as_secs_f64()
                )),
            }
        })
    };
    Probe {
        done,
        ready,
        thread: Some(thread),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_the_flag() {
        let h: HealthCheck = "http:/healthz@8080".parse().unwrap();
        assert_eq!(
            h.kind,
            HealthKind::Http {
                path: "/healthz".into()
            }
        );
        assert_eq!(h.guest_port, Some(8080));
        let t: HealthCheck = "tcp".parse().unwrap();
        assert_eq!((t.kind, t.guest_port), (HealthKind::Tcp, None));
        for bad in ["http:healthz", "udp", "tcp@0", "http:/a@x", ""] {
            assert!(bad.parse::<HealthCheck>().is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_the_host_port() {
        let fwds: Vec<PortForward> = vec![
            "53:53/udp".parse().unwrap(),
            "8080:80".parse().unwrap(),
            "9000:9001".parse().unwrap(),
        ];
        let mut h: HealthCheck = "tcp".parse().unwrap();
        assert_eq!(h.host_port(&fwds).unwrap(), 8080);
        h.guest_port = Some(9001);
        assert_eq!(h.host_port(&fwds).unwrap(), 9000);
        h.guest_port = Some(53);
        let err = h.host_port(&fwds).unwrap_err().to_string();
        assert!(err.contains("no -p publishes it"), "{err}");
        assert!(h.host_port(&[]).is_err());
    }

    #[test]
    fn http_probe_needs_a_good_status() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.0 503 Unavailable\r\n\r\n",
                "HTTP/1.0 200 OK\r\n\r\nok",
            ] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).unwrap();
                assert!(buf.starts_with(b"GET /healthz HTTP/1.0\r\n"));
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        let h: HealthCheck = "http:/healthz".parse().unwrap();
        assert!(h.probe(port, Guest::Unknown).unwrap_err().contains("503"));
        h.probe(port, Guest::Unknown).unwrap();
        server.join().unwrap();
        assert_eq!(h.url(port), format!("http://localhost:{port}"));
    }

    #[test]
    fn http_status_reads_the_status_line() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for answer in ["HTTP/1.1 404 Not Found\r\n\r\n", "", "garbage\r\n"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                assert!(buf[..n].starts_with(b"GET /x HTTP/1.0\r\n"));
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        assert_eq!(http_status(port, "/x"), Ok(404));
        assert!(http_status(port, "/x").unwrap_err().contains("closed"));
        assert!(http_status(port, "/x")
            .unwrap_err()
            .contains("not an HTTP answer"));
        server.join().unwrap();
    }
}
