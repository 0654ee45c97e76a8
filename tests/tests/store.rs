//! The store, the caches and secrets at rest: a corrupt blob is refused and repaired by a
//! rebuild, garbage collection spares a build in flight, damaged kernel and boot-file cache
//! entries are never used, and a SIGKILLed run leaves no injected value on disk. Real builds
//! and boots; every test checks that no QEMU it started survives.

mod common;

use common::{assert_one_error, flip_byte, java_jar, json, sha256_hex, Sandbox, HELLO};
use fuse_boot::poll::wait_until;
use fuse_tests::{assert_no_leaked_qemu, on_every_arch, wait_for_qemu_of, FuseCmd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prints its TOKEN (injected with `-e`), then runs until stopped.
const PRINTS_TOKEN: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(void) {
    const char *t = getenv("TOKEN");
    printf("token=%s\n", t ? t : "(none)");
    fflush(stdout);
    for (;;) pause();
}
"#;

/// Every regular file under `dirs` (symlinks not followed) whose bytes contain `needle`.
fn files_containing(dirs: &[PathBuf], needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(entry.path());
                }
            }
        }
    }
    found
}

fn blob(sb: &Sandbox, digest: &str) -> PathBuf {
    sb.home()
        .join("images/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The image's digest and its component digests (kernel, init, rootfs).
fn digests(sb: &Sandbox, image: &str) -> (String, [String; 3]) {
    let m = json(
        sb.fuse()
            .args(["inspect", "--json", image])
            .run()
            .assert_success(),
    );
    let d = |k: &str| m[k]["digest"].as_str().unwrap().to_string();
    (
        m["digest"].as_str().unwrap().to_string(),
        [d("kernel"), d("init"), d("rootfs")],
    )
}

on_every_arch! {
    a_corrupt_blob_is_refused_and_a_rebuild_replaces_it => corrupt_blob;
    a_damaged_boot_file_cache_is_extracted_again => damaged_boot_files;
    a_damaged_kernel_cache_entry_is_rebuilt_not_used => damaged_kernel;
    a_killed_run_leaves_no_secret_on_disk => killed_run_secrets;
}

/// One flipped byte in the stored disk: `fuse run` and `fuse export` refuse it with one line
/// naming the image and both ways out, and boot nothing; a rebuild of the app replaces the
/// disk (and a flipped root filesystem blob) and the image runs again.
fn corrupt_blob(arch: &str) {
    let sb = Sandbox::with_private_cache(arch);
    let app = sb.program_for(arch, HELLO, "hello-1.0", &["-static"]);
    let build = || {
        sb.fuse()
            .args(["build", "--arch", arch])
            .arg(&app)
            .run()
            .assert_success();
    };
    build();
    let (disk, [_, _, rootfs]) = digests(&sb, "hello:1.0");
    let disk_blob = blob(&sb, &disk);
    let size = std::fs::metadata(&disk_blob).unwrap().len();
    // In the root partition (it starts after the 1 MiB GPT area and the ESP).
    flip_byte(&disk_blob, size / 2);
    flip_byte(&blob(&sb, &rootfs), 100);

    let run = sb.fuse().args(["run", "--accel", "tcg", "hello:1.0"]).run();
    assert_one_error(
        &run,
        &[
            "Image hello:1.0 is corrupt in the store",
            &disk_blob.display().to_string(),
            "`fuse build`",
            "`fuse rm hello:1.0`",
        ],
    );
    assert!(!run.stdout_str().contains("hello from the guest"), "{run}");
    let exported = sb.dir.join("out.raw");
    let export = sb
        .fuse()
        .args(["export", "hello:1.0", "--format", "raw", "-o"])
        .arg(&exported)
        .run();
    assert_one_error(&export, &["Image hello:1.0 is corrupt in the store"]);
    assert!(!exported.exists(), "a corrupt disk was exported");

    build();
    assert_eq!(digests(&sb, "hello:1.0").0, disk, "same app, same image");
    assert_eq!(sha256_hex(&disk_blob), disk.trim_start_matches("sha256:"));
    assert_eq!(
        sha256_hex(&blob(&sb, &rootfs)),
        rootfs.trim_start_matches("sha256:")
    );
    sb.fuse()
        .args(["run", "--accel", "tcg", "hello:1.0"])
        .run()
        .assert_success()
        .assert_stdout_contains("hello from the guest");
    sb.fuse()
        .args(["verify", "hello:1.0"])
        .run()
        .assert_success();
    assert_no_leaked_qemu();
}

/// `fuse rm` of another image while a build runs (its kernel and init blobs put, its root
/// filesystem being compressed) leaves the build's blobs alone.
#[test]
fn garbage_collection_spares_a_build_in_flight() {
    let sb = Sandbox::with_private_cache("x86_64");
    let other = sb.program(HELLO, "other-1.0", &["-static"]);
    sb.fuse().arg("build").arg(&other).run().assert_success();
    let jar = java_jar(
        sb.dir.path(),
        "slow-1.0.jar",
        "Slow",
        &[(
            "Slow.java",
            "public class Slow { public static void main(String[] a) { System.out.println(\"slow\"); } }",
        )],
        &[],
    );
    let leases = sb.home().join("images/leases");
    let reference = sb.home().join("images/refs/slow/1.0");
    // xz and an empty block cache: the root filesystem takes seconds to write.
    let building = sb
        .fuse()
        .args(["build", "--compression", "small"])
        .arg(&jar)
        .spawn();
    let leased = wait_until(Duration::from_secs(240), Duration::from_millis(10), || {
        std::fs::read_dir(&leases)
            .ok()?
            .flatten()
            .next()
            .map(|_| ())
    });
    assert!(leased.is_some(), "the build never put a blob");
    assert!(
        !reference.exists(),
        "the build finished before the test could rm"
    );
    sb.fuse()
        .args(["rm", "other:1.0"])
        .run()
        .assert_success()
        .assert_stdout_contains("removed other:1.0");
    building.wait().assert_success();
    let (disk, parts) = digests(&sb, "slow:1.0");
    for d in parts.iter().chain([&disk]) {
        assert!(blob(&sb, d).is_file(), "blob {d} of slow:1.0 was collected");
    }
    sb.fuse()
        .args(["verify", "slow:1.0"])
        .run()
        .assert_success();
    assert!(
        std::fs::read_dir(&leases).unwrap().next().is_none(),
        "the lease outlived the build"
    );
}

/// A flipped byte in the cached kernel that direct boot reads (`~/.cache/fuse/boot/<disk>/`)
/// is noticed and the file extracted again: the app runs, instead of a silent hang.
fn damaged_boot_files(arch: &str) {
    let sb = Sandbox::with_private_cache(arch);
    let app = sb.program_for(arch, HELLO, "hello-1.0", &["-static"]);
    let run = || {
        sb.fuse()
            .args(["run", "--accel", "tcg", "--timeout", "90", "hello:1.0"])
            .run()
    };
    sb.fuse()
        .args(["build", "--arch", arch])
        .arg(&app)
        .run()
        .assert_success();
    run()
        .assert_success()
        .assert_stdout_contains("hello from the guest");
    let (disk, [kernel_digest, _, _]) = digests(&sb, "hello:1.0");
    let cached = sb
        .dir
        .join("cache/boot")
        .join(disk.trim_start_matches("sha256:"))
        .join("kernel");
    let size = std::fs::metadata(&cached).unwrap().len();
    flip_byte(&cached, size / 2);

    let again = run();
    again
        .assert_success()
        .assert_stdout_contains("hello from the guest")
        .assert_stderr_contains("the cached boot files of hello:1.0")
        .assert_stderr_contains("are damaged (kernel has sha256");
    assert_eq!(
        sha256_hex(&cached),
        kernel_digest.trim_start_matches("sha256:")
    );
    // Repaired once: the next run trusts the checked file without a word.
    let third = run();
    third.assert_success();
    assert!(!third.stderr_str().contains("damaged"), "{third}");
    // A cached file gone missing is extracted again too.
    std::fs::remove_file(&cached).unwrap();
    run()
        .assert_success()
        .assert_stdout_contains("hello from the guest")
        .assert_stderr_contains("are damaged (kernel is unreadable)");
    assert_no_leaked_qemu();
}

/// A truncated kernel in the kernel cache is never built into an image: fuse says the entry
/// is damaged and rebuilds it (here the rebuild stops at once: `make` is kept off PATH, so
/// the test does not spend minutes compiling a kernel), and nothing is stored.
fn damaged_kernel(arch: &str) {
    let sb = Sandbox::new();
    // A private copy of the shared kernel cache entry: it is damaged below.
    let kernel = json(
        sb.fuse()
            .args(["kernel", "build", "--json", "--arch", arch])
            .run()
            .assert_success(),
    );
    let kernel_file = Path::new(kernel["path"].as_str().unwrap());
    let entry = kernel_file.parent().unwrap();
    let image_name = kernel_file.file_name().unwrap();
    let shared = entry.parent().unwrap();
    let kernels = sb.dir.join("cache/kernels");
    std::fs::create_dir_all(&kernels).unwrap();
    let copy = kernels.join(entry.file_name().unwrap());
    std::fs::create_dir(&copy).unwrap();
    for name in [image_name, "kernel.json".as_ref(), "config".as_ref()] {
        std::fs::copy(entry.join(name), copy.join(name)).unwrap();
    }
    // The source digest memo, or the key would cost a hash of the 140 MB source.
    let _ = std::fs::copy(
        shared.join("source-digests.json"),
        kernels.join("source-digests.json"),
    );
    let private = || sb.fuse().env("FUSE_CACHE_DIR", sb.dir.join("cache"));
    let app = sb.program_for(arch, HELLO, "hello-1.0", &["-static"]);
    let build = || private().args(["build", "--arch", arch]).arg(&app);
    // The intact copy is a hit: no kernel build.
    let first = build().run();
    first.assert_success();
    assert!(!first.stderr_str().contains("Building the"), "{first}");
    assert!(!first.stderr_str().contains("damaged"), "{first}");
    private().args(["rm", "hello:1.0"]).run().assert_success();

    let bz = copy.join(image_name);
    let size = std::fs::metadata(&bz).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bz)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    // The compilers (the cache key names their version) and sh, but no make.
    let bin = sb.dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["gcc", "aarch64-linux-gnu-gcc", "sh"] {
        let found = String::from_utf8(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        if !found.trim().is_empty() {
            std::os::unix::fs::symlink(found.trim(), bin.join(tool)).unwrap();
        }
    }
    let out = build().env("PATH", &bin).run();
    out.assert_stderr_contains(&format!(
        "the cached kernel {} is damaged ({} bytes, recorded {size}): rebuilding it",
        bz.display(),
        size / 2
    ));
    assert_one_error(&out, &["make not found"]);
    assert!(!copy.exists(), "the damaged entry is still there");
    let stored = std::fs::read_dir(sb.home().join("images/refs"))
        .unwrap()
        .count();
    assert_eq!(stored, 0, "an image was built on a damaged kernel\n{out}");
}

/// `-e TOKEN=<secret>` reaches the app, but the file that carried it to QEMU is gone while
/// the VM still runs, and a `fuse run` SIGKILLed right after QEMU started leaves it nowhere
/// (store, runtime directory, cache) once the next fuse command ran; no QEMU survives. The
/// same for a detached run whose supervisor is SIGKILLed.
fn killed_run_secrets(arch: &str) {
    let sb = Sandbox::with_private_cache(arch);
    let runtime = sb.dir.join("run");
    let fuse = || sb.fuse().env("FUSE_RUNTIME_DIR", &runtime);
    let dirs = [sb.home(), runtime.clone(), sb.dir.join("cache")];
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let secret = format!("s3cr3t-{}-{nanos}", std::process::id());
    let app = sb.program_for(arch, PRINTS_TOKEN, "token-1.0", &["-static"]);
    fuse()
        .args(["build", "--arch", arch])
        .arg(&app)
        .run()
        .assert_success();
    let token = format!("TOKEN={secret}");
    let run = |extra: &[&str]| -> FuseCmd {
        fuse()
            .args(["run", "--accel", "tcg", "-e", &token])
            .args(extra)
            .arg("token:1.0")
    };

    // Killed as soon as QEMU runs: maybe before it read the overlay.
    let killed = run(&[]).spawn();
    assert!(wait_for_qemu_of(killed.marker(), Duration::from_secs(120)));
    killed.signal(libc::SIGKILL);
    killed.wait();
    fuse().arg("ls").run().assert_success();
    assert_eq!(files_containing(&dirs, &secret), Vec::<PathBuf>::new());
    assert_no_leaked_qemu();

    // While the VM runs, the secret is in the guest and on no disk.
    let running = run(&["--timeout", "30"]).spawn();
    assert!(wait_for_qemu_of(running.marker(), Duration::from_secs(120)));
    let gone = wait_until(Duration::from_secs(25), Duration::from_millis(50), || {
        files_containing(&dirs, &secret).is_empty().then_some(())
    });
    let out = running.wait();
    assert!(gone.is_some(), "the overlay stayed while the VM ran\n{out}");
    assert_eq!(out.code(), Some(124), "{out}");
    out.assert_stdout_contains(&format!("token={secret}"));

    // Detached: the overlay lives in the instance's directory, which `fuse ps` sweeps.
    let started = fuse()
        .args(["run", "-d", "--accel", "tcg", "-e", &token, "token:1.0"])
        .run();
    started.assert_success();
    let id = started.stdout_str().trim().to_string();
    let instance = common::Detached::new(&sb, &runtime, &id);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runtime.join(&id).join("state.json")).unwrap())
            .unwrap();
    let supervisor = state["supervisor"]["pid"].as_u64().unwrap();
    let logged = wait_until(Duration::from_secs(120), Duration::from_millis(250), || {
        let logs = fuse().args(["logs", &id]).run();
        logs.stdout_str().contains(&secret).then_some(())
    });
    assert!(logged.is_some(), "the app never printed its token");
    // The console log holds what the app printed; only it may hold the secret.
    assert_eq!(
        files_containing(&dirs, &secret),
        vec![runtime.join(&id).join("console.log")]
    );
    // SAFETY: kills the supervisor this test started (pid from its instance state).
    unsafe { libc::kill(supervisor as libc::pid_t, libc::SIGKILL) };
    let ended = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (!fuse_tests::proc_file(supervisor as u32, "stat")
            .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.starts_with(" Z"))))
        .then_some(())
    });
    assert!(ended.is_some(), "the supervisor survived SIGKILL");
    instance.ended();
    fuse().arg("ps").run().assert_success();
    // The sweep removed the overlay; the ended instance keeps only what the app printed (as
    // `docker logs` does) until it is pruned.
    assert_eq!(
        files_containing(&dirs, &secret),
        vec![runtime.join(&id).join("console.log")]
    );
    fuse().args(["prune", &id]).run().assert_success();
    assert_eq!(files_containing(&dirs, &secret), Vec::<PathBuf>::new());
    assert_no_leaked_qemu();
}

/// `fuse rm` of an image a foreground `fuse run` is booting is refused (the VM is found by
/// its disk on QEMU's command line), until `--force`.
#[test]
fn an_image_a_foreground_run_boots_is_removed_only_with_force() {
    let sb = Sandbox::new();
    let app = sb.program(PRINTS_TOKEN, "busy-1.0", &["-static"]);
    sb.fuse().arg("build").arg(&app).run().assert_success();
    let running = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--timeout", "60", "busy:1.0"])
        .spawn();
    assert!(wait_for_qemu_of(running.marker(), Duration::from_secs(120)));
    let refused = sb.fuse().args(["rm", "busy:1.0"]).run();
    assert_one_error(
        &refused,
        &[
            "Image busy:1.0 is used by a running VM (QEMU pid ",
            "`fuse rm --force`",
        ],
    );
    sb.fuse().arg("ls").run().assert_stdout_contains("busy");
    sb.fuse()
        .args(["rm", "--force", "busy:1.0"])
        .run()
        .assert_success()
        .assert_stdout_contains("removed busy:1.0");
    running.signal(libc::SIGKILL);
    running.wait();
    assert_no_leaked_qemu();
}
