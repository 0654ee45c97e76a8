//! Boot tests: real images on the real kernel under QEMU, asserting what the guest printed and
//! the exit code `fuse run` returned. Every test checks that no QEMU it started survives.
//! Each runs once per architecture (`NAME::x86_64`, `NAME::aarch64`): the programs are
//! compiled with that arch's gcc and the images built and booted with `--arch`.

mod common;

use common::{Sandbox, EXIT_7, HELLO, NEVER_EXITS};
use fuse_boot::poll::wait_until;
use fuse_tests::on_every_arch;
use fuse_tests::{assert_no_leaked_qemu, qemu_processes};
use std::time::Duration;

on_every_arch! {
    static_hello_prints_and_exits_zero => static_hello;
    exit_code_propagates => exit_code;
    dynamic_program_with_libm_and_pthread_runs => dynamic_program;
    app_gets_exactly_the_spec_environment_and_run_time_args => spec_environment;
    guest_that_never_exits_hits_the_timeout_and_is_killed => timeout_kills;
    ctrl_c_stops_the_vm_and_leaves_no_qemu => ctrl_c_stops;
    an_app_that_daemonizes_is_told_so_and_keeps_its_exit_code => daemonizes;
    the_kernel_has_what_servers_probe_at_start => kernel_features;
    a_log_heavy_app_keeps_every_line_on_its_terminal_when_the_reader_is_slow => log_heavy;
}

/// Says which terminal its stdout is, then prints LINES numbered 100-byte lines, a write()
/// each (line-buffered stdio on a terminal), then `end`.
const LOGGER: &str = r#"
#include <stdio.h>
#include <unistd.h>
#define LINES 40000
int main(void) {
    printf("tty: %s\n", isatty(1) ? ttyname(1) : "not a terminal");
    for (int i = 0; i < LINES; i++)
        printf("%06d %s\n", i, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    printf("end\n");
    return 0;
}
"#;

/// The app's output takes the console port (a terminal the init relays, see
/// boot/init/console.c), and a reader that does not keep up slows the app down instead of
/// losing lines: 4 MB, more than every buffer on the way (the 1 MiB pipe, the relay's 64 KiB,
/// the terminal's), read only after a pause.
fn log_heavy(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, LOGGER, "logger", &["-static"]);
    sb.fuse()
        .args(["build", "--arch", arch])
        .arg(&app)
        .run()
        .assert_success();
    let out = fuse_tests::FuseCmd::program("sh")
        .env("FUSE_HOME", sb.home())
        .timeout(Duration::from_secs(300))
        .args(["-c", r#""$0" run --arch "$1" "$2" | { sleep 4; cat; }"#])
        .arg(fuse_tests::fuse_bin())
        .args([arch, "logger"])
        .run();
    out.assert_success();
    let stdout = out.stdout_str();
    let mut lines = stdout.lines();
    let tty = lines.next().unwrap_or_default();
    assert!(
        tty.starts_with("tty: /dev/pts/"),
        "the app is not on its pty: {tty:?}"
    );
    let x = "x".repeat(91);
    let mut count = 0;
    for (i, line) in lines.by_ref().take(40000).enumerate() {
        assert_eq!(line, format!("{i:06} {x}"), "line {i}");
        count += 1;
    }
    assert_eq!(count, 40000, "lines lost");
    assert_eq!(lines.collect::<Vec<_>>(), ["end"]);
    assert_no_leaked_qemu();
}

/// What redis, PostgreSQL and the runtimes probe at start (kernel-config/fragments/base.config):
/// smaps_rollup and pagemap (redis 7 on arm64), a System V shared memory segment (PostgreSQL's
/// interlock), high-resolution timers (a 1 ms sleep that takes 1 ms, not a 4 ms tick).
const KERNEL_FEATURES: &str = r#"
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <time.h>
static int readable(const char *path, const char *needle) {
    FILE *f = fopen(path, "r");
    if (!f) { printf("%s: cannot open\n", path); return 0; }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    int ok = needle ? strstr(buf, needle) != NULL : n > 0;
    printf("%s: %s\n", path, ok ? "ok" : "missing");
    return ok;
}
int main(void) {
    int ok = readable("/proc/self/smaps_rollup", "Rss:");
    ok &= readable("/proc/self/smaps", "Rss:");
    ok &= readable("/proc/self/pagemap", NULL);
    int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    char *p = id < 0 ? NULL : shmat(id, NULL, 0);
    int shm = p != NULL && p != (void *)-1;
    if (shm) { p[0] = 42; shmdt(p); shmctl(id, IPC_RMID, NULL); }
    printf("sysv shm: %s\n", shm ? "ok" : "missing");
    /* The kernel switches to high resolution once its clocksource is settled, which can be
     * after the app starts (x86_64 under TCG: when the TSC is calibrated): wait up to 10 s. */
    struct timespec res, tick = {0, 100000000};
    int hres = 0;
    for (int i = 0; i < 100 && !hres; i++) {
        clock_getres(CLOCK_MONOTONIC, &res);
        hres = res.tv_sec == 0 && res.tv_nsec <= 1000;
        if (!hres) nanosleep(&tick, NULL);
    }
    printf("timer resolution %ld ns: %s\n", res.tv_nsec, hres ? "ok" : "missing");
    return ok && shm && hres ? 0 : 1;
}
"#;

fn kernel_features(arch: &str) {
    let out = run_static(arch, KERNEL_FEATURES, "probe");
    out.assert_success()
        .assert_stdout_contains("/proc/self/smaps_rollup: ok")
        .assert_stdout_contains("/proc/self/pagemap: ok")
        .assert_stdout_contains("sysv shm: ok")
        .assert_stdout_contains("timer resolution 1 ns: ok");
    assert_no_leaked_qemu();
}

/// Boots the static program compiled from `src` for `arch` under TCG, once; its output.
fn run_static(arch: &str, src: &str, name: &str) -> fuse_tests::Output {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, src, name, &["-static"]);
    sb.fuse()
        .args(["run", "--accel", "tcg", "--arch", arch])
        .arg(&app)
        .run()
}

fn static_hello(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, HELLO, "hello-1.0", &["-static"]);
    let out = sb.fuse().args(["run", "--arch", arch]).arg(&app).run();
    out.assert_success();
    // Only the app's output: no kernel messages, no init protocol lines.
    assert_eq!(out.stdout_str().trim_end(), "hello from the guest", "{out}");
    assert_no_leaked_qemu();
}

/// `--verbose` shows the QEMU command line (on stderr) and the kernel's messages.
#[test]
fn verbose_shows_the_qemu_command_line_and_kernel_messages() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--verbose"])
        .arg(&app)
        .run();
    out.assert_success()
        .assert_stdout_contains("hello from the guest")
        .assert_stdout_contains("Linux version");
    let stderr = out.stderr_str();
    let line = stderr
        .lines()
        .find(|l| l.starts_with("fuse: QEMU command: "))
        .unwrap_or_else(|| panic!("no QEMU command line\n{out}"));
    assert!(
        line.contains("qemu-system-x86_64") && line.contains("loglevel=7"),
        "{line}"
    );
    // The boot above went through qboot where the host has it (Debian's qemu-system-data).
    if std::path::Path::new("/usr/share/qemu/qboot.rom").is_file() {
        assert!(line.contains(" -bios /usr/share/qemu/qboot.rom "), "{line}");
    }
    // Under TCG on an x86_64 host with an invariant TSC, the guest is told the host's TSC rate
    // and takes it, instead of calibrating (which falls back to a slow HPET calibration when
    // the PIT one fails: "Unable to calibrate against PIT").
    let invariant = std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|i| i.contains(" constant_tsc") && i.contains(" nonstop_tsc"));
    if cfg!(target_arch = "x86_64") && invariant {
        let khz: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tsc_early_khz="))
            .unwrap_or_else(|| panic!("no tsc_early_khz= in {line}"))
            .parse()
            .unwrap();
        out.assert_stdout_contains(&format!("{}.{:03} MHz", khz / 1000, khz % 1000));
        assert!(
            !out.stdout_str().contains("Unable to calibrate against PIT"),
            "{out}"
        );
    }
    assert_no_leaked_qemu();
}

/// Daemonizes the way nginx does by default: the foreground process forks a master (new
/// session) which forks a worker, and exits 0 once both exist.
const DAEMONIZES: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    int ready[2];
    if (pipe(ready) < 0) return 1;
    if (fork() == 0) {
        setsid();
        if (fork() == 0) for (;;) pause();
        (void)write(ready[1], "x", 1);
        for (;;) pause();
    }
    char c;
    if (read(ready[0], &c, 1) != 1) return 1;
    printf("master and worker started\n");
    return 0;
}
"#;

/// An app that leaves processes behind when it exits 0 has probably daemonized: the init says so
/// (the VM would otherwise power off without a word), stops them, and the exit code stays 0.
fn daemonizes(arch: &str) {
    let out = run_static(arch, DAEMONIZES, "daemon");
    out.assert_success()
        .assert_stdout_contains("master and worker started")
        .assert_stdout_contains(
            "fuse-init: warning: the app exited 0 but left 2 processes: it probably \
             daemonized; run it in the foreground (e.g. nginx -g 'daemon off;')",
        );
    assert_no_leaked_qemu();
}

fn exit_code(arch: &str) {
    let out = run_static(arch, EXIT_7, "seven");
    out.assert_code(7).assert_stdout_contains("about to exit 7");
    assert_no_leaked_qemu();
}

fn dynamic_program(arch: &str) {
    let sb = Sandbox::new();
    let src = r#"
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
static void *work(void *arg) { double *x = arg; *x = sqrt(*x); return NULL; }
int main(int argc, char **argv) {
    double x = argc > 5 ? 0 : 1764.0;
    pthread_t t;
    if (pthread_create(&t, NULL, work, &x) != 0) return 3;
    pthread_join(t, NULL);
    printf("thread computed %.1f\n", x);
    return x == 42.0 ? 0 : 4;
}
"#;
    // For aarch64 the libraries (and the loader) come from fuse's arm64 Debian sysroot.
    let app = sb.program_for(arch, src, "dyn", &["-lm", "-pthread"]);
    let out = sb.fuse().args(["run", "--arch", arch]).arg(&app).run();
    out.assert_success()
        .assert_stdout_contains("thread computed 42.0");
    assert_no_leaked_qemu();
}

fn spec_environment(arch: &str) {
    let sb = Sandbox::new();
    let src = r#"
#include <stdio.h>
extern char **environ;
int main(int argc, char **argv) {
    for (char **e = environ; *e; e++) printf("env %s\n", *e);
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    return 0;
}
"#;
    let app = sb.program_for(arch, src, "envtest", &["-static"]);
    let out = sb
        .fuse()
        .args(["run", "--arch", arch])
        .arg(&app)
        .args(["--", "one", "two words"])
        .run();
    out.assert_success();
    let stdout = out.stdout_str();
    let mut env: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("env "))
        .collect();
    env.sort();
    assert_eq!(
        env,
        vec![
            "HOME=/home/nonroot",
            "HOSTNAME=envtest",
            "LANG=C.UTF-8",
            "PATH=/app:/usr/local/bin:/usr/bin:/bin"
        ],
        "{out}"
    );
    out.assert_stdout_contains("argv[0]=/app/envtest")
        .assert_stdout_contains("argv[1]=one")
        .assert_stdout_contains("argv[2]=two words");
    assert_no_leaked_qemu();
}

fn timeout_kills(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, NEVER_EXITS, "forever", &["-static"]);
    let out = sb
        .fuse()
        .args(["run", "--timeout", "20", "--arch", arch])
        .arg(&app)
        .run();
    out.assert_code(124)
        .assert_stdout_contains("running forever")
        .assert_stderr_contains("did not finish within 20")
        .assert_stderr_contains("QEMU command:");
    assert_no_leaked_qemu();
}

fn ctrl_c_stops(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, NEVER_EXITS, "forever", &["-static"]);
    // Build first so the run below boots at once.
    sb.fuse()
        .args(["build", "--arch", arch])
        .arg(&app)
        .run()
        .assert_success();
    let mut running = sb.fuse().args(["run", "--arch", arch]).arg(&app).spawn();
    let started = wait_until(Duration::from_secs(120), Duration::from_millis(100), || {
        assert!(running.is_running(), "fuse exited before QEMU started");
        qemu_processes().iter().any(|q| q.ours).then_some(())
    });
    assert!(started.is_some(), "QEMU never started");
    // Long enough for the guest to boot: the stop is graceful (ACPI power button, SIGTERM
    // to the app; on aarch64 the virt machine's GPIO power button, read by the init) and a
    // power button pressed before the kernel (or init) listens goes unheard.
    std::thread::sleep(Duration::from_secs(8));
    running.signal(libc::SIGINT);
    let out = running.wait();
    // The app (pause(), default SIGTERM action) dies of the forwarded SIGTERM in time, so
    // fuse exits with the app's status as the init reports it: 128 + SIGTERM.
    out.assert_code(143)
        .assert_stdout_contains("running forever")
        .assert_stderr_contains("Interrupted by SIGINT: stopping the app");
    assert!(out.duration < Duration::from_secs(100), "{out}");
    assert_no_leaked_qemu();
}

/// A program for the other arch is refused with one line before anything is built or stored,
/// both ways (and no sysroot is fetched for it).
#[test]
fn program_of_the_wrong_arch_is_a_one_line_error() {
    let sb = Sandbox::new();
    for (program_arch, image_arch) in [("x86_64", "aarch64"), ("aarch64", "x86_64")] {
        let app = sb.program_for(program_arch, HELLO, &format!("hello-{program_arch}"), &[]);
        let line = sb.assert_refused(
            [
                std::ffi::OsStr::new("build"),
                "--arch".as_ref(),
                image_arch.as_ref(),
                app.as_os_str(),
            ],
            &[
                &format!("is an ELF for {program_arch}, but the image is for {image_arch}"),
                "--arch",
            ],
        );
        assert!(!line.contains('\n'));
    }
}

/// A library outside the system's directories: the build's one-line error names
/// `--library-path`, which exists, and with it the library is found, packaged and loaded.
#[test]
fn library_path_adds_a_directory_for_the_apps_libraries() {
    let sb = Sandbox::new();
    let libs = sb.dir.join("vendor/lib");
    std::fs::create_dir_all(&libs).unwrap();
    let src = sb.dir.write(
        "greet.c",
        "const char *greet(void) { return \"greetings from libgreet\"; }\n",
    );
    let so = libs.join("libgreet.so");
    let cc = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let lib_arg = format!("-L{}", libs.display());
    let app = sb.program(
        "#include <stdio.h>\nconst char *greet(void);\n\
         int main(void) { printf(\"%s\\n\", greet()); return 0; }\n",
        "greeter",
        &[&lib_arg, "-lgreet"],
    );
    sb.assert_refused(
        ["build".as_ref(), app.as_os_str()],
        &["Missing library libgreet.so", "--library-path"],
    );
    sb.fuse()
        .args(["run", "--accel", "tcg", "--library-path"])
        .arg(&libs)
        .arg(&app)
        .run()
        .assert_success()
        .assert_stdout_contains("greetings from libgreet");
    assert_no_leaked_qemu();
}
