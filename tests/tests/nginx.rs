//! Real software as it ships: Debian's nginx (`apt-get download nginx nginx-common`, extracted,
//! never installed) with Debian's own `nginx.conf`, changed only in its two log paths, run as a
//! fuse image and reached from the host by curl. Its `user www-data;` needs the `[users]`
//! table: without it nginx stops at `getpwnam("www-data")`.

mod common;

use common::{free_port, Sandbox};
use fuse_boot::poll::wait_until;
use fuse_tests::assert_no_leaked_qemu;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Downloads Debian's `packages` (the host's release and architecture) with `apt-get download`
/// into `dir/debs` and extracts them, as `dpkg-deb -x` does, into `dir/root`, which it returns.
fn debian_packages(dir: &Path, packages: &[&str]) -> PathBuf {
    let debs = dir.join("debs");
    let root = dir.join("root");
    std::fs::create_dir_all(&debs).unwrap();
    let out = Command::new("apt-get")
        .arg("download")
        .args(packages)
        .current_dir(&debs)
        .output()
        .expect("apt-get (Debian) is needed");
    assert!(
        out.status.success(),
        "apt-get download {packages:?} failed (is deb.debian.org reachable, `apt-get update` done?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for deb in std::fs::read_dir(&debs).unwrap() {
        let deb = deb.unwrap().path();
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&root)
            .status()
            .unwrap();
        assert!(status.success(), "dpkg-deb -x {}", deb.display());
    }
    root
}

/// Debian's nginx.conf with its two log paths on the console: the root is read-only.
fn nginx_conf(debian: &str) -> String {
    let mut conf = debian.to_string();
    for (from, to) in [
        (
            "\nerror_log /var/log/nginx/error.log;\n",
            "\nerror_log stderr;\n",
        ),
        (
            "\n\taccess_log /var/log/nginx/access.log;\n",
            "\n\taccess_log /dev/stdout;\n",
        ),
    ] {
        assert_eq!(
            conf.matches(from).count(),
            1,
            "Debian's nginx.conf has {from:?}"
        );
        conf = conf.replace(from, to);
    }
    // Everything else as Debian ships it, the worker user included.
    assert!(conf.starts_with("user www-data;\n") && conf.contains("\npid /run/nginx.pid;\n"));
    conf
}

/// The app directory: fuse.toml (with `users`, the `[users]` table or nothing), the config
/// files Debian's nginx reads, and the site's files.
fn nginx_app(sb: &Sandbox, root: &Path, users: &str) -> PathBuf {
    let debian_conf = std::fs::read_to_string(root.join("etc/nginx/nginx.conf")).unwrap();
    sb.dir.write("app/nginx.conf", nginx_conf(&debian_conf));
    // nginx.conf includes conf.d/*.conf in `http`: nginx's temporary files go to /tmp (its
    // compiled-in /var/lib/nginx is on the read-only root).
    sb.dir.write(
        "app/temp-paths.conf",
        "client_body_temp_path /tmp/nginx-body;\nproxy_temp_path /tmp/nginx-proxy;\n\
         fastcgi_temp_path /tmp/nginx-fastcgi;\nuwsgi_temp_path /tmp/nginx-uwsgi;\n\
         scgi_temp_path /tmp/nginx-scgi;\n",
    );
    sb.dir
        .write("app/html/index.html", "<h1>nginx in a fuse image</h1>\n");
    sb.dir
        .write("app/html/notes.txt", "a plain file, served as is\n");
    let debian = root.display();
    sb.dir.write(
        "app/fuse.toml",
        format!(
            r#"name = "nginx"
# The master starts as root, as Debian's service does; its workers switch to www-data.
user = "root"
args = ["-e", "stderr", "-g", "daemon off;"]
{users}
[ports]
http = 80

[files]
"/etc/nginx/nginx.conf" = "nginx.conf"
"/etc/nginx/mime.types" = "{debian}/etc/nginx/mime.types"
"/etc/nginx/sites-enabled/default" = "{debian}/etc/nginx/sites-available/default"
"/etc/nginx/conf.d/temp-paths.conf" = "temp-paths.conf"
"/var/www/html/index.html" = "html/index.html"
"/var/www/html/notes.txt" = "html/notes.txt"
"#
        ),
    )
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
    let root = debian_packages(sb.dir.path(), &["nginx", "nginx-common"]);
    nginx_app(&sb, &root, "\n[users]\nwww-data = 33\n");
    let config = sb.dir.join("app/fuse.toml");
    sb.fuse()
        .arg("build")
        .arg(root.join("usr/sbin/nginx"))
        .arg("--config")
        .arg(&config)
        .run()
        .assert_success()
        .assert_stderr_contains("the app runs as root");

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
        .assert_stdout_contains("\"GET /missing HTTP/1.1\" 404 ");
    assert!(
        !out.stdout_str().contains("[emerg]") && !out.stdout_str().contains("[alert]"),
        "nginx reported no error: {out}"
    );
    assert_no_leaked_qemu();
}

#[test]
fn without_its_user_in_the_image_debian_nginx_stops_at_getpwnam() {
    let sb = Sandbox::new();
    let root = debian_packages(sb.dir.path(), &["nginx", "nginx-common"]);
    nginx_app(&sb, &root, "");
    sb.fuse()
        .arg("build")
        .arg(root.join("usr/sbin/nginx"))
        .arg("--config")
        .arg(sb.dir.join("app/fuse.toml"))
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
