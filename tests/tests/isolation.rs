//! Isolation, as seen from inside the guest and from the host: the app runs as its own
//! unprivileged user with no capabilities, cannot run what it writes, cannot read the kernel
//! log, and still binds port 80; nothing it prints changes how fuse ends; QEMU runs confined.

mod common;

use common::{free_port, http_get_until, Sandbox, NEVER_EXITS};
use fuse_tests::{assert_no_leaked_qemu, on_every_arch, qemu_processes, wait_for_qemu_of};
use std::time::{Duration, Instant};

on_every_arch! {
    app_runs_unprivileged_and_binds_port_80 => unprivileged;
    app_output_cannot_fake_exit_status_or_panic => spoof;
}

/// Reports the app's identity and what it can do, then (with SERVE) answers one HTTP request
/// on port 80.
const PROBE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void status_lines(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "Cap", 3) || !strncmp(line, "NoNewPrivs", 10)) printf("%s", line);
    if (f) fclose(f);
}

/* Copies this program into dir and runs it from there. */
static void try_exec(const char *dir) {
    char path[256], buf[65536];
    snprintf(path, sizeof path, "%s/probe-copy", dir);
    int in = open("/proc/self/exe", O_RDONLY);
    int out = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    if (out < 0) { printf("copy %s: %s\n", dir, strerror(errno)); return; }
    ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0) write(out, buf, n);
    close(in);
    close(out);
    printf("copy %s: ok\n", dir);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        execl(path, path, "child", (char *)NULL);
        printf("exec %s: %s\n", dir, strerror(errno));
        fflush(stdout);
        _exit(0);
    }
    waitpid(pid, NULL, 0);
}

static void show(const char *path) {
    char buf[64] = {0};
    int fd = open(path, O_RDONLY);
    if (fd >= 0) { read(fd, buf, sizeof buf - 1); close(fd); }
    buf[strcspn(buf, "\n")] = 0;
    printf("%s=%s\n", path, buf);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "child")) { printf("exec ran\n"); return 0; }
    printf("uid=%d gid=%d euid=%d\n", getuid(), getgid(), geteuid());
    status_lines();
    const char *dirs[] = {"/tmp", "/run", "/dev/shm", "/dev"};
    for (int i = 0; i < 4; i++) try_exec(dirs[i]);
    int k = open("/dev/kmsg", O_RDONLY);
    printf("kmsg: %s\n", k >= 0 ? "readable" : strerror(errno));
    show("/proc/sys/kernel/dmesg_restrict");
    show("/proc/sys/kernel/kptr_restrict");
    printf("policy init=%d app=%d\n", sched_getscheduler(1), sched_getscheduler(0));
    fflush(stdout);
    /* What servers configured to log to /dev/stdout do: reopen the console by name. */
    int o = open("/dev/stdout", O_WRONLY);
    if (o >= 0) { dprintf(o, "reopened /dev/stdout\n"); close(o); }
    else printf("reopen /dev/stdout: %s\n", strerror(errno));
    fflush(stdout);
    if (!getenv("SERVE")) return 0;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(80)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4) < 0) {
        printf("bind 80: %s\n", strerror(errno));
        return 1;
    }
    printf("listening on 80\n");
    fflush(stdout);
    /* Forwarded connections may arrive before the request: answer the first that asks. */
    for (;;) {
        int c = accept(s, NULL, NULL);
        char req[512];
        if (c < 0 || read(c, req, sizeof req) <= 0) { if (c >= 0) close(c); continue; }
        dprintf(c, "HTTP/1.0 200 OK\r\n\r\nport 80 served by uid %d\n", getuid());
        close(c);
        return 0;
    }
}
"#;

/// The lines of `out` that start with `prefix`.
fn lines<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

fn unprivileged(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, PROBE, "probe", &["-static"]);
    let port = free_port();
    let mut running = sb
        .fuse()
        .args(["run", "--arch", arch, "-e", "SERVE=1", "-p"])
        .arg(format!("{port}:80"))
        .arg(&app)
        .spawn();
    let answer = http_get_until(&mut running, port, Duration::from_secs(240));
    let out = running.wait();
    let answer = answer.unwrap_or_else(|| panic!("port 80 never answered\n{out}"));
    assert!(
        answer.ends_with("port 80 served by uid 65532\n"),
        "{answer}"
    );
    out.assert_success();
    let stdout = out.stdout_str();
    assert!(stdout.contains("uid=65532 gid=65532 euid=65532\n"), "{out}");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            lines(&stdout, cap),
            vec![format!("{cap}:\t0000000000000000")],
            "{out}"
        );
    }
    assert_eq!(
        lines(&stdout, "NoNewPrivs"),
        vec!["NoNewPrivs:\t1"],
        "{out}"
    );
    // Where it can write, it cannot run what it wrote; the rest it cannot write at all.
    for dir in ["/tmp", "/dev/shm"] {
        assert!(
            stdout.contains(&format!("copy {dir}: ok\nexec {dir}: Permission denied\n")),
            "{dir}\n{out}"
        );
    }
    for dir in ["/run", "/dev"] {
        assert!(
            stdout.contains(&format!("copy {dir}: Permission denied\n")),
            "{dir}\n{out}"
        );
    }
    assert!(!stdout.contains("exec ran"), "{out}");
    assert!(stdout.contains("kmsg: Operation not permitted\n"), "{out}");
    // The console is the app's, as a login's tty is its user's: logging to /dev/stdout works.
    assert!(stdout.contains("reopened /dev/stdout\n"), "{out}");
    assert!(
        stdout.contains("/proc/sys/kernel/dmesg_restrict=1\n"),
        "{out}"
    );
    assert!(
        stdout.contains("/proc/sys/kernel/kptr_restrict=2\n"),
        "{out}"
    );
    // The init relays the console as a batch task (3, SCHED_BATCH), so the app's lines do not
    // preempt it one by one; the app keeps the normal policy (0).
    assert!(stdout.contains("policy init=3 app=0\n"), "{out}");
    assert_no_leaked_qemu();
}

/// `user = "root"` opts out: uid 0 with its capabilities, said at build; the writable mounts
/// stay noexec even for root.
#[test]
fn root_opt_out_keeps_root_but_not_exec_from_writable_mounts() {
    let sb = Sandbox::new();
    let app = sb.program(PROBE, "probe", &["-static"]);
    sb.dir.write("fuse.toml", "user = \"root\"\n");
    let out = sb.fuse().args(["run", "--accel", "tcg"]).arg(&app).run();
    out.assert_success().assert_stderr_contains(
        "fuse: notice: the app runs as root with every capability (user = \"root\" in fuse.toml)",
    );
    let stdout = out.stdout_str();
    assert!(stdout.contains("uid=0 gid=0 euid=0\n"), "{out}");
    assert_eq!(
        lines(&stdout, "NoNewPrivs"),
        vec!["NoNewPrivs:\t1"],
        "{out}"
    );
    for dir in ["/tmp", "/run", "/dev/shm", "/dev"] {
        assert!(
            stdout.contains(&format!("copy {dir}: ok\nexec {dir}: Permission denied\n")),
            "{dir}\n{out}"
        );
    }
    assert!(!stdout.contains("exec ran"), "{out}");
    assert_no_leaked_qemu();
}

/// `user = "root"` with `capabilities`: uid 0 keeps those and no other, in every set an exec
/// could draw from (bounding included), with no_new_privs; what another capability guards
/// (the kernel log: CAP_SYSLOG) stays shut.
#[test]
fn root_with_capabilities_keeps_only_those() {
    let sb = Sandbox::new();
    let app = sb.program(PROBE, "probe", &["-static"]);
    sb.dir.write(
        "fuse.toml",
        "user = \"root\"\ncapabilities = [\"setuid\", \"CAP_SETGID\", \"chown\"]\n",
    );
    let out = sb.fuse().args(["run", "--accel", "tcg"]).arg(&app).run();
    out.assert_success().assert_stderr_contains(
        "fuse: notice: the app runs as root with capabilities chown, setgid, setuid only",
    );
    let stdout = out.stdout_str();
    assert!(stdout.contains("uid=0 gid=0 euid=0\n"), "{out}");
    // CAP_CHOWN (0), CAP_SETGID (6), CAP_SETUID (7): 0xc1.
    assert_eq!(
        lines(&stdout, "Cap"),
        vec![
            "CapInh:\t0000000000000000",
            "CapPrm:\t00000000000000c1",
            "CapEff:\t00000000000000c1",
            "CapBnd:\t00000000000000c1",
            "CapAmb:\t0000000000000000",
        ],
        "{out}"
    );
    assert_eq!(
        lines(&stdout, "NoNewPrivs"),
        vec!["NoNewPrivs:\t1"],
        "{out}"
    );
    assert!(stdout.contains("kmsg: Operation not permitted\n"), "{out}");
    assert_no_leaked_qemu();
}

/// Prints the init's old exit line and the kernel's panic line, lives on, exits 3.
const SPOOF: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("<<fuse:exit 0>>\n");
    printf("Kernel panic - not syncing: fake\n");
    fflush(stdout);
    sleep(3);
    printf("still running after the fake lines\n");
    return 3;
}
"#;

fn spoof(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, SPOOF, "spoof", &["-static"]);
    let started = Instant::now();
    let out = sb.fuse().args(["run", "--arch", arch]).arg(&app).run();
    out.assert_code(3);
    assert_eq!(
        out.stdout_str(),
        "<<fuse:exit 0>>\nKernel panic - not syncing: fake\nstill running after the fake lines\n",
        "{out}"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_no_leaked_qemu();
}

/// While a VM runs, its QEMU is under seccomp (mode 2, filter) and, when fuse runs as root,
/// not root.
#[test]
fn qemu_runs_under_seccomp_and_not_as_root() {
    let sb = Sandbox::new();
    let app = sb.program(NEVER_EXITS, "forever", &["-static"]);
    let running = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--grace", "0"])
        .arg(&app)
        .spawn();
    assert!(wait_for_qemu_of(running.marker(), Duration::from_secs(120)));
    let qemu = qemu_processes()
        .into_iter()
        .find(|q| q.marker.as_deref() == Some(running.marker()))
        .expect("the VM's QEMU");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let read = || fuse_tests::proc_file(qemu.pid, "status").unwrap_or_default();
    // -runas takes effect once QEMU has set the machine up.
    let confined =
        fuse_boot::poll::wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
            let status = read();
            let uid_dropped = !root || status.contains("\nUid:\t65534\t65534\t65534\t65534\n");
            (status.contains("\nSeccomp:\t2\n") && uid_dropped).then_some(())
        });
    assert!(confined.is_some(), "QEMU is not confined:\n{}", read());
    running.signal(libc::SIGTERM);
    running.wait();
    assert_no_leaked_qemu();
}

/// An init failure (here: a volume that is not ext4) still reports its own exit code (125)
/// through the status port, with the init's one-line error on the console.
#[test]
fn init_failure_reports_125_through_the_status_port() {
    let sb = Sandbox::new();
    let app = sb.program(common::HELLO, "hello", &["-static"]);
    let volumes = sb.home().join("volumes");
    std::fs::create_dir_all(&volumes).unwrap();
    std::fs::write(volumes.join("junk.ext4"), vec![0u8; 1 << 20]).unwrap();
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "-v", "junk:/data"])
        .arg(&app)
        .run();
    out.assert_code(125)
        .assert_stdout_contains("fuse-init: error: cannot mount volume /dev/vdb (ext4) on /data");
    assert!(!out.stdout_str().contains("hello from the guest"), "{out}");
    assert_no_leaked_qemu();
}

/// Every line the app wrote before exiting reaches fuse, even while the serial line is still
/// sending it when the app exits: fuse no longer waits for an exit line on the console, so
/// nothing else would catch a lost tail. (Before the init stopped giving the app the console
/// as controlling tty, the kernel's hangup at the app's exit dropped the last line in about
/// half of these runs: 2 vCPUs, a volume written just before.)
#[test]
fn the_apps_last_line_is_never_lost() {
    let sb = Sandbox::new();
    let src = r#"
#include <stdio.h>
int main(void) {
    printf("writing the volume\n");
    FILE *f = fopen("/data/probe", "w");
    int ok = f && fputs("written", f) >= 0 && fclose(f) == 0;
    printf("%s\n", ok ? "last line: volume written" : "last line: volume not written");
    return 0;
}
"#;
    let app = sb.program(src, "last-line", &["-static"]);
    for run in 0..3 {
        let out = sb
            .fuse()
            .args(["run", "--accel", "tcg", "--cpus", "2", "-v"])
            .arg(format!("v{run}:/data:16M"))
            .arg(&app)
            .run();
        out.assert_success();
        assert_eq!(
            out.stdout_str(),
            "writing the volume\nlast line: volume written\n",
            "run {run}: {out}"
        );
    }
    assert_no_leaked_qemu();
}

/// A real kernel panic, made honestly from inside: an app running as root (the opt-out, with
/// CAP_SYS_PTRACE) zeroes the init's stack through /proc/1/mem and exits; the init, woken by
/// SIGCHLD, returns into zeros and dies, and the kernel panics ("Attempted to kill init!").
/// fuse learns it from QEMU (pvpanic), reports it with the kernel's reason, exits non-zero.
const KILLS_INIT: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    FILE *maps = fopen("/proc/1/maps", "r");
    char line[512];
    unsigned long lo = 0, hi = 0;
    while (maps && fgets(line, sizeof line, maps))
        if (strstr(line, "[stack]")) sscanf(line, "%lx-%lx", &lo, &hi);
    int mem = open("/proc/1/mem", O_RDWR);
    if (!lo || mem < 0) { printf("cannot reach the init's stack\n"); return 1; }
    /* The init relays the app's terminal to the console port (boot/init/console.c), and the
     * first thing that wakes it after this kills it: say it, and let it pass the line on. */
    printf("zeroing %lu bytes of the init's stack\n", hi - lo);
    fflush(stdout);
    sleep(1);
    char *zeros = calloc(1, hi - lo);
    (void)pwrite(mem, zeros, hi - lo, (off_t)lo);
    return 0;
}
"#;

fn real_panic(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, KILLS_INIT, "kills-init", &["-static"]);
    sb.dir.write("fuse.toml", "user = \"root\"\n");
    let out = sb
        .fuse()
        .args(["run", "--arch", arch, "--timeout", "120"])
        .arg(&app)
        .run();
    out.assert_code(1)
        .assert_stdout_contains("zeroing ")
        .assert_stderr_contains("The guest kernel panicked: Attempted to kill init!");
    assert_no_leaked_qemu();
}

on_every_arch! {
    a_real_kernel_panic_is_reported_from_qemu => real_panic;
}

/// A volume made when apps ran as root (top directory owned by root) is given to the app's
/// user when the init mounts it, so the unprivileged app can write to it.
#[test]
fn a_root_owned_volume_is_given_to_the_app_user() {
    let sb = Sandbox::new();
    let src = r#"
#include <stdio.h>
#include <sys/stat.h>
int main(void) {
    struct stat st;
    stat("/data", &st);
    FILE *f = fopen("/data/written-by-the-app", "w");
    int ok = f && fputs("data", f) >= 0 && fclose(f) == 0;
    printf("/data owner %u:%u, write %s\n", st.st_uid, st.st_gid, ok ? "ok" : "failed");
    return !ok;
}
"#;
    let app = sb.program(src, "writer", &["-static"]);
    let volumes = sb.home().join("volumes");
    std::fs::create_dir_all(&volumes).unwrap();
    let volume = volumes.join("old.ext4");
    std::fs::File::create(&volume)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mkfs = std::process::Command::new("/sbin/mkfs.ext4")
        .args(["-F", "-q", "-E", "root_owner=0:0"])
        .arg(&volume)
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(mkfs.success());
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "-v", "old:/data"])
        .arg(&app)
        .run();
    out.assert_success()
        .assert_stdout_contains("/data owner 65532:65532, write ok");
    assert_no_leaked_qemu();
}
