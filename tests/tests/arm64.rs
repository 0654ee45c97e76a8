//! aarch64 images of real Debian software with no hand-made sysroot: fuse finds the Debian
//! package of every library the program misses, adds it to its own arm64 sysroot with a
//! notice, and the image boots under qemu-system-aarch64 (TCG) and serves the host.

mod common;

use common::{cached_fixture, json, run_tool, Detached, Sandbox};
use fuse_tests::assert_no_leaked_qemu;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's arm64 `packages` (bookworm), as `apt-get download` gives them, unpacked with
/// `dpkg-deb -x` into one root, a fixture beside the fuse binary (fetched once).
fn debian_arm64(fixture: &str, packages: &[&str]) -> PathBuf {
    cached_fixture(fixture, |dir| {
        let mut download = Command::new("apt-get");
        download.args(["download", "-q"]).current_dir(dir);
        download.args(packages.iter().map(|p| format!("{p}:arm64")));
        run_tool(
            &mut download,
            "apt-get download (ci/setup adds the arm64 architecture)",
        );
        let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        debs.sort();
        assert_eq!(debs.len(), packages.len(), "{debs:?}");
        for deb in debs {
            run_tool(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&deb)
                    .arg(dir.join("root")),
                "dpkg-deb",
            );
            std::fs::remove_file(&deb).unwrap();
        }
    })
    .join("root")
}

/// Debian's arm64 redis 7 (1 MB). Debian's `/usr/bin/redis-server` is a link to
/// `redis-check-rdb` (redis-tools), the one binary that is both and chooses by the name it is
/// started as.
fn redis_arm64() -> PathBuf {
    debian_arm64("debian12-arm64-redis", &["redis-server", "redis-tools"])
}

/// Debian's arm64 zlib (`libz.so.1`, in package zlib1g).
fn zlib_arm64() -> PathBuf {
    debian_arm64("debian12-arm64-zlib", &["zlib1g"])
}

/// `redis-cli` of the host against 127.0.0.1:`port`; its answer.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("30")
        .arg("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli must be installed (ci/setup: redis-tools)");
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Issue 12, item 6: arm64 redis from Debian's package, built with an empty cache (so with a
/// sysroot fuse makes from nothing but the program's needs), boots and answers the host's
/// redis-cli on a published port; a rebuild fetches nothing and gives the same image.
#[test]
fn debian_arm64_redis_builds_without_a_sysroot_and_serves_redis_cli() {
    let root = redis_arm64();
    let sb = Sandbox::with_private_cache("aarch64");
    let config = sb.dir.write(
        "fuse.toml",
        "name = \"redis\"\n\
         args = [\"--port\", \"6379\", \"--bind\", \"0.0.0.0\", \"--protected-mode\", \"no\", \
         \"--save\", \"\", \"--appendonly\", \"no\"]\n",
    );
    let build = || {
        sb.fuse()
            .args(["build", "--arch", "aarch64", "--config"])
            .arg(&config)
            .arg(root.join("usr/bin/redis-server"))
            .run()
    };
    let first = build();
    first.assert_success();
    let stderr = first.stderr_str();
    // redis-server needs these five directly; Debian's policy names their packages.
    for (package, soname) in [
        ("libssl3", "libssl.so.3"),
        ("libjemalloc2", "libjemalloc.so.2"),
        ("liblzf1", "liblzf.so.1"),
        ("libsystemd0", "libsystemd.so.0"),
        ("libatomic1", "libatomic.so.1"),
    ] {
        let notice = format!(
            "fuse: Adding Debian package {package} (arm64) for {soname}, needed by redis-server"
        );
        assert!(stderr.contains(&notice), "no '{notice}':\n{first}");
    }
    let inspect = |sb: &Sandbox| {
        json(
            sb.fuse()
                .args(["inspect", "--json", "redis"])
                .run()
                .assert_success(),
        )
    };
    let manifest = inspect(&sb);
    assert_eq!(manifest["notes"]["sysroot"], "debian12/arm64", "{manifest}");
    let packages = manifest["notes"]["sysroot.packages"].as_str().unwrap();
    for package in ["libssl3=", "libjemalloc2=", "libsystemd0=", "libc6="] {
        assert!(packages.contains(package), "{package} not in {packages}");
    }

    let again = build();
    again.assert_success();
    assert!(
        !again.stderr_str().contains("Adding"),
        "a rebuild fetches nothing:\n{again}"
    );
    assert_eq!(
        inspect(&sb)["digest"],
        manifest["digest"],
        "same input, same image"
    );

    let port = common::free_port();
    let runtime = sb.dir.join("run");
    let run = sb
        .fuse()
        .env("FUSE_RUNTIME_DIR", &runtime)
        .args(["run", "-d", "--accel", "tcg", "--health", "tcp", "-p"])
        .arg(format!("{port}:6379"))
        .arg("redis")
        .run();
    run.assert_success();
    // Killed also when redis-cli panics below.
    let instance = Detached::new(&sb, &runtime, run.stdout_str().trim());
    let answers = [
        redis_cli(port, &["PING"]),
        redis_cli(port, &["SET", "fuse", "arm64 redis"]),
        redis_cli(port, &["GET", "fuse"]),
        redis_cli(port, &["INFO", "server"]),
    ];
    let logs = instance.fuse().args(["logs", &instance.id]).run();
    instance.kill().assert_success();
    assert_eq!(answers[0], "PONG", "{logs}");
    assert_eq!(answers[1], "OK");
    assert_eq!(answers[2], "arm64 redis");
    assert!(
        answers[3].contains("arch_bits:64") && answers[3].contains("aarch64"),
        "{}",
        answers[3]
    );
    assert_no_leaked_qemu();
}

/// A library no Debian package ships is one line naming it, the ELF that needs it and the
/// ways out; `--library-path` with the library is one of them.
#[test]
fn a_library_no_debian_package_ships_is_named_with_the_ways_out() {
    let sb = Sandbox::new();
    let lib_dir = sb.dir.join("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    let lib = fuse_tests::compile_c_for(
        &lib_dir,
        "aarch64",
        "int fuse_private_answer(void) { return 42; }\n",
        "libfuseprivate.so.7",
        &["-shared", "-fPIC", "-Wl,-soname,libfuseprivate.so.7"],
    );
    let app = sb.program_for(
        "aarch64",
        "#include <stdio.h>\nint fuse_private_answer(void);\n\
         int main(void) { printf(\"%d\\n\", fuse_private_answer()); return 0; }\n",
        "private-1.0",
        &[lib.to_str().unwrap()],
    );
    sb.assert_refused(
        [
            Path::new("build"),
            Path::new("--arch"),
            Path::new("aarch64"),
            &app,
        ],
        &[
            "Missing library libfuseprivate.so.7 needed by",
            "private-1.0",
            "no Debian 12 arm64 package ships it",
            "--package NAME",
            "--library-path DIR",
            "--sysroot PATH",
        ],
    );
    sb.fuse()
        .args(["build", "--arch", "aarch64", "--library-path"])
        .arg(&lib_dir)
        .arg(&app)
        .run()
        .assert_success();
}

/// `--package` is refused where there is no fuse-made sysroot to add to, and a name Debian
/// could not have is refused before apt sees it.
#[test]
fn package_is_refused_without_a_fuse_sysroot_or_with_a_bad_name() {
    let sb = Sandbox::new();
    let host_arch = std::env::consts::ARCH;
    let app = sb.program(common::HELLO, "hello-1.0", &[]);
    let app = app.to_str().unwrap();
    sb.assert_refused(
        ["build", "--arch", host_arch, "--package", "libssl3", app],
        &["--package libssl3", "install the package on this host"],
    );
    sb.assert_refused(
        ["build", "--arch", "aarch64", "--package", "Bad_Name", app],
        &["--package", "invalid Debian package name 'Bad_Name'"],
    );
    sb.assert_refused(
        ["build", "--sysroot", "/", "--package", "libssl3", app],
        &["not to --sysroot"],
    );
}

/// `libz.so.1` is in `zlib1g`, not in the `libz1` Debian's naming policy gives: the package is
/// found in Debian's Contents index (fetched into an empty cache: 45 MB), added, and the
/// program runs with it. `--package` adds a package nothing links against, and the manifest
/// names it.
#[test]
fn a_library_outside_the_naming_policy_is_found_in_the_contents_index_and_runs() {
    let zlib = zlib_arm64();
    let sb = Sandbox::with_private_cache("aarch64");
    let app = sb.program_for(
        "aarch64",
        "#include <stdio.h>\nconst char *zlibVersion(void);\n\
         int main(void) { printf(\"zlib %s in the guest\\n\", zlibVersion()); return 0; }\n",
        "zver-1.0",
        &[zlib
            .join("lib/aarch64-linux-gnu/libz.so.1")
            .to_str()
            .unwrap()],
    );
    let run = sb
        .fuse()
        .args([
            "run",
            "--arch",
            "aarch64",
            "--accel",
            "tcg",
            "--package",
            "liblz4-1",
        ])
        .arg(&app)
        .run();
    run.assert_success();
    assert!(
        run.stdout_str().contains("zlib 1.2.13 in the guest"),
        "{run}"
    );
    let manifest = json(
        sb.fuse()
            .args(["inspect", "--json", "zver:1.0"])
            .run()
            .assert_success(),
    );
    let packages = manifest["notes"]["sysroot.packages"].as_str().unwrap();
    for package in ["zlib1g=", "liblz4-1=", "libc6="] {
        assert!(packages.contains(package), "{package} not in {packages}");
    }
    let stderr = run.stderr_str();
    for notice in [
        "fuse: Fetching Debian's index of arm64 package contents",
        "fuse: Adding Debian package zlib1g (arm64) for libz.so.1, needed by zver-1.0",
    ] {
        assert!(stderr.contains(notice), "no '{notice}':\n{run}");
    }
    assert_no_leaked_qemu();
}
