//! VM test infrastructure: runs the real `fuse` binary with timeouts, in its own process
//! group, captures its output (printed when an assertion fails), and checks that no QEMU
//! outlives a test.
//!
//! Every command started through [`FuseCmd`] gets `FUSE_TEST_RUN=<marker>` in its
//! environment, unique per command. QEMU inherits it, so [`leaked_qemus`] finds the VMs of
//! commands of this test process that have finished (a finished fuse must leave no VM), even
//! after they were reparented, without touching the VMs of tests still running in parallel.
//! The runner also names every VM `-name fuse,process=fuse-vm` (see
//! `fuse_boot::vm::VM_NAME_ARG`), which [`qemu_processes`] uses.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_boot::poll::wait_until;

/// The environment variable carrying the per-process test marker.
pub const RUN_MARKER_ENV: &str = "FUSE_TEST_RUN";
/// The default timeout of a [`FuseCmd`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The markers of the commands that have finished (their VMs must be gone).
static FINISHED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn mark_finished(marker: &str) {
    let mut finished = FINISHED.lock().unwrap_or_else(|e| e.into_inner());
    finished
        .get_or_insert_with(HashSet::new)
        .insert(marker.to_string());
}

fn is_finished(marker: &str) -> bool {
    let finished = FINISHED.lock().unwrap_or_else(|e| e.into_inner());
    finished.as_ref().is_some_and(|f| f.contains(marker))
}

/// A fresh marker for one command: `<run marker>-<n>`.
fn command_marker() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", run_marker(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// This test process's marker (unique per test binary run); commands get
/// `<marker>-<n>`.
pub fn run_marker() -> &'static str {
    static MARKER: OnceLock<String> = OnceLock::new();
    MARKER.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("fuse-test-{}-{nanos:08x}", std::process::id())
    })
}

/// The `fuse` binary under test: `$FUSE_BIN`, else `target/<profile>/fuse` next to the test
/// executable (`target/<profile>/deps/<test>`). Panics with a hint when it is missing.
pub fn fuse_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FUSE_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "FUSE_BIN={} does not exist", bin.display());
        return bin;
    }
    let exe = std::env::current_exe().expect("cannot locate the test executable");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("fuse");
    assert!(
        bin.is_file(),
        "the fuse binary is missing at {}: run `cargo build -p fuse-packager` first (or set FUSE_BIN)",
        bin.display()
    );
    bin
}

/// What a finished command did.
#[derive(Debug, Clone)]
pub struct Output {
    /// What was run, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration: Duration,
    /// Whether the command was killed for exceeding its timeout.
    pub timed_out: bool,
}

impl Output {
    /// The exit code, `None` if killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Panics with the captured output unless the command exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        if self.timed_out || self.code() != Some(code) {
            panic!("expected exit code {code}\n{self}");
        }
        self
    }

    /// Panics with the captured output unless the command succeeded.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }

    /// Panics with the captured output unless the command failed (exit code other than 0).
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        if self.timed_out || matches!(self.code(), Some(0) | None) {
            panic!("expected a failure exit code\n{self}");
        }
        self
    }

    /// Panics with the captured output unless stdout contains `needle`.
    #[track_caller]
    pub fn assert_stdout_contains(&self, needle: &str) -> &Self {
        if !self.stdout_str().contains(needle) {
            panic!("stdout does not contain {needle:?}\n{self}");
        }
        self
    }

    /// Panics with the captured output unless stderr contains `needle`.
    #[track_caller]
    pub fn assert_stderr_contains(&self, needle: &str) -> &Self {
        if !self.stderr_str().contains(needle) {
            panic!("stderr does not contain {needle:?}\n{self}");
        }
        self
    }
}

impl fmt::Display for Output {
    /// The whole capture, cloud-hypervisor style, for failure messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.timed_out, self.status.code(), self.status.signal()) {
            (true, _, _) => "killed after timeout".to_string(),
            (_, Some(code), _) => format!("exit code {code}"),
            (_, _, Some(signal)) => format!("killed by signal {signal}"),
            _ => "unknown".to_string(),
        };
        writeln!(f, "==== command: {}", self.command)?;
        writeln!(f, "==== {status} after {:.2?}", self.duration)?;
        writeln!(f, "==== stdout ====")?;
        writeln!(f, "{}", self.stdout_str().trim_end())?;
        writeln!(f, "==== stderr ====")?;
        writeln!(f, "{}", self.stderr_str().trim_end())?;
        write!(f, "==== end ====")
    }
}

/// Builder of a command run the test way: own process group, timeout, captured output,
/// whole group killed on timeout or when dropped (a panicking test).
#[derive(Debug)]
pub struct FuseCmd {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl FuseCmd {
    /// The `fuse` binary under test (see [`fuse_bin`]).
    pub fn new() -> FuseCmd {
        FuseCmd::program(fuse_bin())
    }

    /// Any program, with the same handling (for the framework's own tests, helpers).
    pub fn program(program: impl Into<PathBuf>) -> FuseCmd {
        FuseCmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Bytes fed to stdin (then closed); without it stdin is /dev/null.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command as a shell-like string, for messages.
    pub fn describe(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Starts the command; see [`Running`].
    pub fn spawn(&self) -> Running {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for (key, value) in &self.env {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        let marker = command_marker();
        cmd.env(RUN_MARKER_ENV, &marker);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.describe()));
        let stdin = self.stdin.clone().and_then(|bytes| {
            let mut pipe = child.stdin.take()?;
            Some(std::thread::spawn(move || {
                // The program may not read it all; a broken pipe is fine.
                let _ = pipe.write_all(&bytes);
            }))
        });
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        Running {
            command: self.describe(),
            marker,
            child: Some(child),
            started,
            timeout: self.timeout,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Runs to completion (or the timeout, then the whole group is killed).
    pub fn run(&self) -> Output {
        self.spawn().wait()
    }
}

impl Default for FuseCmd {
    fn default() -> Self {
        FuseCmd::new()
    }
}

fn collect(pipe: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    })
}

/// A started [`FuseCmd`]. Dropping it kills the process group and reaps the child.
#[derive(Debug)]
pub struct Running {
    command: String,
    marker: String,
    child: Option<Child>,
    started: Instant,
    timeout: Duration,
    stdin: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    /// The process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends `signal` to the process only (not its group), like a user's `kill`.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signals a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// Sends `signal` to the whole process group, like Ctrl-C on a terminal would.
    pub fn signal_group(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: signals the process group of a child we spawned and have not reaped.
            unsafe { libc::kill(-(child.id() as libc::pid_t), signal) };
        }
    }

    /// The `FUSE_TEST_RUN` value of this command (and so of its VMs).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for the exit (killing the group at the timeout) and returns the capture.
    pub fn wait(mut self) -> Output {
        let mut child = self.child.take().expect("waited twice");
        let left = self.timeout.saturating_sub(self.started.elapsed());
        let exited = wait_until(left, Duration::from_millis(20), || {
            child.try_wait().transpose()
        });
        let (status, timed_out) = match exited {
            Some(Ok(status)) => (status, false),
            _ => {
                kill_group(&mut child);
                (child.wait().expect("cannot reap the child"), true)
            }
        };
        let duration = self.started.elapsed();
        // Grandchildren may hold the pipes open; they are in the group, so kill it before
        // waiting for EOF, or a leaked VM would hang the test here.
        // SAFETY: the group id is that of our (now reaped) child; no memory is involved.
        // A reused id is possible in theory only, as the group lives as long as a member.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        mark_finished(&self.marker);
        if let Some(stdin) = self.stdin.take() {
            let _ = stdin.join();
        }
        let stdout = self.stdout.take().map(|h| h.join().unwrap_or_default());
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        Output {
            command: self.command.clone(),
            status,
            stdout: stdout.unwrap_or_default(),
            stderr: stderr.unwrap_or_default(),
            duration,
            timed_out,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
            let _ = child.wait();
            mark_finished(&self.marker);
        }
    }
}

fn kill_group(child: &mut Child) {
    // SAFETY: signals the process group of an unreaped child we spawned.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
}

/// A process that looks like a QEMU of fuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProcess {
    pub pid: u32,
    pub cmdline: String,
    /// Its `FUSE_TEST_RUN` marker, if started by the test framework.
    pub marker: Option<String>,
    /// Whether it was started by a command of this test process.
    pub ours: bool,
}

/// Every live QEMU started by fuse (named `-name fuse,process=fuse-vm`, or carrying a
/// `FUSE_TEST_RUN` marker), from any test run.
pub fn qemu_processes() -> Vec<QemuProcess> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_qemu = argv.first().is_some_and(|a0| {
            a0.rsplit('/')
                .next()
                .unwrap_or(a0)
                .starts_with("qemu-system")
        });
        let zombie = fs::read_to_string(entry.path().join("stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.starts_with(" Z")));
        if !is_qemu || zombie {
            continue;
        }
        let environ = fs::read(entry.path().join("environ")).unwrap_or_default();
        let prefix = format!("{RUN_MARKER_ENV}=");
        let marker = environ
            .split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
            .map(|m| String::from_utf8_lossy(m).into_owned());
        let ours = marker
            .as_deref()
            .is_some_and(|m| m.starts_with(&format!("{}-", run_marker())));
        let named = argv
            .windows(2)
            .any(|w| w[0] == "-name" && w[1].starts_with("fuse,"));
        if named || marker.is_some() {
            found.push(QemuProcess {
                pid,
                cmdline: argv.join(" "),
                marker,
                ours,
            });
        }
    }
    found
}

/// Waits up to `timeout` for a QEMU of the command whose marker is `marker` to run; whether one
/// did.
pub fn wait_for_qemu_of(marker: &str, timeout: Duration) -> bool {
    wait_until(timeout, Duration::from_millis(50), || {
        qemu_processes()
            .iter()
            .any(|q| q.marker.as_deref() == Some(marker))
            .then_some(())
    })
    .is_some()
}

/// The QEMU processes started by commands of this test process that have finished, and so
/// should be gone. Waits up to 2 s for VMs that are being killed to go away. VMs of commands
/// still running (other tests in parallel) are not leaks.
pub fn leaked_qemus() -> Vec<QemuProcess> {
    let finished = || -> Vec<QemuProcess> {
        qemu_processes()
            .into_iter()
            .filter(|q| q.ours && q.marker.as_deref().is_some_and(is_finished))
            .filter(|q| !supervised(q.pid))
            .collect()
    };
    wait_until(Duration::from_secs(2), Duration::from_millis(50), || {
        finished().is_empty().then(Vec::new)
    })
    .unwrap_or_else(finished)
}

/// Whether `pid`'s parent is a live supervisor of a detached instance (`fuse __supervise`): its
/// QEMU outlives the `fuse run -d` that carried the marker, and is not a leak while another
/// test of this process still uses it (killing it would break that test). One left running
/// at the end is still caught: by its test's own `fuse kill`, and by CI's final QEMU check.
fn supervised(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(ppid) = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
    else {
        return false;
    };
    fs::read(format!("/proc/{ppid}/cmdline"))
        .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|arg| arg == b"__supervise"))
}

/// Panics, listing them, if QEMU processes of this test process are alive (they are
/// killed first, so one leak does not cascade into other tests).
#[track_caller]
pub fn assert_no_leaked_qemu() {
    let leaked = leaked_qemus();
    if leaked.is_empty() {
        return;
    }
    for q in &leaked {
        // SAFETY: kills a process this test started (its environment carries our marker).
        unsafe { libc::kill(q.pid as libc::pid_t, libc::SIGKILL) };
    }
    let list: Vec<String> = leaked
        .iter()
        .map(|q| format!("  {} {}", q.pid, q.cmdline))
        .collect();
    panic!("QEMU processes were left running:\n{}", list.join("\n"));
}

/// A temporary directory, removed when dropped (kept with `FUSE_TEST_KEEP=1`).
#[derive(Debug)]
pub struct TestDir {
    /// Held for its `Drop`, which removes the directory.
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let prefix = format!("fuse-test-{}-", COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .expect("cannot create a temporary directory");
        let path = dir.path().to_path_buf();
        let keep = std::env::var_os("FUSE_TEST_KEEP").is_some_and(|v| v == "1");
        TestDir {
            _dir: if keep {
                eprintln!("keeping {}", path.display());
                let _ = dir.keep();
                None
            } else {
                Some(dir)
            },
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Writes `contents` to `rel` (creating parent directories) and returns the path.
    pub fn write(&self, rel: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("cannot create directory");
        }
        fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Compiles the C program `src` with gcc into `<dir>/<name>` (see [`compile_c`]).
    pub fn compile_c(&self, src: &str, name: &str, extra_args: &[&str]) -> PathBuf {
        compile_c(self.path(), src, name, extra_args)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

/// Compiles the C program `src` with `gcc` (`$CC` if set) into `dir/name` and returns the
/// executable's path; panics with gcc's output on failure.
pub fn compile_c(dir: &Path, src: &str, name: &str, extra_args: &[&str]) -> PathBuf {
    compile_c_for(dir, std::env::consts::ARCH, src, name, extra_args)
}

/// Compiles `src` like [`compile_c`] for `arch` (`x86_64` or `aarch64`): with `$CC` (else
/// `gcc`) when it is the host's arch, else with the cross compiler `<arch>-linux-gnu-gcc`
/// (gcc-aarch64-linux-gnu, which ci/setup installs).
pub fn compile_c_for(
    dir: &Path,
    arch: &str,
    src: &str,
    name: &str,
    extra_args: &[&str],
) -> PathBuf {
    let source = dir.join(format!("{name}.c"));
    fs::write(&source, src).expect("cannot write the C source");
    let exe = dir.join(name);
    let cc: std::ffi::OsString = if arch == std::env::consts::ARCH {
        std::env::var_os("CC").unwrap_or_else(|| "gcc".into())
    } else {
        format!("{arch}-linux-gnu-gcc").into()
    };
    let out = Command::new(&cc)
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(&source)
        .args(extra_args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (run ci/setup): {e}", cc.to_string_lossy()));
    assert!(
        out.status.success(),
        "compiling {name}.c for {arch} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Defines `NAME::x86_64` and `NAME::aarch64`, two tests calling `BODY(arch)`: the same boot
/// test, with the same assertions, for each architecture fuse builds images for.
#[macro_export]
macro_rules! on_every_arch {
    ($($name:ident => $body:ident;)+) => {$(
        mod $name {
            #[test]
            fn x86_64() {
                super::$body("x86_64")
            }
            #[test]
            fn aarch64() {
                super::$body("aarch64")
            }
        }
    )+};
}

/// Reads a file of /proc for a pid, for tests that inspect processes.
pub fn proc_file(pid: u32, name: &str) -> io::Result<String> {
    fs::read_to_string(format!("/proc/{pid}/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid_alive(pid: i32) -> bool {
        proc_file(pid as u32, "stat")
            .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.starts_with(" Z")))
    }

    #[test]
    fn test_output_captured() {
        let out = FuseCmd::program("sh")
            .args(["-c", "echo out; echo err >&2; cat; exit 7"])
            .stdin("from stdin\n")
            .env("GREETING", "hi")
            .run();
        out.assert_code(7);
        assert_eq!(out.stdout_str(), "out\nfrom stdin\n");
        assert_eq!(out.stderr_str(), "err\n");
        assert!(!out.timed_out);
    }

    #[test]
    fn test_env_cwd_and_marker() {
        let dir = TestDir::new();
        let out = FuseCmd::program("sh")
            .args(["-c", "echo $GREETING $FUSE_TEST_RUN; pwd"])
            .env("GREETING", "hi")
            .cwd(dir.path())
            .run();
        out.assert_success()
            .assert_stdout_contains(&format!("hi {}-", run_marker()));
        let canonical = fs::canonicalize(dir.path()).unwrap();
        out.assert_stdout_contains(canonical.to_str().unwrap());
    }

    #[test]
    fn test_timeout_kills_group() {
        // The grandchild holds stdout open: without the group kill, wait() would hang.
        let out = FuseCmd::program("sh")
            .args(["-c", "sleep 100 & echo $!; sleep 100"])
            .timeout(Duration::from_millis(500))
            .run();
        assert!(out.timed_out, "{out}");
        assert!(out.duration < Duration::from_secs(10), "{out}");
        let grandchild: i32 = out.stdout_str().trim().parse().unwrap();
        let gone = wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
            (!pid_alive(grandchild)).then_some(())
        });
        assert!(gone.is_some(), "sleep {grandchild} survived the timeout");
    }

    #[test]
    fn test_drop_kills_group() {
        let running = FuseCmd::program("sh").args(["-c", "sleep 100"]).spawn();
        let pid = running.pid() as i32;
        assert!(pid_alive(pid));
        drop(running);
        assert!(!pid_alive(pid));
    }

    #[test]
    fn test_failure_message_has_capture() {
        let out = FuseCmd::program("sh")
            .args(["-c", "echo visible-out; echo visible-err >&2; exit 3"])
            .run();
        let message = std::panic::catch_unwind(|| {
            out.assert_success();
        })
        .unwrap_err();
        let message = message.downcast_ref::<String>().unwrap();
        assert!(message.contains("visible-out"), "{message}");
        assert!(message.contains("visible-err"), "{message}");
        assert!(message.contains("exit code 3"), "{message}");
    }

    #[test]
    fn test_compile_c() {
        if Command::new("gcc").arg("--version").output().is_err() {
            eprintln!("skipped: gcc not installed");
            return;
        }
        let dir = TestDir::new();
        let exe = dir.compile_c(
            "#include <stdio.h>\nint main(void) { puts(\"compiled\"); return 4; }\n",
            "hello",
            &[],
        );
        let out = FuseCmd::program(&exe).run();
        out.assert_code(4).assert_stdout_contains("compiled");
    }

    #[test]
    fn test_leak_of_finished_command_is_found_and_killed() {
        // A fake QEMU in its own session, so the group kill at the end of the command misses
        // it, as it would a real leaked VM.
        let script = "setsid bash -c 'exec -a qemu-system-leaktest sleep 100' \
                      </dev/null >/dev/null 2>&1 & sleep 0.3";
        let running = FuseCmd::program("bash").args(["-c", script]).spawn();
        let marker = running.marker().to_string();
        assert!(
            wait_for_qemu_of(&marker, Duration::from_secs(10)),
            "the fake QEMU never started"
        );
        // Still running: its VM is not a leak yet.
        assert!(!leaked_qemus()
            .iter()
            .any(|q| q.marker.as_deref() == Some(&marker)));
        running.wait().assert_success();
        let leaked: Vec<QemuProcess> = leaked_qemus()
            .into_iter()
            .filter(|q| q.marker.as_deref() == Some(&marker))
            .collect();
        assert_eq!(leaked.len(), 1, "{leaked:?}");
        assert!(leaked[0].cmdline.starts_with("qemu-system-leaktest"));
        let pid = leaked[0].pid as i32;
        let panicked = std::panic::catch_unwind(assert_no_leaked_qemu);
        assert!(panicked.is_err());
        let gone = wait_until(Duration::from_secs(2), Duration::from_millis(20), || {
            (!pid_alive(pid)).then_some(())
        });
        assert!(gone.is_some(), "the leaked fake QEMU {pid} survived");
    }
}
