//! Instances and stopping: `fuse run --detach`, `ps [-a]`, `logs`, `kill`, `prune`, ended
//! instances kept with their exit code, a crashed supervisor, graceful stop (SIGTERM in the
//! guest) with and without a cooperative app, and volumes that outlive images. Real boots;
//! every test checks that no QEMU it started survives.

mod common;

use common::{Sandbox, NEVER_EXITS};
use fuse_boot::poll::wait_until;
use fuse_tests::{assert_no_leaked_qemu, wait_for_qemu_of, FuseCmd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Traps SIGTERM, says goodbye, exits 0.
const COOPERATIVE: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }
int main(void) {
    signal(SIGTERM, on_term);
    printf("waiting for SIGTERM\n");
    fflush(stdout);
    while (!stop) pause();
    printf("bye\n");
    fflush(stdout);
    return 0;
}
"#;

/// Ignores SIGTERM: only the grace period ends it.
const STUBBORN: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    signal(SIGTERM, SIG_IGN);
    printf("ignoring SIGTERM\n");
    fflush(stdout);
    for (;;) pause();
}
"#;

/// One test of this file at a time: a detached instance's QEMU carries the marker of the
/// `fuse run -d` that started it, which has finished, so a concurrent test's
/// `assert_no_leaked_qemu` would take it for a leak and kill it.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A sandbox whose instances live in its own runtime directory.
struct Instances {
    sb: Sandbox,
    _serial: MutexGuard<'static, ()>,
}

/// A failed assertion must not leak a detached VM: whatever still runs is stopped.
impl Drop for Instances {
    fn drop(&mut self) {
        let out = self.fuse().args(["ps", "--json"]).run();
        let ids: Vec<String> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|list| list.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect();
        if !ids.is_empty() {
            self.fuse().arg("kill").args(&ids).run();
        }
    }
}

impl Instances {
    fn new() -> Instances {
        let serial = serial();
        Instances {
            sb: Sandbox::new(),
            _serial: serial,
        }
    }

    fn runtime(&self) -> PathBuf {
        self.sb.dir.join("run")
    }

    fn fuse(&self) -> FuseCmd {
        self.sb.fuse().env("FUSE_RUNTIME_DIR", self.runtime())
    }

    fn ps(&self) -> Vec<serde_json::Value> {
        self.ps_with(&[])
    }

    /// `fuse ps -a --json`: ended instances too.
    fn ps_all(&self) -> Vec<serde_json::Value> {
        self.ps_with(&["-a"])
    }

    fn ps_with(&self, flags: &[&str]) -> Vec<serde_json::Value> {
        let out = self.fuse().args(["ps", "--json"]).args(flags).run();
        out.assert_success();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("ps --json: {e}\n{out}"))
            .as_array()
            .cloned()
            .unwrap()
    }

    /// `fuse run -d ARGS APP`; returns the instance id.
    fn detach(&self, app: &std::path::Path, args: &[&str]) -> String {
        let out = self
            .fuse()
            .args(["run", "-d", "--accel", "tcg"])
            .args(args)
            .arg(app)
            .run();
        out.assert_success();
        let id = out.stdout_str().trim().to_string();
        assert_eq!(id.len(), 12, "{out}");
        id
    }

    /// Waits until `fuse logs ID` shows `needle`.
    fn wait_for_log(&self, id: &str, needle: &str) -> String {
        let mut last = String::new();
        let logged = wait_until(Duration::from_secs(180), Duration::from_millis(250), || {
            let out = self.fuse().args(["logs", id]).run();
            out.assert_success();
            if out.stdout_str().contains(needle) {
                return Some(out.stdout_str());
            }
            last = out.to_string();
            None
        });
        logged.unwrap_or_else(|| panic!("{needle:?} never logged\n{last}"))
    }
}

fn pid_alive(pid: u64) -> bool {
    fuse_tests::proc_file(pid as u32, "stat")
        .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.starts_with(" Z")))
}

#[test]
fn detach_ps_logs_kill() {
    let inst = Instances::new();
    let app = inst.sb.program(COOPERATIVE, "coop-1.2", &["-static"]);
    let id = inst.detach(&app, &["--grace", "20"]);

    let list = inst.ps();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["image"], "coop:1.2");
    let qemu_pid = list[0]["pid"].as_u64().expect("QEMU pid");
    assert!(pid_alive(qemu_pid));
    let table = inst.fuse().arg("ps").run();
    table
        .assert_success()
        .assert_stdout_contains(&id)
        .assert_stdout_contains("coop:1.2");

    inst.wait_for_log(&id, "waiting for SIGTERM");
    assert_private(&inst.runtime(), &id, RUNNING_FILES);
    // A running instance is not pruned.
    let refused = inst.fuse().args(["prune", &id[..4]]).run();
    refused.assert_code(1).assert_stderr_contains(&format!(
        "Instance {id} is running: stop it with `fuse kill {id}` first"
    ));
    assert_eq!(refused.stderr_str().lines().count(), 1, "{refused}");
    // A follower sees the rest, up to the end of the instance.
    let follower = inst.fuse().args(["logs", "-f", &id[..6]]).spawn();
    let kill = inst.fuse().args(["kill", &id]).run();
    kill.assert_success()
        .assert_stdout_contains(&format!("stopped {id} (the app exited 0)\n"));
    let followed = follower.wait();
    followed
        .assert_success()
        .assert_stdout_contains("waiting for SIGTERM\nbye\n");

    assert!(!pid_alive(qemu_pid), "QEMU {qemu_pid} survived fuse kill");
    assert!(inst.ps().is_empty());
    // Kept, stopped, with the app's code and its whole output, until pruned.
    let all = inst.ps_all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["status"], "exited");
    assert_eq!(all[0]["end"], "stopped");
    assert_eq!(all[0]["exit_code"], 0);
    assert_private(&inst.runtime(), &id, ENDED_FILES);
    inst.fuse()
        .args(["logs", &id])
        .run()
        .assert_success()
        .assert_stdout_contains("waiting for SIGTERM\nbye\n");
    inst.fuse()
        .args(["kill", &id])
        .run()
        .assert_code(1)
        .assert_stderr_contains(&format!(
            "Instance {id} is not running: it was stopped (exit code 0)"
        ));
    inst.fuse()
        .args(["prune"])
        .run()
        .assert_success()
        .assert_stdout_contains(&format!("removed {id}"));
    assert!(inst.ps_all().is_empty());
    assert!(!inst.runtime().join(&id).exists());
    let gone = inst.fuse().args(["logs", &id]).run();
    gone.assert_code(1)
        .assert_stderr_contains(&format!("No instance '{id}'"));
    assert_no_leaked_qemu();
}

/// Prints, then exits 3 on its own.
const EXITS_3: &str = r#"
#include <stdio.h>
int main(void) {
    printf("cannot go on, exiting 3\n");
    return 3;
}
"#;

/// An app that exits by itself is kept as Docker keeps containers: `ps` hides it, `ps -a`
/// shows `Exited (3)`, its output stays readable, and `fuse prune ID` removes it.
#[test]
fn an_ended_instance_is_kept_until_pruned() {
    let inst = Instances::new();
    let app = inst.sb.program(EXITS_3, "quits-1.0", &["-static"]);
    let id = inst.detach(&app, &[]);
    let ended = wait_until(Duration::from_secs(180), Duration::from_millis(250), || {
        inst.ps_all()
            .into_iter()
            .find(|i| i["id"] == id.as_str() && i["status"] == "exited")
    });
    let ended = ended.unwrap_or_else(|| panic!("{id} never ended: {:?}", inst.ps_all()));
    assert_eq!(ended["exit_code"], 3, "{ended}");
    assert_eq!(ended["end"], "exited", "{ended}");
    assert_eq!(ended["image"], "quits:1.0", "{ended}");
    assert!(ended["ended_at"].as_u64().is_some(), "{ended}");
    assert!(ended["pid"].is_null(), "{ended}");
    assert!(inst.ps().is_empty(), "ps lists an ended instance");
    let table = inst.fuse().args(["ps", "--all"]).run();
    table.assert_success().assert_stdout_contains(&id);
    assert!(
        table.stdout_str().contains("Exited (3) ") && table.stdout_str().contains(" ago"),
        "{table}"
    );
    let plain = inst.fuse().arg("ps").run();
    plain.assert_success();
    assert!(!plain.stdout_str().contains(&id), "{plain}");
    inst.fuse()
        .args(["logs", &id[..5]])
        .run()
        .assert_success()
        .assert_stdout_contains("cannot go on, exiting 3\n");
    // Following an ended instance prints what it said and returns.
    inst.fuse()
        .args(["logs", "-f", &id])
        .run()
        .assert_success()
        .assert_stdout_contains("cannot go on, exiting 3\n");
    assert_private(&inst.runtime(), &id, ENDED_FILES);

    inst.fuse()
        .args(["prune", &id[..5]])
        .run()
        .assert_success()
        .assert_stdout_contains(&format!("removed {id}"));
    assert!(inst.ps_all().is_empty());
    assert!(!inst.runtime().join(&id).exists());
    inst.fuse()
        .args(["prune", &id])
        .run()
        .assert_code(1)
        .assert_stderr_contains(&format!("No instance '{id}'"));
    assert_no_leaked_qemu();
}

/// `fuse run -d --rm`: the instance goes when its VM ends, whether the app exits by itself
/// (even before `run -d` has looked) or `fuse kill` stops it (which still reports the code).
#[test]
fn rm_removes_an_instance_when_it_ends() {
    let inst = Instances::new();
    let quits = inst.sb.program(EXITS_3, "quits-1.0", &["-static"]);
    let coop = inst.sb.program(COOPERATIVE, "coop-1.0", &["-static"]);
    let quitter = inst.detach(&quits, &["--rm"]);
    let stays = inst.detach(&coop, &["--rm"]);
    assert_eq!(inst.ps()[0]["auto_remove"], true);
    inst.wait_for_log(&stays, "waiting for SIGTERM");
    let gone = wait_until(Duration::from_secs(180), Duration::from_millis(250), || {
        (!inst.runtime().join(&quitter).exists()).then_some(())
    });
    assert!(gone.is_some(), "{quitter} was kept: {:?}", inst.ps_all());
    inst.fuse()
        .args(["kill", &stays])
        .run()
        .assert_success()
        .assert_stdout_contains(&format!("stopped {stays} (the app exited 0)\n"));
    assert!(inst.ps_all().is_empty(), "{:?}", inst.ps_all());
    let left: Vec<_> = std::fs::read_dir(inst.runtime())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_no_leaked_qemu();
}

/// `fuse run -d --timeout`: the instance is kept as timed out, with 124 (what `fuse run`
/// exits with) and the reason, and without its QMP socket.
#[test]
fn a_timed_out_instance_is_kept_with_124() {
    let inst = Instances::new();
    let app = inst.sb.program(NEVER_EXITS, "forever", &["-static"]);
    let id = inst.detach(&app, &["--timeout", "15"]);
    inst.wait_for_log(&id, "running forever");
    let ended = wait_until(Duration::from_secs(120), Duration::from_millis(250), || {
        inst.ps_all().into_iter().find(|i| i["status"] == "exited")
    });
    let ended = ended.unwrap_or_else(|| panic!("{id} never ended: {:?}", inst.ps_all()));
    assert_eq!(ended["end"], "timed_out", "{ended}");
    assert_eq!(ended["exit_code"], 124, "{ended}");
    let error = ended["error"].as_str().unwrap_or_default();
    assert!(error.contains("did not finish within 15s"), "{ended}");
    assert!(!error.contains('\n'), "{ended}");
    assert_private(&inst.runtime(), &id, ENDED_FILES);
    assert_no_leaked_qemu();
}

/// `fuse kill` of an app that ignores SIGTERM: the VM is killed at the end of the grace
/// period, and kill says so with 137, as `fuse run` would exit.
#[test]
fn kill_reports_an_app_killed_at_the_end_of_its_grace_period() {
    let inst = Instances::new();
    let app = inst.sb.program(STUBBORN, "stubborn", &["-static"]);
    let id = inst.detach(&app, &["--grace", "1"]);
    inst.wait_for_log(&id, "ignoring SIGTERM");
    let started = Instant::now();
    let kill = inst.fuse().args(["kill", &id]).run();
    let took = started.elapsed();
    kill.assert_success().assert_stdout_contains(&format!(
        "killed {id} after the 1 s grace period (exit 137)\n"
    ));
    assert!(took >= Duration::from_secs(1), "killed after {took:?}");
    assert!(took < Duration::from_secs(30), "killed after {took:?}");
    let all = inst.ps_all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["end"], "killed");
    assert_eq!(all[0]["exit_code"], 137);
    let table = inst.fuse().args(["ps", "-a"]).run();
    table
        .assert_success()
        .assert_stdout_contains("Exited (137) ");
    assert_private(&inst.runtime(), &id, ENDED_FILES);
    assert_no_leaked_qemu();
}

/// What a running instance's directory holds.
const RUNNING_FILES: &[&str] = &["console.log", "qmp.sock", "state.json", "supervisor.log"];
/// What an ended instance's directory holds: nothing else (no QMP socket, no injected values).
const ENDED_FILES: &[&str] = &["console.log", "state.json", "supervisor.log"];

/// The runtime directory and the instance's directory are 0700, every file of the instance
/// (the QMP socket, which controls the VM, included) is 0600, and the files are `expected`
/// (running: at least those; ended: exactly those).
#[track_caller]
fn assert_private(runtime: &Path, id: &str, expected: &[&str]) {
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    let dir = runtime.join(id);
    assert_eq!(mode(runtime), 0o700, "{}", runtime.display());
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        assert_eq!(
            mode(&path),
            0o600,
            "{} is {:o}",
            path.display(),
            mode(&path)
        );
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    for name in expected {
        assert!(names.iter().any(|n| n == name), "no {name} in {names:?}");
    }
    if expected == ENDED_FILES {
        assert_eq!(
            names, ENDED_FILES,
            "an ended instance keeps more than its logs"
        );
    }
}

/// A runtime directory that others could read or write, a symlink (even to a private
/// directory) and someone else's directory are each refused by `fuse run -d` and `fuse ps`,
/// with one line, before anything is built or started.
#[test]
fn an_unsafe_runtime_directory_is_refused_before_anything_starts() {
    let inst = Instances::new();
    let app = inst.sb.program(NEVER_EXITS, "forever", &["-static"]);
    let runtime = inst.runtime();
    let shown = runtime.display().to_string();
    let refused = |needle: &str| {
        let run = inst.fuse().args(["run", "-d", "--accel", "tcg"]).arg(&app);
        inst.sb
            .assert_refused_by(run, &[&shown, needle, "FUSE_RUNTIME_DIR"]);
        inst.sb
            .assert_refused_by(inst.fuse().arg("ps"), &[&shown, needle]);
    };
    let private_dir = |path: &Path| std::fs::DirBuilder::new().mode(0o700).create(path).unwrap();

    private_dir(&runtime);
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused("has mode 0755, not 0700");
    assert_eq!(
        std::fs::read_dir(&runtime).unwrap().count(),
        0,
        "an instance was made"
    );
    std::fs::remove_dir(&runtime).unwrap();

    let real = inst.sb.dir.join("real");
    private_dir(&real);
    std::os::unix::fs::symlink(&real, &runtime).unwrap();
    refused("is a symbolic link");
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        0,
        "an instance was made"
    );
    std::fs::remove_file(&runtime).unwrap();

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        private_dir(&runtime);
        std::os::unix::fs::chown(&runtime, Some(65534), Some(65534)).unwrap();
        refused("is owned by uid 65534, not you (uid 0)");
        assert_eq!(
            std::fs::read_dir(&runtime).unwrap().count(),
            0,
            "an instance was made"
        );
    } else {
        eprintln!("skipped the foreign owner case: making a directory of uid 65534 needs root");
    }
    assert_no_leaked_qemu();
}

/// `fuse rm` of the image a running instance uses is refused, naming the instance and both
/// ways out; `--force` removes it.
#[test]
fn an_image_in_use_is_removed_only_with_force() {
    let inst = Instances::new();
    let app = inst.sb.program(NEVER_EXITS, "forever-2.0", &["-static"]);
    let id = inst.detach(&app, &[]);
    // QEMU has opened the disk (a disk removed before that would end the VM at once).
    inst.wait_for_log(&id, "running forever");
    let refused = inst.fuse().args(["rm", "forever:2.0"]).run();
    refused.assert_code(1).assert_stderr_contains(&format!(
        "Image forever:2.0 is used by running instance {id}: stop it with `fuse kill {id}`, \
             or remove the image anyway with `fuse rm --force`"
    ));
    assert_eq!(refused.stderr_str().lines().count(), 1, "{refused}");
    let ls = inst.fuse().args(["ls"]).run();
    ls.assert_success().assert_stdout_contains("forever");

    inst.fuse()
        .args(["rm", "--force", "forever:2.0"])
        .run()
        .assert_success()
        .assert_stdout_contains("removed forever:2.0");
    assert!(!inst.fuse().arg("ls").run().stdout_str().contains("forever"));
    inst.fuse().args(["kill", &id]).run().assert_success();
    assert!(inst.ps().is_empty());
    assert_no_leaked_qemu();
}

/// A SIGKILLed supervisor cannot record anything: the instance shows as ended with an unknown
/// code (not vanished), tidied like any ended one.
#[test]
fn a_crashed_supervisor_leaves_an_ended_instance_with_an_unknown_code() {
    let inst = Instances::new();
    let app = inst.sb.program(NEVER_EXITS, "forever", &["-static"]);
    let id = inst.detach(&app, &[]);
    inst.wait_for_log(&id, "running forever");
    let list = inst.ps();
    assert_eq!(list.len(), 1, "{list:?}");
    let supervisor = list[0]["supervisor_pid"].as_u64().unwrap();
    let qemu_pid = list[0]["pid"].as_u64().unwrap();
    // SAFETY: SIGKILL to the supervisor this test started (its pid comes from its state).
    unsafe { libc::kill(supervisor as libc::pid_t, libc::SIGKILL) };
    let gone = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (!pid_alive(qemu_pid)).then_some(())
    });
    assert!(gone.is_some(), "QEMU outlived its supervisor");
    // The directory is still there, QMP socket and all (nobody cleaned up): ps must see
    // through it.
    assert!(inst.runtime().join(&id).join("qmp.sock").exists());
    assert!(inst.ps().is_empty());
    let all = inst.ps_all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["status"], "exited");
    assert_eq!(all[0]["end"], "lost");
    assert!(all[0]["exit_code"].is_null(), "{all:?}");
    assert!(all[0]["ended_at"].as_u64().is_some(), "{all:?}");
    assert_private(&inst.runtime(), &id, ENDED_FILES);
    let table = inst.fuse().args(["ps", "-a"]).run();
    table
        .assert_success()
        .assert_stdout_contains("Exited (unknown) ");
    inst.fuse()
        .args(["logs", &id])
        .run()
        .assert_success()
        .assert_stdout_contains("running forever");
    inst.fuse()
        .args(["kill", &id])
        .run()
        .assert_code(1)
        .assert_stderr_contains(&format!(
            "Instance {id} is not running: it ended with an unknown code"
        ));
    inst.fuse().args(["prune"]).run().assert_success();
    assert!(!inst.runtime().join(&id).exists(), "not pruned");
    assert_no_leaked_qemu();
}

/// Starts `fuse run APP ARGS` and waits for `needle` on its stdout... approximated by waiting
/// for its QEMU and then for the guest to boot.
fn run_until_booted(sb: &Sandbox, app: &std::path::Path, args: &[&str]) -> fuse_tests::Running {
    sb.fuse().arg("build").arg(app).run().assert_success();
    let running = sb
        .fuse()
        .args(["run", "--accel", "tcg"])
        .args(args)
        .arg(app)
        .spawn();
    let marker = running.marker().to_string();
    assert!(
        wait_for_qemu_of(&marker, Duration::from_secs(120)),
        "QEMU never started"
    );
    // Time for the guest to boot and the app to set up its handler (TCG, loaded host).
    std::thread::sleep(Duration::from_secs(8));
    running
}

#[test]
fn ctrl_c_stops_a_cooperative_app_gracefully() {
    let _serial = serial();
    let sb = Sandbox::new();
    let app = sb.program(COOPERATIVE, "coop", &["-static"]);
    let running = run_until_booted(&sb, &app, &[]);
    running.signal(libc::SIGINT);
    let out = running.wait();
    out.assert_success()
        .assert_stdout_contains("waiting for SIGTERM\nbye\n")
        .assert_stderr_contains("Interrupted by SIGINT: stopping the app");
    assert_no_leaked_qemu();
}

#[test]
fn app_ignoring_sigterm_is_killed_after_the_grace_period() {
    let _serial = serial();
    let sb = Sandbox::new();
    let app = sb.program(STUBBORN, "stubborn", &["-static"]);
    let running = run_until_booted(&sb, &app, &["--grace", "3"]);
    let stopped = Instant::now();
    running.signal(libc::SIGINT);
    let out = running.wait();
    let took = stopped.elapsed();
    out.assert_code(137)
        .assert_stdout_contains("ignoring SIGTERM")
        .assert_stderr_contains("did not exit within 3s of SIGTERM");
    assert!(took >= Duration::from_secs(3), "stopped after {took:?}");
    assert!(took < Duration::from_secs(30), "stopped after {took:?}");
    assert_no_leaked_qemu();
}

#[test]
fn volume_keeps_data_across_images() {
    let _serial = serial();
    let sb = Sandbox::new();
    let counter = r#"
#include <stdio.h>
int main(void) {
    int n = 0;
    FILE *f = fopen("/data/counter", "r");
    if (f) { if (fscanf(f, "%d", &n) != 1) n = -100; fclose(f); }
    n++;
    f = fopen("/data/counter", "w");
    if (!f) { perror("/data/counter"); return 2; }
    fprintf(f, "%d\n", n);
    if (fclose(f) != 0) { perror("close"); return 3; }
    printf("count=%d\n", n);
    return 0;
}
"#;
    let reader = r#"
#include <stdio.h>
int main(void) {
    char buf[64] = "none";
    FILE *f = fopen("/data/counter", "r");
    if (f) { if (!fgets(buf, sizeof buf, f)) buf[0] = 0; fclose(f); }
    printf("image 2 reads %s", buf);
    return 0;
}
"#;
    let one = sb.program(counter, "counter-1", &["-static"]);
    let two = sb.program(reader, "reader-2", &["-static"]);
    for expected in ["count=1", "count=2"] {
        let out = sb
            .fuse()
            .args(["run", "--accel", "tcg", "--volume", "state:/data:64M"])
            .arg(&one)
            .run();
        out.assert_success().assert_stdout_contains(expected);
    }
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "-v", "state:/data"])
        .arg(&two)
        .run();
    out.assert_success()
        .assert_stdout_contains("image 2 reads 2\n");
    assert!(sb.home().join("volumes/state.ext4").is_file());

    // Not a mount point of the image: refused before boot.
    let out = sb
        .fuse()
        .args(["run", "--volume", "state:/srv"])
        .arg(&two)
        .run();
    out.assert_code(1)
        .assert_stderr_contains("/srv is not a volume mount point of image reader:2")
        .assert_stderr_contains("use one of /data");
    assert_no_leaked_qemu();
}

/// Says how long its DB_PASSWORD is (not the value: the console log is a file), then waits.
const TAKES_A_SECRET: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    const char *p = getenv("DB_PASSWORD");
    printf("password of %zu bytes\n", p ? strlen(p) : 0);
    fflush(stdout);
    for (;;) pause();
}
"#;

/// Every process's command line, as `pid: argv` (NULs as spaces).
fn all_command_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.chars().all(|c| c.is_ascii_digit()) {
            if let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) {
                let argv = String::from_utf8_lossy(&bytes).replace('\0', " ");
                lines.push(format!("{name}: {argv}"));
            }
        }
    }
    lines
}

/// `fuse run -d -e SECRET=…`: the value reaches the app, but no process's command line (the
/// supervisor's, QEMU's) holds it while the instance runs, and its request file is gone.
#[test]
fn a_detached_run_keeps_its_secrets_off_command_lines() {
    let inst = Instances::new();
    let app = inst.sb.program(TAKES_A_SECRET, "vault-1.0", &["-static"]);
    let secret = format!(
        "pw-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let id = inst.detach(&app, &["-e", &format!("DB_PASSWORD={secret}")]);
    inst.wait_for_log(&id, &format!("password of {} bytes", secret.len()));

    let leaks: Vec<String> = all_command_lines()
        .into_iter()
        .filter(|l| l.contains(&secret))
        .collect();
    assert!(
        leaks.is_empty(),
        "the secret is on command lines: {leaks:?}"
    );
    let dir = inst.runtime().join(&id);
    assert!(dir.is_dir(), "the instance directory exists");
    assert!(
        !dir.join("request.json").exists(),
        "the supervisor removed its request file"
    );
    let assert_no_secret_in = |dir: &Path| {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let text = std::fs::read(entry.path()).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&text).contains(&secret),
                "{} holds the secret",
                entry.path().display()
            );
        }
    };
    assert_no_secret_in(&dir);
    inst.fuse().args(["kill", &id]).run().assert_success();
    // The ended instance is kept with its logs and state only.
    assert_private(&inst.runtime(), &id, ENDED_FILES);
    assert_no_secret_in(&dir);
    assert_no_leaked_qemu();
}

/// A detached run behaves like a foreground one: the image's own `[ports]` are published and
/// its health check is waited on before `fuse run -d` returns (issue 12, item 10); an app that
/// dies before it is ready is reported with its exit code and last output lines (item 11).
#[test]
fn a_detached_run_publishes_the_images_ports_and_waits_for_health() {
    let inst = Instances::new();
    let port = common::free_port();
    let server = inst.sb.dir.write(
        "web-1.0.py",
        format!(
            "import http.server\n\
             class H(http.server.BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       self.send_response(200); self.end_headers(); self.wfile.write(b'detached ok')\n\
             print('serving', flush=True)\n\
             http.server.HTTPServer(('', {port}), H).serve_forever()\n"
        ),
    );
    inst.sb.dir.write(
        "fuse.toml",
        format!("[ports]\nhttp = {port}\n[healthcheck]\nhttp = \"/\"\n"),
    );
    let id = inst.detach(&server, &[]);
    // No retry: `run -d` returned, so the app must already answer on the image's port.
    let answer = http_get_once(port);
    assert!(answer.contains("detached ok"), "{answer}");
    let list = inst.ps();
    assert_eq!(list.len(), 1, "{list:?}");
    let ports = list[0]["ports"].to_string();
    assert!(
        ports.contains(&port.to_string()),
        "ps shows no port: {ports}"
    );
    inst.fuse().args(["kill", &id]).run().assert_success();

    // Dies before it is ready: its code and its last words are in the error.
    let dies = inst.sb.dir.write(
        "dies-1.0.py",
        "import sys\nprint('cannot open the database', flush=True)\nsys.exit(3)\n",
    );
    let out = inst
        .fuse()
        .args(["run", "-d", "--accel", "tcg"])
        .arg(&dies)
        .run();
    out.assert_code(1);
    let stderr = out.stderr_str();
    assert!(
        stderr.contains("cannot open the database") && stderr.contains("code 3"),
        "{out}"
    );
    // An instance that never started is no instance at all: nothing is kept.
    let all = inst.ps_all();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"], id.as_str());
    assert_no_leaked_qemu();
}

/// One HTTP/1.0 GET of `/` on the host's 127.0.0.1:`port`; the whole response.
fn http_get_once(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}
