//! Published ports and health checks: real boots, a tiny HTTP server in the guest, fetched
//! from the host through the forwarded port.

mod common;

use common::{free_port, Detached, Sandbox, HELLO};
use fuse_boot::poll::wait_until;
use fuse_tests::assert_no_leaked_qemu;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

/// Listens on 8080 in the guest and answers every request with 200 and a fixed body.
pub const WEB: &str = r#"
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0) { perror("listen"); return 1; }
    printf("listening on 8080\n");
    fflush(stdout);
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        char buf[2048];
        (void)read(c, buf, sizeof buf);
        const char *r = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello over the forwarded port\n";
        (void)write(c, r, strlen(r));
        close(c);
    }
}
"#;

fn http_get(port: u16, path: &str) -> String {
    try_http_get(port, path).unwrap()
}

fn try_http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Polls `GET /` on the host port until it answers 200 (bounded), while fuse keeps running;
/// returns the whole answer.
fn wait_for_200(running: &mut fuse_tests::Running, port: u16) -> String {
    let answer = wait_until(Duration::from_secs(200), Duration::from_millis(200), || {
        assert!(running.is_running(), "fuse exited early");
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.starts_with("HTTP/1.0 200").then_some(body)
    });
    answer.expect("never answered")
}

#[test]
fn published_port_with_health_wait_serves_the_host() {
    let sb = Sandbox::new();
    let app = sb.program(WEB, "web", &["-static"]);
    let port = free_port();
    let mut running = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--grace", "2", "-p"])
        .arg(format!("{port}:8080"))
        .args(["--health", "http:/health@8080", "--health-timeout", "120"])
        .arg(&app)
        .spawn();
    // The command runs until stopped; watch for the host side to answer.
    let body = wait_for_200(&mut running, port);
    assert!(body.ends_with("hello over the forwarded port\n"), "{body}");
    assert!(http_get(port, "/again").contains("forwarded port"));
    // Stopped by SIGTERM (default action in the app): 128 + 15, in time.
    running.signal(libc::SIGTERM);
    let out = running.wait();
    out.assert_code(143)
        .assert_stdout_contains("listening on 8080")
        .assert_stderr_contains("ready in ")
        .assert_stderr_contains(&format!(" ms at http://localhost:{port}\n"));
    assert_no_leaked_qemu();
}

#[test]
fn health_check_that_never_passes_stops_the_vm() {
    let sb = Sandbox::new();
    // Exits never, listens never: the health check must time out.
    let app = sb.program(common::NEVER_EXITS, "silent", &["-static"]);
    let port = free_port();
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "-p"])
        .arg(format!("{port}:8080"))
        .args(["--health", "tcp", "--health-timeout", "15"])
        .arg(&app)
        .run();
    out.assert_code(1)
        .assert_stderr_contains("Health check failed")
        .assert_stderr_contains("the VM was stopped");
    assert!(!out.stderr_str().contains("ready in"), "{out}");
    assert_no_leaked_qemu();
}

#[test]
fn port_in_use_fails_before_anything_boots() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = sb
        .fuse()
        .args(["run", "-p"])
        .arg(format!("{port}:8080"))
        .arg(&app)
        .run();
    out.assert_code(1).assert_stderr_contains(&format!(
        "fuse: error: Host port {port} is already in use on 127.0.0.1"
    ));
    assert_eq!(out.stderr_str().lines().count(), 1, "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    // Not even built: the check comes before the build, so nothing booted.
    let ls = sb.fuse().arg("ls").run();
    ls.assert_success();
    assert_eq!(ls.stdout_str().lines().count(), 1, "{ls}");
    drop(taken);
    assert_no_leaked_qemu();
}

#[test]
fn bad_ports_are_one_line_errors() {
    let sb = Sandbox::new();
    let out = sb.fuse().args(["run", "-p", "70000:80", "x"]).run();
    out.assert_failure()
        .assert_stderr_contains("port 70000 is out of range: use 1 to 65535");
    let out = sb.fuse().args(["run", "-p", "0:80", "x"]).run();
    out.assert_failure()
        .assert_stderr_contains("port 0 is not a port");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let out = sb.fuse().args(["run", "-p", "80:80", "x"]).run();
        out.assert_code(1).assert_stderr_contains("is privileged");
    }
}

#[test]
fn tcp_health_check_passes_once_the_guest_listens_detached() {
    let sb = Sandbox::new();
    let app = sb.program(WEB, "web", &["-static"]);
    let port = free_port();
    let runtime = sb.dir.join("run");
    let out = sb
        .fuse()
        .env("FUSE_RUNTIME_DIR", &runtime)
        .args(["run", "-d", "--accel", "tcg", "-p"])
        .arg(format!("{port}:8080"))
        .args(["--health", "tcp"])
        .arg(&app)
        .run();
    out.assert_success()
        .assert_stderr_contains(&format!(" ms at tcp://localhost:{port}\n"));
    let instance = Detached::new(&sb, &runtime, out.stdout_str().trim());
    // Healthy means the guest really listens: the first request is answered.
    assert!(http_get(port, "/").contains("forwarded port"));
    instance.kill().assert_success();
    assert_no_leaked_qemu();
}

#[test]
fn image_config_publishes_its_ports_and_waits_on_its_health_check() {
    let sb = Sandbox::new();
    // The guest listens on a port free on the host too: the image's named ports are published
    // on the same host port.
    let port = free_port();
    let app = sb.program(&WEB.replace("8080", &port.to_string()), "web", &["-static"]);
    sb.dir.write(
        "fuse.toml",
        format!(
            "[ports]\nhttp = {port}\n\n[healthcheck]\nhttp = \"/health\"\nport = \"http\"\ntimeout = \"120s\"\n"
        ),
    );
    // No -p and no --health on the command line: both come from the image.
    let mut running = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--grace", "2"])
        .arg(&app)
        .spawn();
    let body = wait_for_200(&mut running, port);
    assert!(body.ends_with("hello over the forwarded port\n"), "{body}");
    running.signal(libc::SIGTERM);
    let out = running.wait();
    out.assert_code(143)
        .assert_stderr_contains("ready in ")
        .assert_stderr_contains(&format!(" ms at http://localhost:{port}\n"));
    assert_no_leaked_qemu();
}

/// Tries to reach the host from the guest: a TCP connect (2 s at most) to `$PROBE_PORT` on
/// every address the guest knows for the host (its default gateway, slirp's 10.0.2.2 and
/// 10.0.2.3, its DNS servers, its own address: passt gives the guest the host's) and to each
/// `ADDR:PORT` of `$PROBE_TARGETS`; prints `probe ADDR:PORT -> ` and the first line the server
/// sent, or the error. Then serves HTTP on 8080 until stopped.
const PROBE: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

/* Connects to `a` with a 2 s limit and prints what it answered: "connected: BANNER" or why not. */
static void connect_and_read(const struct sockaddr *a, socklen_t alen) {
    int s = socket(a->sa_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int r = connect(s, a, alen);
    if (r < 0 && errno == EINPROGRESS) {
        struct pollfd p = {.fd = s, .events = POLLOUT};
        if (poll(&p, 1, 2000) == 0) { printf("timeout\n"); close(s); return; }
        int err = 0; socklen_t len = sizeof err;
        getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
        r = err ? -1 : 0; errno = err;
    }
    if (r < 0) { printf("%s\n", strerror(errno)); close(s); return; }
    char buf[128] = {0};
    struct pollfd p = {.fd = s, .events = POLLIN};
    if (poll(&p, 1, 2000) > 0) {
        ssize_t n = read(s, buf, sizeof buf - 1);
        if (n > 0) buf[n] = 0;
    }
    buf[strcspn(buf, "\r\n")] = 0;
    printf("connected: %s\n", buf);
    close(s);
}

static void probe(const char *addr, int port) {
    printf("probe %s:%d -> ", addr, port);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1) { printf("bad address\n"); return; }
    connect_and_read((struct sockaddr *)&a, sizeof a);
}

/* The same over IPv6; `hex` is an address as /proc/net writes it. */
static void probe6(const char *hex, int port) {
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    for (int i = 0; i < 16; i++) sscanf(hex + 2 * i, "%2hhx", &a.sin6_addr.s6_addr[i]);
    if (IN6_IS_ADDR_LINKLOCAL(&a.sin6_addr)) a.sin6_scope_id = if_nametoindex("eth0");
    char text[INET6_ADDRSTRLEN];
    inet_ntop(AF_INET6, &a.sin6_addr, text, sizeof text);
    printf("probe [%s]:%d -> ", text, port);
    connect_and_read((struct sockaddr *)&a, sizeof a);
}

int main(void) {
    int port = atoi(getenv("PROBE_PORT") ? getenv("PROBE_PORT") : "0");
    char addrs[16][64]; int n = 0;
    FILE *f = fopen("/proc/net/route", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f)) {
        char ifname[32]; unsigned dst, gw;
        if (sscanf(line, "%31s %x %x", ifname, &dst, &gw) == 3 && dst == 0 && gw) {
            struct in_addr g = {.s_addr = gw};
            snprintf(addrs[n++], 64, "%s", inet_ntoa(g));
        }
    }
    snprintf(addrs[n++], 64, "10.0.2.2");
    snprintf(addrs[n++], 64, "10.0.2.3");
    f = fopen("/etc/resolv.conf", "r");
    while (f && n < 15 && fgets(line, sizeof line, f)) {
        char ns[64];
        if (sscanf(line, "nameserver %63s", ns) == 1) snprintf(addrs[n++], 64, "%s", ns);
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr = {0};
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
    if (ioctl(s, SIOCGIFADDR, &ifr) == 0 && n < 16)
        snprintf(addrs[n++], 64, "%s", inet_ntoa(((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr));
    close(s);
    for (int i = 0; i < n; i++) probe(addrs[i], port);
    /* IPv6 (passt's router advertisement; give SLAAC a moment): the default gateway and the
       global address of eth0. */
    sleep(2);
    f = fopen("/proc/net/ipv6_route", "r");
    while (f && fgets(line, sizeof line, f)) {
        char dst[33], len[3], src[33], slen[3], hop[33];
        if (sscanf(line, "%32s %2s %32s %2s %32s", dst, len, src, slen, hop) == 5 &&
            !strcmp(dst, "00000000000000000000000000000000") && !strcmp(len, "00") &&
            strcmp(hop, "00000000000000000000000000000000"))
            probe6(hop, port);
    }
    f = fopen("/proc/net/if_inet6", "r");
    while (f && fgets(line, sizeof line, f)) {
        char addr[33], ifname[32]; unsigned idx, plen, scope, flags;
        if (sscanf(line, "%32s %x %x %x %x %31s", addr, &idx, &plen, &scope, &flags, ifname) == 6 &&
            scope == 0 && !strcmp(ifname, "eth0"))
            probe6(addr, port);
    }
    char *targets = getenv("PROBE_TARGETS");
    for (char *t = targets ? strtok(targets, " ") : NULL; t; t = strtok(NULL, " ")) {
        char *colon = strrchr(t, ':');
        if (!colon) continue;
        *colon = 0;
        probe(t, atoi(colon + 1));
    }
    printf("probes done\n");
    fflush(stdout);

    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080)};
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 16) < 0) { perror("listen"); return 1; }
    for (;;) {
        int c = accept(l, 0, 0);
        if (c < 0) continue;
        char buf[2048];
        (void)read(c, buf, sizeof buf);
        const char *r = "HTTP/1.0 200 OK\r\n\r\nserved by the guest\n";
        (void)write(c, r, strlen(r));
        close(c);
    }
}
"#;

/// The host side of the tests below: a network namespace of their own, so that whatever the
/// guest tries reaches nothing but it. It has `lo`, and a tap device (nothing reads it: its
/// link stays down, a black hole) holding the "host's" address 198.51.100.2/24 (which passt
/// hands the guest) and 198.51.100.10 (another machine's stand-in: a server the guest may
/// reach), with the default route via 198.51.100.1. Runs `f` on a thread in that namespace:
/// the sockets it opens and the processes it starts (fuse, passt, QEMU) live there.
fn in_test_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    in_netns(
        &[
            "link set lo up",
            "tuntap add dev fuse0 mode tap",
            "link set fuse0 up",
            "addr add 198.51.100.2/24 dev fuse0",
            "addr add 198.51.100.10/24 dev fuse0",
            "route add default via 198.51.100.1",
            // IPv6 too; passt also needs a link-local address, which a link without carrier
            // does not get by itself.
            "addr add 2001:db8::2/64 dev fuse0 nodad",
            "addr add fe80::2/64 dev fuse0 nodad",
            "-6 route add default via 2001:db8::1",
        ],
        f,
    )
}

/// Runs `f` on a thread in a new network namespace set up by the `ip` commands `setup`.
fn in_netns<T: Send>(setup: &[&str], f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only changes this thread's network namespace.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            let err = std::io::Error::last_os_error();
            assert_eq!(r, 0, "unshare(CLONE_NEWNET): {err}");
            for cmd in setup {
                let out = std::process::Command::new("ip")
                    .args(cmd.split(' '))
                    .output()
                    .expect("ip (iproute2) is needed");
                assert!(out.status.success(), "ip {cmd}: {out:?}");
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// These tests need root to make network namespaces: without it they fail, rather than pass
/// having checked nothing (CI runs as root).
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "needs root to make a network namespace (run the suite as root, as CI does)"
    );
}

/// A TCP server on `addr` that sends `banner` to every client; counts them.
fn banner_server(
    addr: (Ipv4Addr, u16),
    banner: &'static str,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind(addr).unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = c.write_all(banner.as_bytes());
        }
    });
    (port, count)
}

/// The pids of passt processes in this thread's network namespace.
fn passt_processes_here() -> Vec<u32> {
    let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.starts_with(" Z")));
            comm.starts_with("passt")
                && !zombie
                && std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|n| n == ours)
        })
        .collect()
}

/// The `ip` commands of a namespace with only `lo`: a host without a default route.
const OFFLINE: &[&str] = &["link set lo up"];

/// Runs the probe app for `arch` in a test namespace: the guest must not reach a server on the
/// namespace's 127.0.0.1 (by any address it knows for the host), must reach a server on
/// another address (outbound, unless `offline`: a namespace with `lo` only, where the VM gets
/// the slirp fallback), and its published port must serve the host, with a `tcp` health check.
fn guest_cannot_reach_host_loopback(arch: &str, offline: bool) {
    use std::sync::atomic::Ordering;
    require_root();
    let run = || {
        let sb = Sandbox::new();
        let app = sb.program_for(arch, PROBE, "probe", &["-static"]);
        let (secret_port, secret_hits) =
            banner_server((Ipv4Addr::LOCALHOST, 0), "HOST-LOOPBACK-SECRET\n");
        // The same port on ::1 (free there too, almost surely: fail loudly if not).
        let secret6 = TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, secret_port))
            .expect("the secret port is free on ::1");
        secret6.set_nonblocking(true).unwrap();
        let other = match offline {
            true => Ipv4Addr::LOCALHOST,
            false => Ipv4Addr::new(198, 51, 100, 10),
        };
        let (out_port, out_hits) = banner_server((other, 0), "OUTBOUND-OK\n");
        let port = free_port();
        // Detached: `fuse run -d` returns once the health check passed, i.e. after the probes.
        let runtime = sb.dir.join("run");
        let started = sb
            .fuse()
            .env("FUSE_RUNTIME_DIR", &runtime)
            .args(["run", "-d", "--arch", arch, "--accel", "tcg", "-p"])
            .arg(format!("{port}:8080"))
            .args(["--health", "tcp", "--health-timeout", "120"])
            .args(["-e", &format!("PROBE_PORT={secret_port}")])
            .args(["-e", &format!("PROBE_TARGETS={other}:{out_port}")])
            .arg(&app)
            .run();
        started
            .assert_success()
            .assert_stderr_contains(&format!(" ms at tcp://localhost:{port}\n"));
        let id = started.stdout_str().trim().to_string();
        // Stops the instance also when an assertion below fails.
        let instance = Detached::new(&sb, &runtime, &id);
        // passt accepts for the guest before the guest listens, which a TCP health check
        // under load can take for the server: the page is polled, bounded.
        let page = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
            try_http_get(port, "/")
                .ok()
                .filter(|b| b.ends_with("served by the guest\n"))
        });
        assert!(
            page.is_some(),
            "the guest's server never answered on {port}"
        );
        assert_eq!(
            passt_processes_here().is_empty(),
            offline,
            "passt serves the VM"
        );
        let out = sb
            .fuse()
            .env("FUSE_RUNTIME_DIR", &runtime)
            .args(["logs", &id])
            .run();
        out.assert_success().assert_stdout_contains("probes done");
        let stdout = out.stdout_str();
        eprintln!("{stdout}");
        instance.kill().assert_success();
        let addrs = match offline {
            // slirp's gateway and DNS, and the address it gives the guest.
            true => ["10.0.2.2", "10.0.2.3", "10.0.2.15"],
            false => ["198.51.100.1", "10.0.2.2", "198.51.100.2"],
        };
        for addr in addrs {
            assert!(
                stdout.contains(&format!("probe {addr}:{secret_port} -> ")),
                "{addr} was not probed:\n{out}"
            );
        }
        assert!(
            !stdout.contains("HOST-LOOPBACK-SECRET"),
            "the guest reached the host's loopback:\n{out}"
        );
        assert_eq!(secret_hits.load(Ordering::SeqCst), 0, "{out}");
        assert!(secret6.accept().is_err(), "the guest reached ::1:\n{out}");
        if !offline {
            // passt's IPv6: the guest's gateway (link-local) and its own global address.
            assert!(
                stdout.contains("probe [fe80::"),
                "no IPv6 gateway probed:\n{out}"
            );
            assert!(
                stdout.contains("probe [2001:db8::"),
                "no IPv6 address probed:\n{out}"
            );
        }
        let outbound = format!("probe {other}:{out_port} -> connected: OUTBOUND-OK");
        match offline {
            // 127.0.0.1 from the guest is the guest's own loopback.
            true => assert!(!stdout.contains(&outbound), "{out}"),
            false => assert!(stdout.contains(&outbound), "outbound failed:\n{out}"),
        }
        assert_eq!(
            out_hits.load(Ordering::SeqCst),
            usize::from(!offline),
            "{out}"
        );
        let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            passt_processes_here().is_empty().then_some(())
        });
        assert!(
            gone.is_some(),
            "passt outlived the VM: {:?}",
            passt_processes_here()
        );
        assert_no_leaked_qemu();
    };
    match offline {
        true => in_netns(OFFLINE, run),
        false => in_test_netns(run),
    }
}

#[test]
fn guest_cannot_reach_host_loopback_x86_64() {
    guest_cannot_reach_host_loopback("x86_64", false);
}

#[test]
fn guest_cannot_reach_host_loopback_aarch64() {
    guest_cannot_reach_host_loopback("aarch64", false);
}

/// On a host without a default route passt cannot start: the VM gets QEMU's slirp with
/// `restrict=on` (no connection from the guest at all), the published port still works.
#[test]
fn offline_host_falls_back_to_restricted_slirp() {
    guest_cannot_reach_host_loopback("x86_64", true);
}

/// A SIGKILLed fuse leaves neither QEMU nor passt behind.
#[test]
fn sigkill_of_fuse_leaves_no_passt() {
    require_root();
    in_test_netns(|| {
        let sb = Sandbox::new();
        let app = sb.program(WEB, "web", &["-static"]);
        let port = free_port();
        let mut running = sb
            .fuse()
            .args(["run", "--accel", "tcg", "-p"])
            .arg(format!("{port}:8080"))
            .arg(&app)
            .spawn();
        wait_for_200(&mut running, port);
        assert_eq!(passt_processes_here().len(), 1);
        running.signal(libc::SIGKILL);
        running.wait();
        let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            passt_processes_here().is_empty().then_some(())
        });
        assert!(
            gone.is_some(),
            "passt outlived fuse: {:?}",
            passt_processes_here()
        );
        assert_no_leaked_qemu();
    });
}

/// passt failing is one line naming the cause, and no VM is left.
#[test]
fn passt_failure_is_one_line_error() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    let out = sb
        .fuse()
        .env("FUSE_PASST", "/bin/false")
        .args(["run", "--accel", "tcg", "-p"])
        .arg(format!("{}:8080", free_port()))
        .arg(&app)
        .run();
    out.assert_code(1)
        .assert_stderr_contains("passt (the VM's network) failed: it exited (exit status: 1)");
    assert_eq!(out.stderr_str().lines().count(), 1, "{out}");
    assert!(out.stdout.is_empty(), "the app never ran: {out}");
    assert_no_leaked_qemu();
}
