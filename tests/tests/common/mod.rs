//! Shared by the integration tests: a private fuse home per test, and small C programs.

#![allow(dead_code)]

pub mod imds;
pub mod moto;
pub mod plane;

use fuse_boot::poll::wait_until;
use fuse_tests::{FuseCmd, TestDir};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A test's own image store (FUSE_HOME); the kernel cache is shared, so it is built once.
#[derive(Debug)]
pub struct Sandbox {
    pub dir: TestDir,
    /// A private cache (FUSE_CACHE_DIR) whose `kernels` links to the shared kernel cache.
    cache: Option<PathBuf>,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: TestDir::new(),
            cache: None,
        }
    }

    /// A sandbox whose cache starts empty (compressed blocks, jlink runtimes, sysroots) but for
    /// its kernels, the shared ones, found by asking fuse where its kernel for `arch` is.
    pub fn with_private_cache(arch: &str) -> Sandbox {
        let mut sb = Sandbox::new();
        let shared = sb.kernels_dir(arch);
        let cache = sb.dir.join("cache");
        std::fs::create_dir_all(&cache).unwrap();
        std::os::unix::fs::symlink(shared, cache.join("kernels")).unwrap();
        sb.cache = Some(cache);
        sb
    }

    /// The directory of this sandbox's fuse's kernel cache: fuse says where its kernel for
    /// `arch` is (a cache hit, instant), in `<kernels>/<key>/`.
    pub fn kernels_dir(&self, arch: &str) -> PathBuf {
        let kernel = json(
            self.fuse()
                .args(["kernel", "build", "--json", "--arch", arch])
                .run()
                .assert_success(),
        );
        std::path::Path::new(kernel["path"].as_str().unwrap())
            .ancestors()
            .nth(2)
            .expect("a kernel lives in <cache>/kernels/<key>/")
            .to_path_buf()
    }

    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    /// `fuse` with this sandbox's store. Boots under TCG are slow: allow for it.
    pub fn fuse(&self) -> FuseCmd {
        let cmd = FuseCmd::new()
            .env("FUSE_HOME", self.home())
            .timeout(Duration::from_secs(300));
        match &self.cache {
            Some(cache) => cmd.env("FUSE_CACHE_DIR", cache),
            None => cmd,
        }
    }

    /// `fuse build --json APP`, asserted to succeed: what it printed (`digest`, `image`...).
    pub fn build_json(&self, app: impl AsRef<std::ffi::OsStr>) -> serde_json::Value {
        json(
            self.fuse()
                .args(["build", "--json"])
                .arg(app)
                .run()
                .assert_success(),
        )
    }

    /// `fuse build --json --name NAME APP`, asserted to succeed: the image's digest.
    pub fn build_named(&self, app: &Path, name: &str) -> String {
        let built = json(
            self.fuse()
                .args(["build", "--json", "--name", name])
                .arg(app)
                .run()
                .assert_success(),
        );
        built["digest"].as_str().unwrap().to_string()
    }

    /// `fuse export IMAGE --format raw` into the sandbox (`NAME-VERSION.raw`), asserted to
    /// succeed: the raw disk.
    pub fn export_raw(&self, image: &str) -> Vec<u8> {
        let raw = self.dir.join(format!("{}.raw", image.replace(':', "-")));
        self.fuse()
            .args(["export", image, "--format", "raw", "-o"])
            .arg(&raw)
            .run()
            .assert_success();
        std::fs::read(&raw).unwrap()
    }

    /// Compiles a C program into the sandbox.
    pub fn program(&self, src: &str, name: &str, extra_args: &[&str]) -> PathBuf {
        self.dir.compile_c(src, name, extra_args)
    }

    /// Compiles a C program for `arch` (`x86_64`, `aarch64`) into the sandbox.
    pub fn program_for(&self, arch: &str, src: &str, name: &str, extra_args: &[&str]) -> PathBuf {
        fuse_tests::compile_c_for(self.dir.path(), arch, src, name, extra_args)
    }
}

pub const HELLO: &str = r#"
#include <stdio.h>
int main(void) { printf("hello from the guest\n"); return 0; }
"#;

pub const EXIT_7: &str = r#"
#include <stdio.h>
int main(void) { printf("about to exit 7\n"); return 7; }
"#;

pub const NEVER_EXITS: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("running forever\n"); fflush(stdout); for (;;) pause(); }
"#;

/// The JSON a `--json` command printed.
pub fn json(out: &fuse_tests::Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout_str()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

impl Sandbox {
    /// `unsquashfs -lls` of the root filesystem of `image` in this sandbox's store, followed
    /// by its app filesystem's listed where the VM mounts it (`squashfs-root/app/...`).
    pub fn rootfs_listing(&self, image: &str) -> String {
        let inspect = json(
            self.fuse()
                .args(["inspect", "--json", image])
                .run()
                .assert_success(),
        );
        let mut listing = String::new();
        for (part, dest) in [("rootfs", "squashfs-root"), ("appfs", "squashfs-root/app")] {
            let digest = inspect[part]["digest"].as_str().unwrap();
            let blob = self
                .home()
                .join("images/blobs/sha256")
                .join(digest.trim_start_matches("sha256:"));
            let out = std::process::Command::new("unsquashfs")
                .args(["-lls", "-d", dest])
                .arg(&blob)
                .output()
                .expect("unsquashfs (squashfs-tools) is needed");
            assert!(
                out.status.success(),
                "unsquashfs failed on {}",
                blob.display()
            );
            listing.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        listing
    }

    /// Runs `fuse ARGS` and asserts it was refused: exit 1, exactly one `fuse: error:` line
    /// holding every needle, nothing on stdout, nothing stored. Returns the error line.
    #[track_caller]
    pub fn assert_refused<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: impl IntoIterator<Item = S>,
        needles: &[&str],
    ) -> String {
        self.assert_refused_by(self.fuse().args(args), needles)
    }

    /// [`Sandbox::assert_refused`] for a command set up by the caller (its own environment).
    #[track_caller]
    pub fn assert_refused_by(&self, cmd: FuseCmd, needles: &[&str]) -> String {
        let out = cmd.run();
        let line = assert_one_error(&out, needles);
        assert!(out.stdout_str().is_empty(), "{out}");
        let stored = std::fs::read_dir(self.home().join("images/refs"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(stored, 0, "nothing is stored for a refused input");
        line
    }
}

/// Makes `cmd`'s process get SIGKILL when the thread that spawns it ends: a server or VM a
/// test started dies with it also when the test binary is killed (Drop does not run then).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A free TCP port on 127.0.0.1 (bound then released: another process could take it first,
/// which a test then sees as a clear failure to publish).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

/// Polls `http://127.0.0.1:port/` with HTTP/1.0 until it answers or `timeout` passes, while
/// `running` is alive. Returns the whole response (status line, headers, body).
pub fn http_get_until(
    running: &mut fuse_tests::Running,
    port: u16,
    timeout: Duration,
) -> Option<String> {
    use std::io::{Read, Write};
    let answer = wait_until(timeout, Duration::from_millis(500), || {
        if !running.is_running() {
            return Some(None);
        }
        let attempt = (|| -> std::io::Result<String> {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })();
        // QEMU's forwarder accepts before the guest listens and then closes: empty means
        // "not yet".
        match attempt {
            Ok(response) if response.starts_with("HTTP/") => Some(Some(response)),
            _ => None,
        }
    });
    answer.flatten()
}

/// `fuse run -p PORT:guest_port IMAGE` until its first HTTP answer on the host port, then
/// Ctrl-C: the answer (status line, headers, body) and fuse's output. Panics with that output
/// when nothing answered.
pub fn serve_once(sb: &Sandbox, image: &str, guest_port: u16) -> (String, fuse_tests::Output) {
    let port = free_port();
    let mut running = sb
        .fuse()
        .args(["run", "-p", &format!("{port}:{guest_port}"), image])
        .spawn();
    let response = http_get_until(&mut running, port, Duration::from_secs(120));
    running.signal(libc::SIGINT);
    let out = running.wait();
    let response = response.unwrap_or_else(|| panic!("no HTTP answer on port {port}\n{out}"));
    (response, out)
}

/// Compiles the Java `sources` (`(file name, text)`) with `javac` and packs the classes, plus
/// `extra` files (`(entry name, host file)`), into `dir/<name>` with `jar`, `Main-Class: main`
/// (none when `main` is empty). Panics with the tools' output on failure.
pub fn java_jar(
    dir: &std::path::Path,
    name: &str,
    main: &str,
    sources: &[(&str, &str)],
    extra: &[(&str, &std::path::Path)],
) -> PathBuf {
    let jdk = std::path::Path::new("/usr/lib/jvm/java-17-openjdk-amd64/bin");
    let tool = |t: &str| {
        let p = jdk.join(t);
        if p.is_file() {
            p
        } else {
            PathBuf::from(t)
        }
    };
    let work = dir.join(format!("{name}.build"));
    let src = work.join("src");
    let classes = work.join("classes");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&classes).unwrap();
    let mut javac = std::process::Command::new(tool("javac"));
    javac.args(["--release", "17", "-d"]).arg(&classes);
    for (file, text) in sources {
        let path = src.join(file);
        std::fs::write(&path, text).unwrap();
        javac.arg(path);
    }
    let out = javac
        .output()
        .expect("javac (openjdk-17-jdk-headless) is needed");
    assert!(
        out.status.success(),
        "javac failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (entry, host) in extra {
        let target = classes.join(entry);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(host, target).unwrap();
    }
    let jar = dir.join(name);
    let mut cmd = std::process::Command::new(tool("jar"));
    cmd.arg("--create").arg("--file").arg(&jar);
    if !main.is_empty() {
        cmd.arg("--main-class").arg(main);
    }
    let out = cmd
        .arg("-C")
        .arg(&classes)
        .arg(".")
        .output()
        .expect("jar is needed");
    assert!(
        out.status.success(),
        "jar failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    jar
}

/// Flips one bit of the byte of `path` at `at`, keeping the file's mtime (as bit rot would).
pub fn flip_byte(path: &Path, at: u64) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x01;
    file.write_all_at(&b, at).unwrap();
    file.set_modified(mtime).unwrap();
}

/// The sha256 of a file as hex digits, by `sha256sum` (an implementation other than fuse's).
pub fn sha256_hex(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Asserts `out` failed (exit 1) with exactly one `fuse: error:` line holding every needle;
/// returns that line.
#[track_caller]
pub fn assert_one_error(out: &fuse_tests::Output, needles: &[&str]) -> String {
    out.assert_code(1);
    let stderr = out.stderr_str();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("fuse: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line expected:\n{out}");
    for needle in needles {
        assert!(lines[0].contains(needle), "'{needle}' not in: {}", lines[0]);
    }
    lines[0].to_string()
}

/// A directory of downloaded third-party software (a venv from PyPI, node_modules from npm)
/// that outlives the test run, at `<target dir>/fixtures/<name>`: made once by `make` in a
/// scratch sibling and renamed into place when complete, so reruns do not download again and
/// an interrupted download is never taken for a finished one. `name` must change with what
/// `make` installs (put the versions in it).
pub fn cached_fixture(name: &str, make: impl FnOnce(&Path)) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // fuse_bin() is <target>/<profile>/fuse.
    let target = fuse_tests::fuse_bin()
        .parent()
        .and_then(Path::parent)
        .expect("the fuse binary is in <target>/<profile>")
        .to_path_buf();
    let fixtures = target.join("fixtures");
    let done = fixtures.join(name);
    if done.is_dir() {
        return done;
    }
    std::fs::create_dir_all(&fixtures).unwrap();
    let scratch = fixtures.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    make(&scratch);
    // Another test process may have finished first: its copy is as good.
    if std::fs::rename(&scratch, &done).is_err() {
        let _ = std::fs::remove_dir_all(&scratch);
        assert!(done.is_dir(), "cannot make the fixture {}", done.display());
    }
    done
}

/// Runs `cmd`, panicking with its output when it fails; `what` says what it needed.
#[track_caller]
pub fn run_tool(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({what}): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({what}):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies the directory `from` into `to` (`cp -a`: links and modes kept).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    run_tool(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", from.display()))
            .arg(to),
        "copying a fixture",
    );
}

/// A virtualenv of Debian's python3 with `pip install ARGS` from PyPI (requirements and pip's
/// options, e.g. `--only-binary=:all:`), cached under the target directory as `fixture`
/// (see [`cached_fixture`]: the name must change with the arguments). Returns the venv.
pub fn pypi_venv(fixture: &str, pip_args: &[&str]) -> PathBuf {
    cached_fixture(fixture, |dir| {
        let venv = dir.join("venv");
        run_tool(
            std::process::Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&venv),
            "python3 -m venv needs python3-venv",
        );
        run_tool(
            std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(pip_args),
            "pip installs from PyPI: the network must reach it",
        );
    })
    .join("venv")
}

/// A directory holding `node_modules` of `npm install ARGS` (packages and npm's options) under
/// a private package.json, cached under the target directory as `fixture`.
pub fn npm_modules(fixture: &str, npm_args: &[&str]) -> PathBuf {
    cached_fixture(fixture, |dir| {
        std::fs::write(
            dir.join("package.json"),
            r#"{ "name": "fixture", "version": "1.0.0", "private": true }"#,
        )
        .unwrap();
        run_tool(
            std::process::Command::new("npm")
                .args(["install", "--no-audit", "--no-fund"])
                .args(npm_args)
                .current_dir(dir),
            "npm installs from the registry: the network must reach it",
        );
    })
}

/// The manifest digest of the stored `image`, as `fuse inspect --json` gives it.
pub fn image_digest(sb: &Sandbox, image: &str) -> String {
    json(
        sb.fuse()
            .args(["inspect", "--json", image])
            .run()
            .assert_success(),
    )["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no digest for {image}"))
        .to_string()
}

/// A detached instance (`fuse run -d` with `FUSE_RUNTIME_DIR=runtime`), stopped by `fuse kill`
/// when dropped, so a failed assertion does not leak its VM.
pub struct Detached<'a> {
    sb: &'a Sandbox,
    runtime: PathBuf,
    pub id: String,
    stopped: bool,
}

impl<'a> Detached<'a> {
    /// Guards the instance `id` that `fuse run -d` printed; make it right after the start.
    pub fn new(sb: &'a Sandbox, runtime: &Path, id: &str) -> Detached<'a> {
        Detached {
            sb,
            runtime: runtime.to_path_buf(),
            id: id.to_string(),
            stopped: false,
        }
    }

    /// `fuse` with this instance's runtime directory.
    pub fn fuse(&self) -> FuseCmd {
        self.sb.fuse().env("FUSE_RUNTIME_DIR", &self.runtime)
    }

    /// `fuse kill ID` (its output, for the caller to assert on); the guard is then spent.
    pub fn kill(mut self) -> fuse_tests::Output {
        self.stopped = true;
        self.fuse().args(["kill", &self.id]).run()
    }

    /// The test ended the instance by other means (killed its supervisor): nothing to stop.
    pub fn ended(mut self) {
        self.stopped = true;
    }
}

impl Drop for Detached<'_> {
    fn drop(&mut self) {
        if !self.stopped {
            self.fuse().args(["kill", &self.id]).run();
        }
    }
}
