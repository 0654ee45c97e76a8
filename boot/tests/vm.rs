//! Real boots of the VM runner (`fuse_boot::vm`) with a tiny C init: exit codes, live output,
//! timeouts, kernel panics, stop signals, QEMU failures, and no QEMU left behind.
//!
//! Need QEMU, gcc with a static libc, and an x86_64 fuse kernel: `FUSE_TEST_KERNEL` (a
//! bzImage), else the newest one in fuse's kernel cache (`fuse kernel build` puts it there).
//! Without them each test says why and passes.

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fuse_boot::cmdline::console_device;
use fuse_boot::poll::wait_until;
use fuse_boot::vm::{find_qemu, run, Accel, AccelChoice, RunError, VmConfig};
use fuse_rootfs::Arch;

/// Serialises the boots: each installs the process-wide stop-signal watch, and some raise
/// SIGTERM at this process.
static SERIAL: Mutex<()> = Mutex::new(());

/// `FUSE_TEST_KERNEL`, else the newest x86_64 kernel in fuse's cache.
fn test_kernel() -> Option<PathBuf> {
    if let Some(kernel) = std::env::var_os("FUSE_TEST_KERNEL").filter(|k| !k.is_empty()) {
        return Some(kernel.into());
    }
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let cache = non_empty("FUSE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("fuse")))
        .or_else(|| non_empty("HOME").map(|h| PathBuf::from(h).join(".cache/fuse")))?;
    fs::read_dir(cache.join("kernels"))
        .ok()?
        .flatten()
        .map(|entry| entry.path().join("bzImage"))
        .filter_map(|k| Some((k.metadata().ok()?.modified().ok()?, k)))
        .max()
        .map(|(_, kernel)| kernel)
}

const TEST_INIT: &str = r#"
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
/* The fuse.status port, as fuse's init finds it (boot/init/status.c), or -1. */
static int status_port(void) {
    for (int tries = 0; tries < 400; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[300], name[64] = {0};
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            int fd = open(path, O_RDONLY);
            if (fd < 0) continue;
            read(fd, name, sizeof name - 1);
            close(fd);
            if (strcmp(name, "fuse.status\n") == 0) {
                snprintf(path, sizeof path, "/dev/%s", e->d_name);
                closedir(d);
                return open(path, O_WRONLY);
            }
        }
        if (d) closedir(d);
        usleep(5000);
    }
    return -1;
}
/* Report `code` and power off; the console log off first, as fuse's init does, so the
 * kernel's "reboot: Power down" does not follow the app's output. */
static void finish(int status, int code) {
    dprintf(status, "exit %d\n", code);
    int fd = open("/proc/sys/kernel/printk", O_WRONLY);
    if (fd >= 0) { write(fd, "0", 1); close(fd); }
    reboot(RB_POWER_OFF);
}
int main(void) {
mkdir("/proc", 0755);
mount("proc", "/proc", "proc", 0, 0);
mkdir("/sys", 0755);
mount("sysfs", "/sys", "sysfs", 0, 0);
mkdir("/dev", 0755);
mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
int status = status_port();
const char *mode = getenv("MODE");
if (!mode) mode = "exit";
printf("hello from app\n");
if (!strcmp(mode, "hang")) {
    printf("partial no newline");
    fflush(stdout);
    for (;;) pause();
}
if (!strcmp(mode, "panic")) return 0; /* PID 1 exiting panics the kernel */
if (!strcmp(mode, "fakepanic")) {
    /* What the kernel prints when it panics, from a program that does not. */
    printf("Kernel panic - not syncing: fake\n");
    fflush(stdout);
    sleep(3);
    printf("still running\n");
    fflush(stdout);
    finish(status, 0);
}
char buf[64] = {0};
int fd = open("/sys/firmware/qemu_fw_cfg/by_name/opt/fuse/test/raw", O_RDONLY);
if (fd >= 0) { read(fd, buf, sizeof buf - 1); close(fd); }
printf("fw_cfg: %s\n", buf);
/* The exit line the init once printed on the console: output like any other now. */
printf("<<fuse:exit 0>>\r\n");
printf("unterminated");
fflush(stdout);
finish(status, 3);
return 0;
}
"#;

struct Fixture {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

/// Builds the test initramfs, or says why the boot tests cannot run.
fn fixture() -> Option<Fixture> {
    let Some(kernel) = test_kernel() else {
        eprintln!("skipped: no x86_64 kernel: run `fuse kernel build` or set FUSE_TEST_KERNEL");
        return None;
    };
    if find_qemu(Arch::X86_64).is_err() {
        eprintln!("skipped: qemu-system-x86_64 not installed");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("fuse-boot-test")
        .tempdir()
        .unwrap();
    let src = dir.path().join("init.c");
    fs::write(&src, TEST_INIT).unwrap();
    let init = dir.path().join("init");
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&init)
        .arg(&src)
        .status();
    if !built.is_ok_and(|s| s.success()) {
        eprintln!("skipped: gcc -static failed (static libc missing?)");
        return None;
    }
    let cpio = newc(&[("init", &fs::read(&init).unwrap())]);
    fs::write(dir.path().join("initrd"), cpio).unwrap();
    fs::write(dir.path().join("disk"), vec![0u8; 4096]).unwrap();
    fs::write(dir.path().join("fwcfg"), b"injected").unwrap();
    Some(Fixture { dir, kernel })
}

/// A minimal newc archive of regular files at the root.
fn newc(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    for (i, (name, data)) in files.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, 0o100755, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

impl Fixture {
    fn config(&self, mode: &str) -> VmConfig {
        let d = self.dir.path();
        let mut c = VmConfig::new(
            Arch::X86_64,
            &self.kernel,
            d.join("initrd"),
            d.join("disk"),
            // The image's console and panic=-1 (the runner adds neither), and the test's mode.
            format!(
                "console={} quiet loglevel=1 panic=-1 MODE={mode}",
                console_device(Arch::X86_64)
            ),
        );
        c.memory_mib = 256;
        c.accel = AccelChoice::Tcg;
        c.fw_cfg = vec![("opt/fuse/test".into(), d.join("fwcfg"))];
        c.timeout = Some(Duration::from_secs(60));
        c
    }

    /// QEMU processes still alive that were started for this fixture.
    fn leftovers(&self) -> Vec<String> {
        let marker = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains("qemu-system") && cmdline.contains(&marker) {
                    found.push(cmdline);
                }
            }
        }
        found
    }
}

#[test]
fn test_boot_exit_code_and_output() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    let mut out = Vec::new();
    let outcome = run(&fx.config("exit"), &mut out).unwrap();
    assert_eq!(outcome.exit_code, 3);
    assert_eq!(outcome.accel, Accel::Tcg);
    // A spoofed exit line changes nothing, and what follows it is shown.
    assert_eq!(
        String::from_utf8_lossy(&out),
        "hello from app\nfw_cfg: injected\n<<fuse:exit 0>>\nunterminated"
    );
    let first = outcome.first_output.unwrap();
    assert!(first <= outcome.total);
    eprintln!("first output after {first:?}, total {:?}", outcome.total);
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

#[test]
fn test_boot_timeout_kills_vm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    let mut config = fx.config("hang");
    config.timeout = Some(Duration::from_secs(8));
    let mut out = Vec::new();
    let err = run(&config, &mut out).unwrap_err();
    let RunError::Timeout { diagnostics, .. } = &err else {
        panic!("expected a timeout, got {err}");
    };
    assert!(diagnostics
        .console
        .iter()
        .any(|l| l == "partial no newline"));
    // The unterminated line was passed on live.
    assert!(String::from_utf8_lossy(&out).ends_with("partial no newline"));
    let text = format!("{err:#}");
    assert!(text.contains("did not finish within 8s"), "{text}");
    assert!(text.contains("QEMU command: "), "{text}");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

#[test]
fn test_boot_kernel_panic_reported() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    // The init exits: the kernel panics ("Attempted to kill init!"), QEMU's pvpanic says so.
    let err = run(&fx.config("panic"), &mut Vec::new()).unwrap_err();
    let RunError::KernelPanic {
        reason,
        diagnostics,
    } = &err
    else {
        panic!("expected a kernel panic, got {err}");
    };
    assert!(reason.starts_with("Attempted to kill init!"), "{err}");
    assert!(
        diagnostics.console.iter().any(|l| l == "hello from app"),
        "{err}"
    );
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// A program printing the kernel's panic line is not a panic: the VM runs on and the exit
/// status is the one reported through the status port.
#[test]
fn test_boot_fake_panic_line_changes_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    let mut out = Vec::new();
    let outcome = run(&fx.config("fakepanic"), &mut out).unwrap();
    assert_eq!(outcome.exit_code, 0);
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.ends_with("Kernel panic - not syncing: fake\nstill running\n"),
        "{out}"
    );
    assert!(outcome.total >= Duration::from_secs(3));
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// Writes like `Vec`, and sends this process SIGTERM on the first write.
struct TermOnFirstWrite(Vec<u8>);

impl Write for TermOnFirstWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            // SAFETY: the run's SignalWatch catches SIGTERM while the VM runs.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn test_boot_signal_stops_vm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    let started = Instant::now();
    // No grace: the first signal kills at once.
    let mut config = fx.config("hang");
    config.stop_grace = Duration::ZERO;
    let err = run(&config, &mut TermOnFirstWrite(Vec::new())).unwrap_err();
    assert!(
        matches!(err, RunError::Interrupted { signal } if signal == libc::SIGTERM),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "Interrupted by SIGTERM; the VM was stopped"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

#[test]
fn test_boot_signal_with_grace_kills_an_app_that_does_not_stop() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    // The test init ignores SIGTERM (PID 1 without a handler): the grace period ends it.
    let mut config = fx.config("hang");
    config.stop_grace = Duration::from_secs(2);
    let started = Instant::now();
    let err = run(&config, &mut TermOnFirstWrite(Vec::new())).unwrap_err();
    assert!(
        matches!(err, RunError::StopTimeout { signal, .. } if signal == libc::SIGTERM),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// Env of the re-executed test binary in `test_boot_sigkill_of_runner_kills_vm`.
const CHILD_ENV: &str = "FUSE_TEST_RUNNER_CHILD";

/// Not a test on its own: the runner process that the next test SIGKILLs.
#[test]
fn child_runs_hanging_vm() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let fx = Fixture {
        dir: tempfile::TempDir::with_prefix_in("unused", &dir).unwrap(),
        kernel: test_kernel().unwrap(),
    };
    let mut config = fx.config("hang");
    let d = PathBuf::from(dir);
    config.initrd = d.join("initrd");
    config.root_disk = d.join("disk");
    config.fw_cfg.clear();
    let mut stdout = io::stdout();
    let _ = run(&config, &mut stdout);
}

#[test]
fn test_boot_sigkill_of_runner_kills_vm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_runs_hanging_vm", "--nocapture"])
        .env(CHILD_ENV, fx.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("partial no newline") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "child ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(fx.leftovers().len(), 1, "the VM should be running");
    child.kill().unwrap(); // SIGKILL: no handler, no Drop runs in the child
    child.wait().unwrap();
    let gone = wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
        fx.leftovers().is_empty().then_some(())
    });
    assert!(
        gone.is_some(),
        "QEMU outlived its SIGKILLed runner: {:?}",
        fx.leftovers()
    );
}

#[test]
fn test_qemu_failure_reported() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(fx) = fixture() else { return };
    let mut config = fx.config("exit");
    config.memory_mib = 1; // too little: QEMU refuses or the kernel cannot boot
    config.cpus = 100_000; // QEMU refuses this at once
    let err = run(&config, &mut Vec::new()).unwrap_err();
    let RunError::QemuFailed { diagnostics, .. } = &err else {
        panic!("expected QEMU to fail, got {err}");
    };
    assert!(!diagnostics.qemu_stderr.is_empty(), "{err}");
}
