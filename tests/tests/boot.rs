//! Boot tests: real images on the real kernel under QEMU, asserting what the guest printed and
//! the exit code `fuse run` returned. Every test checks that no QEMU it started survives.

mod common;

use common::{Sandbox, EXIT_7, HELLO, NEVER_EXITS};
use fuse_tests::{assert_no_leaked_qemu, qemu_processes};
use std::time::{Duration, Instant};

#[test]
fn static_hello_prints_and_exits_zero() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let out = sb.fuse().arg("run").arg(&app).run();
    out.assert_success();
    // Only the app's output: no kernel messages, no init protocol lines.
    assert_eq!(out.stdout_str().trim_end(), "hello from the guest", "{out}");
    assert_no_leaked_qemu();
}

#[test]
fn exit_code_propagates() {
    let sb = Sandbox::new();
    let app = sb.program(EXIT_7, "seven", &["-static"]);
    let out = sb.fuse().args(["run", "--accel", "tcg"]).arg(&app).run();
    out.assert_code(7).assert_stdout_contains("about to exit 7");
    assert_no_leaked_qemu();
}

#[test]
fn dynamic_program_with_libm_and_pthread_runs() {
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
    let app = sb.program(src, "dyn", &["-lm", "-pthread"]);
    let out = sb.fuse().arg("run").arg(&app).run();
    out.assert_success()
        .assert_stdout_contains("thread computed 42.0");
    assert_no_leaked_qemu();
}

#[test]
fn app_gets_exactly_the_spec_environment_and_run_time_args() {
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
    let app = sb.program(src, "envtest", &["-static"]);
    let out = sb
        .fuse()
        .arg("run")
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
            "HOME=/root",
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

#[test]
fn guest_that_never_exits_hits_the_timeout_and_is_killed() {
    let sb = Sandbox::new();
    let app = sb.program(NEVER_EXITS, "forever", &["-static"]);
    let out = sb.fuse().args(["run", "--timeout", "20"]).arg(&app).run();
    out.assert_code(124)
        .assert_stdout_contains("running forever")
        .assert_stderr_contains("did not finish within 20")
        .assert_stderr_contains("QEMU command:");
    assert_no_leaked_qemu();
}

#[test]
fn ctrl_c_stops_the_vm_and_leaves_no_qemu() {
    let sb = Sandbox::new();
    let app = sb.program(NEVER_EXITS, "forever", &["-static"]);
    // Build first so the run below boots at once.
    sb.fuse().arg("build").arg(&app).run().assert_success();
    let mut running = sb.fuse().arg("run").arg(&app).spawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !qemu_processes().iter().any(|q| q.ours) {
        assert!(Instant::now() < deadline, "QEMU never started");
        assert!(running.is_running(), "fuse exited before QEMU started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    running.signal(libc::SIGINT);
    let out = running.wait();
    out.assert_code(130).assert_stderr_contains("Interrupted");
    assert_no_leaked_qemu();
}
