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
    curl_with(port, path, &[])
}

/// `curl` with extra arguments (`-H`...).
fn curl_with(port: u16, path: &str, extra: &[&str]) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(extra)
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

/// `fuse build` of the nginx in `app` with its fuse.toml, `SOURCE_DATE_EPOCH` fixed.
fn build_nginx(sb: &Sandbox, app: &Path) -> fuse_tests::Output {
    let out = sb
        .fuse()
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .arg("build")
        .arg(app.join("debian/usr/sbin/nginx"))
        .arg("--config")
        .arg(app.join("fuse.toml"))
        .run();
    out.assert_success();
    out
}

/// Boots the image `nginx` with port 80 published; the running fuse, the host port and the
/// first answer to `GET path`.
fn boot_nginx(sb: &Sandbox, path: &str) -> (fuse_tests::Running, u16, String) {
    let port = free_port();
    let mut running = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--grace", "5", "-p"])
        .arg(format!("{port}:80"))
        .arg("nginx")
        .spawn();
    let first = wait_until(Duration::from_secs(240), Duration::from_millis(500), || {
        assert!(running.is_running(), "fuse exited before nginx answered");
        curl(port, path)
    })
    .expect("nginx never answered");
    (running, port, first)
}

#[test]
fn debian_nginx_serves_the_host_with_its_own_config() {
    let sb = Sandbox::new();
    let app = nginx_app(&sb, "\n[users]\nwww-data = 33\n");
    build_nginx(&sb, &app).assert_stderr_contains(
        "the app runs as root with capabilities chown, setgid, setuid only",
    );
    let (running, port, index) = boot_nginx(&sb, "/");
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
    build_nginx(&sb, &app);
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

/// Issue 12 item 8: a release that changes a page but not its size. nginx's ETag is
/// mtime-size and it answers 304 to a matching If-None-Match; with every file at time 0, a
/// client holding the old page kept it. File times now follow content (SOURCE_DATE_EPOCH
/// fixed in both builds: the same commit rebuilt), so the old ETag no longer matches.
#[test]
fn a_changed_page_of_the_same_size_is_not_answered_304() {
    let sb = Sandbox::new();
    let app = nginx_app(&sb, "\n[users]\nwww-data = 33\n");
    // Boots the image with `page`; returns its ETag, after checking what a client holding
    // `held` (an earlier ETag) gets.
    let serve = |page: &str, held: Option<&str>| -> String {
        sb.dir.write("app/html/notes.txt", page);
        build_nginx(&sb, &app);
        let (running, port, first) = boot_nginx(&sb, "/notes.txt");
        let etag = header(&first, "ETag").expect("an ETag").to_string();
        // The client's revalidation of what it holds: 304 for the same page.
        let again = curl_with(
            port,
            "/notes.txt",
            &["-H", &format!("If-None-Match: {etag}")],
        )
        .expect("conditional GET");
        assert!(again.starts_with("HTTP/1.1 304 "), "{again}");
        // A client holding the previous release's page: the new page, not 304.
        if let Some(held) = held {
            let revalidated = curl_with(
                port,
                "/notes.txt",
                &["-H", &format!("If-None-Match: {held}")],
            )
            .expect("conditional GET");
            assert!(revalidated.starts_with("HTTP/1.1 200 "), "{revalidated}");
            assert_eq!(body(&revalidated), page);
        }
        running.signal(libc::SIGTERM);
        running.wait().assert_code(0);
        etag
    };
    let (v1, v2) = ("release 1 of the notes\n", "release 2 of the notes\n");
    assert_eq!(v1.len(), v2.len());
    let old = serve(v1, None);
    let new = serve(v2, Some(&old));
    assert_ne!(old, new, "same size, other content: another ETag");
    assert_no_leaked_qemu();
}
