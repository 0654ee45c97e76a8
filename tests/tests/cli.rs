//! CLI tests without a boot: naming, digests, the store, inspect, and the error cases (each a
//! one-line error, a non-zero exit, and nothing stored).

mod common;

use common::{json, Sandbox, HELLO};
use fuse_tests::FuseCmd;
use std::os::fd::FromRawFd;
use std::process::Command;

#[test]
fn build_names_stores_and_inspects_an_image() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let out = sb.fuse().arg("build").arg(&app).run();
    out.assert_success();
    let line = out.stdout_str();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], "hello:1.0", "{out}");
    assert!(
        fields[1].starts_with("sha256:") && fields[1].len() == 71,
        "{out}"
    );

    let built = sb.build_json(&app);
    assert_eq!(built["image"], "hello:1.0");
    assert_eq!(built["digest"], fields[1], "same input, same digest");
    let size = built["size"].as_u64().unwrap();

    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "hello:1.0"])
            .run()
            .assert_success(),
    );
    assert_eq!(inspect["digest"], fields[1]);
    assert_eq!(inspect["arch"], "x86_64");
    assert_eq!(inspect["app"]["exe"], "/app/hello-1.0");
    let parts: u64 = ["kernel", "init", "rootfs", "appfs"]
        .iter()
        .map(|c| inspect[c]["size"].as_u64().unwrap())
        .sum();
    assert!(
        parts < size && size - parts < 4096,
        "sizes add up: {parts} vs {size}"
    );
    assert!(inspect["contents"]["largest"][0]["path"].is_string());

    let human = sb.fuse().args(["inspect", "hello"]).run();
    human
        .assert_success()
        .assert_stdout_contains("Largest files:");

    let ls = json(sb.fuse().args(["ls", "--json"]).run().assert_success());
    assert_eq!(ls.as_array().unwrap().len(), 1);
    sb.fuse().args(["rm", "hello:1.0"]).run().assert_success();
    let ls = json(sb.fuse().args(["ls", "--json"]).run().assert_success());
    assert!(ls.as_array().unwrap().is_empty());
    let blobs = std::fs::read_dir(sb.home().join("images/blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "rm collects unused blobs");
}

#[test]
fn same_input_gives_the_same_digest_in_another_store() {
    let a = Sandbox::new();
    let b = Sandbox::new();
    let app = a.program(HELLO, "hello", &["-static"]);
    let da = a.build_json(&app);
    // A copy elsewhere, with another mtime: the image must not notice.
    let copy = b.dir.join("hello");
    std::fs::copy(&app, &copy).unwrap();
    let db = b.build_json(&copy);
    assert_eq!(da["digest"], db["digest"]);
}

#[test]
fn root_filesystem_holds_the_app_and_its_libraries_only() {
    let sb = Sandbox::new();
    let app = sb.program("#include <math.h>\n#include <stdio.h>\nint main(int c, char **v){printf(\"%f\\n\", sqrt(c));return 0;}", "mathy", &["-lm"]);
    sb.fuse().arg("build").arg(&app).run().assert_success();
    let listing = sb.rootfs_listing("mathy");
    for wanted in [
        "/app/mathy",
        "libm.so.6",
        "libc.so.6",
        "ld-linux-x86-64.so.2",
        // The app's configuration is in its filesystem, reached from /etc/fuse.
        "/app/.fuse/spec",
        "squashfs-root/etc/fuse -> /app/.fuse",
    ] {
        assert!(
            listing.contains(wanted),
            "{wanted} missing from:\n{listing}"
        );
    }
    for unwanted in ["/bin/sh", "busybox", "/usr/bin"] {
        assert!(!listing.contains(unwanted), "{unwanted} in:\n{listing}");
    }

    let static_app = sb.program(HELLO, "lonely", &["-static"]);
    sb.fuse()
        .arg("build")
        .arg(&static_app)
        .run()
        .assert_success();
    let listing = sb.rootfs_listing("lonely");
    assert!(
        !listing.contains(".so"),
        "a static binary gets no libraries:\n{listing}"
    );
}

/// `fuse build INPUT` is refused (see `Sandbox::assert_refused`).
#[track_caller]
fn assert_build_refused(sb: &Sandbox, input: &std::path::Path, needles: &[&str]) {
    sb.assert_refused([std::ffi::OsStr::new("build"), input.as_os_str()], needles);
}

#[test]
fn bad_inputs_are_refused_with_one_clear_line() {
    let sb = Sandbox::new();
    let text = sb.dir.write("notes.txt", "just text\n");
    assert_build_refused(
        &sb,
        &text,
        &["notes.txt", "not an app", "jar", ".js or .py script"],
    );
    assert_build_refused(&sb, sb.dir.path(), &["directory"]);
    assert_build_refused(
        &sb,
        &sb.dir.join("missing-1.0"),
        &["missing-1.0", "not found"],
    );

    // An aarch64 ELF into an x86_64 image.
    let app = sb.program(HELLO, "foreign", &["-static"]);
    let mut bytes = std::fs::read(&app).unwrap();
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes()); // e_machine = EM_AARCH64
    let foreign = sb.dir.write("foreign-arm", &bytes);
    assert_build_refused(&sb, &foreign, &["foreign-arm", "aarch64"]);

    // Names that would be a path in the store: refused before a blob is written.
    let app = sb.program(HELLO, "named", &["-static"]);
    for (name, needle) in [
        ("foo:..", "invalid image version '..'"),
        ("foo:.", "invalid image version '.'"),
        ("..:1", "invalid image name '..'"),
        ("foo/bar:1", "invalid image name 'foo/bar'"),
        ("foo:1/2", "invalid image version '1/2'"),
    ] {
        sb.assert_refused(
            [
                "build".as_ref(),
                "--name".as_ref(),
                name.as_ref(),
                app.as_os_str(),
            ],
            &["--name", needle],
        );
    }
    let blobs = std::fs::read_dir(sb.home().join("images/blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(blobs, 0, "a refused name leaves no blob");
}

#[test]
fn missing_library_is_named_with_the_binary_that_needs_it() {
    let sb = Sandbox::new();
    let lib_dir = sb.dir.join("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    let lib_src = sb.dir.write("greet.c", "int greet(void) { return 42; }\n");
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib_dir.join("libgreet.so"))
        .arg(&lib_src)
        .status()
        .unwrap();
    assert!(status.success());
    let app = sb.program(
        "int greet(void);\nint main(void){return greet() == 42 ? 0 : 1;}",
        "needy",
        &[
            "-L",
            lib_dir.to_str().unwrap(),
            "-lgreet",
            "-Wl,-rpath,$ORIGIN/lib",
        ],
    );
    sb.fuse().arg("build").arg(&app).run().assert_success();
    std::fs::remove_file(lib_dir.join("libgreet.so")).unwrap();
    let other = Sandbox::new();
    assert_build_refused(&other, &app, &["libgreet.so", "needy"]);
}

#[test]
fn build_help_names_every_kind_of_app() {
    let help = FuseCmd::new().args(["build", "--help"]).run();
    help.assert_success();
    let text = help.stdout_str();
    for kind in ["ELF executable", "jar", "Node.js", "Python", "directory"] {
        assert!(
            text.contains(kind),
            "`fuse build --help` names {kind}:\n{text}"
        );
    }
}

/// The long flags a command's `--help` lists.
fn long_flags(command: &str) -> std::collections::BTreeSet<String> {
    let help = FuseCmd::new().args([command, "--help"]).run();
    help.assert_success();
    help.stdout_str()
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches([',', '.', ')', '`', ':'])
                .split(['=', '[', '<'])
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// `fuse test` boots through the same launch path as `fuse run`, with the same flag groups:
/// every flag of `fuse run` but `--detach` (and `--rm`, what a detached instance leaves) is a
/// flag of `fuse test`.
#[test]
fn fuse_test_accepts_every_flag_of_fuse_run() {
    let run = long_flags("run");
    let test = long_flags("test");
    assert!(run.len() > 20, "run's flags were read: {run:?}");
    let missing: Vec<&String> = run
        .iter()
        .filter(|f| *f != "--detach" && *f != "--rm" && !test.contains(*f))
        .collect();
    assert!(missing.is_empty(), "fuse test lacks {missing:?}");
}

/// A cause is printed once: `fuse: error: <what failed>: <why>`, not `<why>: <why>`.
#[test]
fn a_missing_qemu_is_reported_with_its_cause_once() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    let out = sb
        .fuse()
        .env("FUSE_QEMU", "/nonexistent/qemu-system-x86_64")
        .args(["run", "--accel", "tcg"])
        .arg(&app)
        .run();
    out.assert_code(1);
    let stderr = out.stderr_str();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("fuse: error: "))
        .unwrap_or_else(|| panic!("no error line\n{out}"));
    assert!(line.contains("/nonexistent/qemu-system-x86_64"), "{line}");
    let parts: Vec<&str> = line.split(": ").map(str::trim).collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[i + 1..].contains(part),
            "'{part}' is printed twice: {line}"
        );
    }
}

/// A reader that stops early ends a printing command the way it ends `ls`: SIGPIPE, nothing on
/// stderr (Rust's default is a panic on EPIPE). The pipe's read end is closed before fuse
/// starts, so its first write fails.
#[test]
fn a_closed_stdout_ends_inspect_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    sb.fuse().arg("build").arg(&app).run().assert_success();
    let mut fds = [0; 2];
    // SAFETY: pipe() fills the two descriptors; each is owned below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] is ours; closing it leaves a pipe without readers.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is a fresh descriptor owned by nothing else.
    let stdout = unsafe { std::process::Stdio::from_raw_fd(fds[1]) };
    let out = Command::new(fuse_tests::fuse_bin())
        .env("FUSE_HOME", sb.home())
        .args(["inspect", "hello:1.0"])
        .stdout(stdout)
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{out:?}");
}
