//! Real software as it ships: Debian's nginx (`apt-get download nginx nginx-common`, extracted,
//! never installed) with Debian's own `nginx.conf`, changed only in its two log paths, run as a
//! fuse image (examples/nginx, the README's) and reached from the host by curl. Its `user www-data;` needs the `[users]`
//! table: without it nginx stops at `getpwnam("www-data")`.

mod common;

use common::{free_port, Sandbox};
use fuse_boot::poll::wait_until;
use fuse_tests::assert_no_leaked_qemu;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// examples/nginx, the README's: its Makefile downloads Debian's nginx (`apt-get download`,
/// `dpkg-deb -x`: never installed) and writes its nginx.conf; fuse.toml packages them.
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/nginx");

/// A copy of examples/nginx in the sandbox, made (`make -f examples/nginx/Makefile`) there, with
/// a second page; `users` replaces the example's `[users]` table. Returns the app directory.
fn nginx_app(sb: &Sandbox, users: &str) -> PathBuf {
    let app = sb.dir.join("app");
    let example = Path::new(EXAMPLE);
    for file in ["fuse.toml", "temp-paths.conf", "html/index.html"] {
        let text = std::fs::read_to_string(example.join(file)).unwrap();
        let text = match file {
            "fuse.toml" => {
                let table = "\n[users]\nwww-data = 33\n";
                assert_eq!(text.matches(table).count(), 1, "{text}");
                // A second page: [files] is the example's last table.
                text.replace(table, users) + "\"/var/www/html/notes.txt\" = \"html/notes.txt\"\n"
            }
            _ => text,
        };
        sb.dir.write(format!("app/{file}"), text);
    }
    sb.dir
        .write("app/html/notes.txt", "a plain file, served as is\n");
    let out = Command::new("make")
        .arg("-f")
        .arg(example.join("Makefile"))
        .current_dir(&app)
        .output()
        .expect("make is needed");
    assert!(
        out.status.success(),
        "make -f examples/nginx/Makefile (apt-get download: is deb.debian.org reachable, `apt-get update` done?): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Debian's nginx.conf, but for its two log paths: the worker user, the pid file and
    // everything else as Debian ships it.
    let debian = std::fs::read_to_string(app.join("debian/etc/nginx/nginx.conf")).unwrap();
    let ours = std::fs::read_to_string(app.join("nginx.conf")).unwrap();
    let changed: Vec<(&str, &str)> = debian
        .lines()
        .zip(ours.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(
        changed,
        [
            ("error_log /var/log/nginx/error.log;", "error_log stderr;"),
            (
                "\taccess_log /var/log/nginx/access.log;",
                "\taccess_log /dev/stdout;"
            ),
        ]
    );
    assert_eq!(debian.lines().count(), ours.lines().count());
    assert!(debian.starts_with("user www-data;\n") && debian.contains("\npid /run/nginx.pid;\n"));
    app
}

/// `curl -sS -i http://127.0.0.1:port/path`: the status line, headers and body.
fn curl(port: u16, path: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl is needed (ci/setup installs it)");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[test]
fn debian_nginx_serves_the_host_with_its_own_config() {
    let sb = Sandbox::new();
    let app = nginx_app(&sb, "\n[users]\nwww-data = 33\n");
    sb.fuse()
        .arg("build")
        .arg(app.join("debian/usr/sbin/nginx"))
        .arg("--config")
        .arg(app.join("fuse.toml"))
        .run()
        .assert_success()
        .assert_stderr_contains(
            "the app runs as root with capabilities chown, setgid, setuid only",
        );

    let port = free_port();
    let mut running = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--grace", "5", "-p"])
        .arg(format!("{port}:80"))
        .arg("nginx")
        .spawn();
    let index = wait_until(Duration::from_secs(240), Duration::from_millis(500), || {
        assert!(running.is_running(), "fuse exited before nginx answered");
        curl(port, "/")
    })
    .expect("nginx never answered");
    assert!(index.starts_with("HTTP/1.1 200 OK\r\n"), "{index}");
    assert!(
        header(&index, "Server").is_some_and(|s| s.starts_with("nginx/")),
        "{index}"
    );
    assert_eq!(body(&index), "<h1>nginx in a fuse image</h1>\n");
    // A file by name, with the headers a static server gives (times are not asserted: the
    // image's file times are fuse's business).
    let notes = curl(port, "/notes.txt").expect("GET /notes.txt");
    assert!(notes.starts_with("HTTP/1.1 200 OK\r\n"), "{notes}");
    assert_eq!(
        header(&notes, "Content-Type"),
        Some("text/plain"),
        "{notes}"
    );
    assert!(header(&notes, "Last-Modified").is_some(), "{notes}");
    assert_eq!(body(&notes), "a plain file, served as is\n");
    // Debian's site: `try_files $uri $uri/ =404`.
    let missing = curl(port, "/missing").expect("GET /missing");
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");

    // nginx stops on SIGTERM (fast shutdown) and exits 0; its access log went to the console.
    running.signal(libc::SIGTERM);
    let out = running.wait();
    out.assert_code(0)
        .assert_stdout_contains("\"GET /notes.txt HTTP/1.1\" 200 27 ")
        .assert_stdout_contains("\"GET /missing HTTP/1.1\" 404 ")
        // The image's health check (fuse.toml) passed through the published port.
        .assert_stderr_contains(&format!(" ms at http://localhost:{port}\n"));
    assert!(
        !out.stdout_str().contains("[emerg]") && !out.stdout_str().contains("[alert]"),
        "nginx reported no error: {out}"
    );
    assert_no_leaked_qemu();
}

#[test]
fn without_its_user_in_the_image_debian_nginx_stops_at_getpwnam() {
    let sb = Sandbox::new();
    let app = nginx_app(&sb, "\n");
    sb.fuse()
        .arg("build")
        .arg(app.join("debian/usr/sbin/nginx"))
        .arg("--config")
        .arg(app.join("fuse.toml"))
        .run()
        .assert_success();
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "nginx"])
        .timeout(Duration::from_secs(240))
        .run();
    // The guest's console (nginx's stderr included) is fuse's stdout.
    out.assert_code(1)
        .assert_stdout_contains("[emerg]")
        .assert_stdout_contains("getpwnam(\"www-data\") failed in /etc/nginx/nginx.conf:1");
    assert_no_leaked_qemu();
}
