//! A deployment's configuration as a cloud hands it over, without a boot: `fuse userdata`
//! (the JSON user-data), `fuse export --format nocloud` (a NoCloud seed disk holding it), the
//! refusals of `fuse run --seed/--metadata-server`, and `fuse __relay`, the program QEMU runs
//! per guest connection to the metadata server.

mod common;

use common::{assert_one_error, Sandbox};
use fuse_tests::FuseCmd;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const SHOW: &str = r#"
#include <stdio.h>
int main(int argc, char **argv) { for (int i = 0; i < argc; i++) printf("arg %s\n", argv[i]); return 0; }
"#;

const CONFIG: &str = r#"
name = "cfg"
version = "1.0"
[environments.dev.env]
LEVEL = "debug"
[environments.prod.env]
LEVEL = "warn"
"#;

/// Builds the image `cfg:1.0` (environments dev and prod) in the sandbox.
fn image(sb: &Sandbox) {
    let exe = sb.program(SHOW, "show", &["-static"]);
    sb.dir.write("fuse.toml", CONFIG);
    sb.fuse().arg("build").arg(&exe).run().assert_success();
}

fn mode(path: &Path) -> u32 {
    path.metadata().unwrap().permissions().mode() & 0o777
}

#[test]
fn userdata_is_the_deployments_json_on_one_line() {
    let sb = Sandbox::new();
    image(&sb);
    let env_file = sb.dir.write("deploy.env", "FROM_FILE=f\nA=file\n");
    let out = sb
        .fuse()
        .env("TOKEN", "from-host")
        .args(["userdata", "cfg:1.0", "--env", "prod", "--env-file"])
        .arg(&env_file)
        .args([
            "-e",
            "MSG=two\nlines \"q\" é",
            "-e",
            "A=first",
            "-e",
            "TOKEN",
        ])
        .args(["-e", "A=last", "--", "--port", "8080"])
        .run();
    out.assert_success();
    assert_eq!(
        out.stdout_str(),
        "{\"fuse\":1,\"environment\":\"prod\",\"env\":{\"FROM_FILE\":\"f\",\"A\":\"last\",\
         \"MSG\":\"two\\nlines \\\"q\\\" é\",\"TOKEN\":\"from-host\"},\"args\":[\"--port\",\"8080\"]}\n"
    );
    // Nothing given: the version alone (the image's environment and arguments stay).
    let bare = sb.fuse().args(["userdata", "cfg:1.0"]).run();
    bare.assert_success();
    assert_eq!(bare.stdout_str(), "{\"fuse\":1}\n");

    // -o: 0600, the same bytes, replacing a file whole.
    let path = sb.dir.join("user-data.json");
    std::fs::write(&path, "old").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let written = sb
        .fuse()
        .args(["userdata", "cfg:1.0", "-e", "A=1", "-o"])
        .arg(&path)
        .run();
    written.assert_success();
    assert!(written.stdout_str().is_empty(), "{written}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "{\"fuse\":1,\"env\":{\"A\":\"1\"}}\n"
    );
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn bad_selections_are_refused_before_anything_is_written() {
    let sb = Sandbox::new();
    image(&sb);
    let out_path = sb.dir.join("ud.json");
    let seed_path = sb.dir.join("seed.img");
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--env", "staging"],
            &["'staging' is not defined", "dev, prod"],
        ),
        (&["-e", "BAD KEY=1"], &["Invalid -e BAD KEY=1"]),
        (&["-e", "UNSET_IN_HOST"], &["UNSET_IN_HOST is not set"]),
        (&["--env-file", "/nonexistent.env"], &["/nonexistent.env"]),
    ];
    for (flags, needles) in cases {
        let out = sb
            .fuse()
            .env_remove("UNSET_IN_HOST")
            .args(["userdata", "cfg:1.0", "-o"])
            .arg(&out_path)
            .args(flags)
            .run();
        assert_one_error(&out, needles);
        assert!(!out_path.exists(), "{flags:?} wrote {}", out_path.display());
        let out = sb
            .fuse()
            .env_remove("UNSET_IN_HOST")
            .args(["export", "cfg:1.0", "--format", "nocloud", "-o"])
            .arg(&seed_path)
            .args(flags)
            .run();
        assert_one_error(&out, needles);
        assert!(
            !seed_path.exists(),
            "{flags:?} wrote {}",
            seed_path.display()
        );
    }
    // A value larger than a Linux program takes (from a file: no command line holds it).
    let big = sb
        .dir
        .write("big.env", format!("BIG={}\n", "x".repeat(200_000)));
    let out = sb
        .fuse()
        .args(["userdata", "cfg:1.0", "--env-file"])
        .arg(&big)
        .run();
    assert_one_error(&out, &["The variable BIG is", "MAX_ARG_STRLEN"]);
    assert!(out.stdout_str().is_empty(), "{out}");
    // Not an image of the store.
    let out = sb.fuse().args(["userdata", "nosuch:1.0"]).run();
    assert_one_error(&out, &["No image 'nosuch:1.0'"]);
}

/// The long names of the files of a FAT volume, with their short names, as dosfstools'
/// `fsck.vfat -l` lists them (`Checking file /user-data (USER-D~1)`); asserts it is clean.
fn fsck_names(path: &Path) -> Vec<(String, String)> {
    let out = std::process::Command::new("fsck.vfat")
        .args(["-n", "-l"])
        .arg(path)
        .output()
        .expect("fsck.vfat (dosfstools, installed by ci/setup) is needed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "fsck.vfat -n failed:\n{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("Checking file /"))
        .filter_map(|l| {
            let (long, short) = l.split_once(" (")?;
            Some((long.to_string(), short.trim_end_matches(')').to_string()))
        })
        .collect()
}

/// The label and the files (short name, contents) of a FAT volume, read with `fatfs`.
fn fat_files(bytes: &[u8]) -> (String, Vec<(String, Vec<u8>)>) {
    let mut disk = std::io::Cursor::new(bytes.to_vec());
    let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
    let label = String::from_utf8_lossy(fs.volume_label_as_bytes()).into_owned();
    let mut files = Vec::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.unwrap();
        if entry.is_file() {
            let mut contents = Vec::new();
            entry.to_file().read_to_end(&mut contents).unwrap();
            let name = String::from_utf8_lossy(entry.short_file_name_as_bytes()).into_owned();
            files.push((name, contents));
        }
    }
    (label, files)
}

#[test]
fn nocloud_export_is_a_deterministic_cidata_seed_with_the_userdata() {
    let sb = Sandbox::new();
    image(&sb);
    let flags = ["--env", "prod", "-e", "MSG=a \"quoted\"\nvalue", "--", "x"];
    let userdata = sb.fuse().arg("userdata").arg("cfg:1.0").args(flags).run();
    userdata.assert_success();
    let digest = common::image_digest(&sb, "cfg:1.0");

    let export = |name: &str| -> PathBuf {
        let path = sb.dir.join(name);
        let out = sb
            .fuse()
            .args(["export", "cfg:1.0", "--format", "nocloud", "-o"])
            .arg(&path)
            .args(flags)
            .run();
        out.assert_success();
        assert_eq!(out.stdout_str(), format!("{} nocloud\n", path.display()));
        path
    };
    let (a, b) = (export("a.img"), export("b.img"));
    let bytes = std::fs::read(&a).unwrap();
    assert!(bytes == std::fs::read(&b).unwrap(), "two exports differ");
    assert_eq!(bytes.len(), 1 << 20);
    assert_eq!(mode(&a), 0o600);

    let (label, files) = fat_files(&bytes);
    assert_eq!(label, "CIDATA");
    let names = fsck_names(&a);
    let long: Vec<&str> = names.iter().map(|(l, _)| l.as_str()).collect();
    assert!(
        long.contains(&"user-data") && long.contains(&"meta-data"),
        "{names:?}"
    );
    let contents = |wanted: &str| {
        let short = &names.iter().find(|(l, _)| l == wanted).unwrap().1;
        files
            .iter()
            .find(|(s, _)| s == short)
            .map(|(_, c)| String::from_utf8(c.clone()).unwrap())
            .unwrap_or_else(|| panic!("{wanted} ({short}) not in {files:?}"))
    };
    assert_eq!(contents("user-data"), userdata.stdout_str());
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert_eq!(
        contents("meta-data"),
        format!("instance-id: fuse-{}\n", &hex[..12])
    );
}

#[test]
fn selection_flags_are_only_for_a_seed_and_refused_with_a_cloud_channel() {
    let sb = Sandbox::new();
    image(&sb);
    let raw = sb.dir.join("disk.raw");
    let out = sb
        .fuse()
        .args(["export", "cfg:1.0", "--format", "raw", "-e", "A=1", "-o"])
        .arg(&raw)
        .run();
    assert_one_error(&out, &["go in a seed disk (--format nocloud)", "raw"]);
    assert!(!raw.exists());

    // --seed / --metadata-server: fuse passes no configuration, so none may be given.
    let seed = sb.dir.write("seed.img", "not checked before the flags");
    for (flags, needles) in [
        (
            vec!["--seed", seed.to_str().unwrap(), "-e", "A=1"],
            vec!["-e cannot be used with --seed", "fuse userdata"],
        ),
        (
            vec!["--metadata-server", "127.0.0.1:9", "--env", "prod"],
            vec!["--env cannot be used with --metadata-server", "nocloud"],
        ),
        (
            vec!["--seed", "/nonexistent/seed.img", "--", "arg"],
            vec!["Arguments after -- cannot be used with --seed"],
        ),
        (
            vec!["--metadata-server", "127.0.0.1:9", "-v", "db:/data"],
            vec!["-v cannot be used with --metadata-server"],
        ),
        (
            vec!["--seed", "/nonexistent/seed.img"],
            vec!["Cannot read the seed disk /nonexistent/seed.img"],
        ),
        (
            vec!["--metadata-server", "169.254.169.254"],
            vec!["Invalid --metadata-server '169.254.169.254': give HOST:PORT"],
        ),
    ] {
        for command in ["run", "test"] {
            let out = sb.fuse().arg(command).arg("cfg:1.0").args(&flags).run();
            assert_one_error(&out, &needles);
            assert!(out.stdout_str().is_empty(), "{out}");
        }
    }
    fuse_tests::assert_no_leaked_qemu();
}

/// A server on 127.0.0.1 that reads a request to its end (`http`: to its blank line, as an
/// HTTP server does; else to EOF, which the relay must pass on), answers and closes; returns
/// its port and what it read.
fn one_shot_server(answer: &'static [u8], http: bool) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut request = Vec::new();
        if http {
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).unwrap();
                request.push(byte[0]);
            }
        } else {
            conn.read_to_end(&mut request).unwrap();
        }
        conn.write_all(answer).unwrap();
        conn.shutdown(Shutdown::Both).unwrap();
        request
    });
    (port, server)
}

#[test]
fn relay_copies_both_ways_and_exits_when_both_ended() {
    // Pipes for stdin and stdout.
    let (port, server) = one_shot_server(b"HTTP/1.0 200 OK\r\n\r\nuser-data\n", false);
    let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = FuseCmd::new()
        .args(["__relay", &format!("127.0.0.1:{port}")])
        .stdin(request.clone())
        .timeout(Duration::from_secs(30))
        .run();
    out.assert_success();
    assert!(out.stderr_str().is_empty(), "{out}");
    assert_eq!(out.stdout_str(), "HTTP/1.0 200 OK\r\n\r\nuser-data\n");
    assert!(
        server.join().unwrap() == request,
        "the server got other bytes"
    );

    // One socket for stdin, stdout and stderr, as QEMU's guestfwd gives it, and a client that
    // keeps its side open until the answer ended (as an HTTP client may): the answer's end
    // must reach it while the relay still reads.
    let (port, server) = one_shot_server(b"answer", true);
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = std::os::fd::OwnedFd::from(theirs);
    let mut child = std::process::Command::new(fuse_tests::fuse_bin())
        .args(["__relay", &format!("127.0.0.1:{port}")])
        .stdin(fd.try_clone().unwrap())
        .stdout(fd.try_clone().unwrap())
        .stderr(fd)
        .spawn()
        .unwrap();
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    ours.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    ours.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"answer", "nothing but the answer (no stderr text)");
    assert_eq!(server.join().unwrap(), b"GET / HTTP/1.0\r\n\r\n");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the relay waits for our end"
    );
    ours.shutdown(Shutdown::Write).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");

    // No server: exit 1, and not a byte on the connection.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let out = FuseCmd::new()
        .args(["__relay", &format!("127.0.0.1:{port}")])
        .stdin(b"GET / HTTP/1.0\r\n\r\n".to_vec())
        .run();
    out.assert_code(1);
    assert!(
        out.stdout_str().is_empty() && out.stderr_str().is_empty(),
        "{out}"
    );
}

#[test]
fn help_names_the_new_flags_and_the_relay_stays_hidden() {
    let top = FuseCmd::new().arg("--help").run();
    top.assert_success();
    assert!(top.stdout_str().contains("userdata"), "{top}");
    assert!(!top.stdout_str().contains("__relay"), "{top}");
    let run = FuseCmd::new().args(["run", "--help"]).run();
    for flag in ["--seed <FILE>", "--metadata-server <HOST:PORT>"] {
        assert!(run.stdout_str().contains(flag), "{flag}:\n{run}");
    }
    let export = FuseCmd::new().args(["export", "--help"]).run();
    assert!(
        export.stdout_str().contains("nocloud") && export.stdout_str().contains("not the image"),
        "{export}"
    );
}

/// Reads the seed disk's block device attributes, asks 169.254.169.254:80 (twice: the relay
/// serves each connection), and tries the slirp gateway's view of the host's loopback.
const CLOUD_CLIENT: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>
static void show(const char *path) {
    char buf[64] = "";
    FILE *f = fopen(path, "r");
    if (f && fgets(buf, sizeof buf, f)) buf[strcspn(buf, "\n")] = 0;
    printf("%s: %s\n", path, f ? buf : "(none)");
    if (f) fclose(f);
}
/* Connects within 3 s (polling the connect), or returns -1. */
static int dial(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0 && errno != EINPROGRESS) { close(s); return -1; }
    struct pollfd p = { .fd = s, .events = POLLOUT };
    int err = 0; socklen_t len = sizeof err;
    if (poll(&p, 1, 3000) != 1 || getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) || err) { close(s); return -1; }
    fcntl(s, F_SETFL, 0);
    return s;
}
int main(int argc, char **argv) {
    /* The first virtio disk after the root: vdb, or vda on the cloud machine (NVMe root). */
    show("/sys/block/vda/ro");
    show("/sys/block/vda/size");
    show("/sys/block/vdb/ro");
    show("/sys/block/vdb/size");
    /* 169.254.169.x are addresses of QEMU's user-mode network, inside the VM: the metadata
       server's is relayed to the host's 127.0.0.1, the gateway's (.2) is slirp's own. */
    for (int i = 0; i < 2; i++) {
        int s = -1;
        for (int t = 0; t < 20 && s < 0; t++) if ((s = dial("169.254.169.254", 80)) < 0) sleep(1);
        if (s < 0) { printf("metadata: unreachable\n"); return 1; }
        const char *req = "GET /latest/user-data HTTP/1.0\r\n\r\n";
        if (write(s, req, strlen(req)) < 0) return 1;
        char buf[512]; ssize_t n; size_t got = 0;
        while (got < sizeof buf - 1 && (n = read(s, buf + got, sizeof buf - 1 - got)) > 0) got += n;
        buf[got] = 0;
        char *body = strstr(buf, "\r\n\r\n");
        printf("metadata %d: %s\n", i, body ? body + 4 : buf);
        close(s);
    }
    int other = dial("169.254.169.2", atoi(argv[1]));
    printf("host loopback through the gateway: %s\n", other < 0 ? "blocked" : "REACHED");
    return 0;
}
"#;

/// `fuse run --seed --metadata-server` on both machines, booted: the seed is a read-only
/// virtio disk of the seed's size after the root (no volume here: vdb, or vda beside the cloud
/// machine's NVMe root), the guest's 169.254.169.254:80
/// reaches a server on the host's 127.0.0.1 connection after connection (QEMU spawns `fuse
/// __relay` for each, as nobody when fuse runs as root), and nothing else of the host is
/// reachable (slirp's `restrict=on`).
#[test]
fn seed_and_metadata_server_reach_the_guest() {
    let sb = Sandbox::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port().to_string();
    let exe = sb.program(CLOUD_CLIENT, "cloudclient", &["-static"]);
    sb.dir.write(
        "fuse.toml",
        format!("name = \"cc\"\nversion = \"1.0\"\nargs = [\"{other_port}\"]\n"),
    );
    sb.fuse().arg("build").arg(&exe).run().assert_success();
    let seed = sb.dir.join("seed.img");
    sb.fuse()
        .args(["export", "cc:1.0", "--format", "nocloud", "-o"])
        .arg(&seed)
        .run()
        .assert_success();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && conn.read_exact(&mut byte).is_ok() {
                request.push(byte[0]);
            }
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = format!("served {n} {}", String::from_utf8_lossy(&request[..3]));
            let _ = write!(conn, "HTTP/1.0 200 OK\r\n\r\n{body}");
        }
    });
    for (machine, disk) in [("virtio", "vdb"), ("cloud", "vda")] {
        let before = served.load(std::sync::atomic::Ordering::SeqCst);
        let out = sb
            .fuse()
            .args([
                "run",
                "--accel",
                "tcg",
                "--timeout",
                "120",
                "--machine",
                machine,
            ])
            .arg("--seed")
            .arg(&seed)
            .args(["--metadata-server", &format!("127.0.0.1:{port}"), "cc:1.0"])
            .run();
        out.assert_success();
        let text = out.stdout_str();
        for want in [
            format!("/sys/block/{disk}/ro: 1"),
            format!("/sys/block/{disk}/size: 2048"),
            format!("metadata 0: served {before} GET"),
            format!("metadata 1: served {} GET", before + 1),
            "host loopback through the gateway: blocked".into(),
        ] {
            assert!(text.contains(&want), "{machine}: '{want}' missing\n{out}");
        }
    }
    drop(other);
    fuse_tests::assert_no_leaked_qemu();
}
