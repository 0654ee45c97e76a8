//! Published ports and health checks: real boots, a tiny HTTP server in the guest, fetched
//! from the host through the forwarded port.

mod common;

use common::{Sandbox, HELLO};
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

/// A port free on 127.0.0.1 right now.
fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
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
    let id = out.stdout_str().trim().to_string();
    // Healthy means the guest really listens: the first request is answered.
    assert!(http_get(port, "/").contains("forwarded port"));
    sb.fuse()
        .env("FUSE_RUNTIME_DIR", &runtime)
        .args(["kill", &id])
        .run()
        .assert_success();
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
