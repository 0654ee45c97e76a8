//! `fuse test IMAGE|APP`: boot an image once and check what CI checks before promoting it:
//! the exit code, the output (regular expressions, substrings), an HTTP answer through a
//! forwarded port. Prints one line per check, writes JUnit XML (`--junit FILE`) and a JSON
//! report (`--json FILE`, or `--json` alone for stdout), exits 0 when every check passed.
//!
//! Expectations come from the `--expect-*` flags, else from the `[test]` table of the app's
//! configuration (`docs/config.md`), else "exits with 0". The `[test]` table is read from the
//! app's configuration, or from `--config PATH` for a stored image: it is not in the image, so
//! changing a test never changes an image's digest.

use crate::config::{self, Config, TestConfig};
use crate::environments::{self, Selection, SelectionArgs};
use crate::run;
use crate::store::{Store, StoredImage};
use anyhow::{bail, Context, Result};
use fuse_boot::vm::{
    run_controlled, AccelChoice, PortForward, Proto, RunControl, RunError, Spawned, StopRequest,
    VmConfig,
};
use regex::Regex;
use serde_json::json;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The whole test run's default limit (boots under TCG take seconds, JVMs longer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Between two HTTP probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Output lines shown on stderr under a failed output check.
const OUTPUT_TAIL: usize = 20;

/// `fuse test` flags.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// An app (built first) or an image name[:version] or digest.
    pub target: String,
    /// Image name[:version] when building.
    #[arg(long)]
    pub name: Option<String>,
    /// Target architecture when building: x86_64 or aarch64 (default: the host's).
    #[arg(long, value_parser = parse_arch)]
    pub arch: Option<fuse_rootfs::Arch>,
    /// The target's root to take shared libraries from when building (see `fuse build`).
    #[arg(long, value_name = "PATH")]
    pub sysroot: Option<PathBuf>,
    #[command(flatten)]
    pub config: config::ConfigArgs,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// The app must exit with this code.
    #[arg(long, value_name = "CODE")]
    pub expect_exit: Option<i32>,
    /// The output must match this regular expression (repeatable).
    #[arg(long, value_name = "REGEX")]
    pub expect_output: Vec<String>,
    /// The output must contain this text (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub expect_contains: Vec<String>,
    /// `GET PATH` must answer STATUS (default 200) on guest port PORT (default: the image's
    /// health check port, else its only named port); the VM is stopped after the answer.
    #[arg(long, value_name = "PATH[=STATUS][@PORT]")]
    pub expect_http: Option<String>,
    /// Limit of the whole run in seconds (default: [test] timeout, else 120).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Write a JUnit XML report.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write a JSON report to FILE, or to stdout with `--json` alone (check lines then go to
    /// stderr).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub accel: AccelChoice,
    /// Guest memory in MiB (default: the image's, else 256).
    #[arg(long)]
    pub memory: Option<u32>,
    /// Guest vCPUs (default: the image's, else 1).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Stream the app's output to stderr while it runs.
    #[arg(long, short)]
    pub verbose: bool,
}

fn parse_arch(s: &str) -> Result<fuse_rootfs::Arch, String> {
    s.parse()
        .map_err(|e: fuse_rootfs::arch::UnknownArch| e.to_string())
}

fn parse_accel(s: &str) -> Result<AccelChoice, String> {
    s.parse::<AccelChoice>().map_err(|e| e.to_string())
}

/// What one test run checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    pub exit_code: Option<i32>,
    pub output: Vec<String>,
    pub contains: Vec<String>,
    pub http: Option<HttpExpectation>,
}

/// `GET path` on a guest port must answer `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpExpectation {
    pub path: String,
    pub status: u16,
    /// `None`: the image's health check port, else its only named port.
    pub port: Option<u16>,
}

impl Expectations {
    fn is_empty(&self) -> bool {
        self.exit_code.is_none()
            && self.output.is_empty()
            && self.contains.is_empty()
            && self.http.is_none()
    }

    fn from_config(test: &TestConfig) -> Expectations {
        Expectations {
            exit_code: test.exit_code,
            output: test.output.clone(),
            contains: test.contains.clone(),
            http: test.http.as_ref().map(|h| HttpExpectation {
                path: h.path.clone(),
                status: h.status,
                port: h.port,
            }),
        }
    }
}

/// Parses `PATH[=STATUS][@PORT]`.
pub fn parse_http(spec: &str) -> Result<HttpExpectation> {
    let invalid = || {
        anyhow::anyhow!(
            "Invalid --expect-http '{spec}': use PATH[=STATUS][@GUEST_PORT], e.g. /health=200@8080"
        )
    };
    let (rest, port) = match spec.rsplit_once('@') {
        Some((rest, port)) => (
            rest,
            Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(invalid)?,
            ),
        ),
        None => (spec, None),
    };
    let (path, status) = match rest.rsplit_once('=') {
        Some((path, status)) => (
            path,
            status
                .parse::<u16>()
                .ok()
                .filter(|s| (100..=599).contains(s))
                .ok_or_else(invalid)?,
        ),
        None => (rest, 200),
    };
    if !path.starts_with('/') || path.contains(char::is_whitespace) {
        return Err(invalid());
    }
    Ok(HttpExpectation {
        path: path.to_string(),
        status,
        port,
    })
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// Why it failed, or what was seen.
    pub detail: String,
}

/// What the VM run gave the checks.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The app's exit code, if it reported one.
    pub exit_code: Option<u8>,
    /// Why there is no exit code (timeout, boot failure), if there is none.
    pub run_error: Option<String>,
    pub output: String,
    /// The HTTP status seen, or why there was none.
    pub http: Option<std::result::Result<u16, String>>,
    /// Whether fuse stopped the VM itself after the HTTP check (so no exit code is expected).
    pub stopped_after_http: bool,
}

/// Evaluates the expectations against what was observed, in a fixed order.
pub fn evaluate(expect: &Expectations, seen: &Observed) -> Vec<CheckResult> {
    let mut results = Vec::new();
    let lines = seen.output.lines().count();
    if let Some(http) = &expect.http {
        let name = format!("GET {} answers {}", http.path, http.status);
        results.push(match &seen.http {
            Some(Ok(status)) if *status == http.status => pass(name, format!("answered {status}")),
            Some(Ok(status)) => fail(name, format!("answered {status}")),
            Some(Err(why)) => fail(name, why.clone()),
            None => fail(name, "no answer".into()),
        });
    }
    if let Some(code) = expect.exit_code {
        let name = format!("exit code is {code}");
        results.push(match (seen.exit_code, &seen.run_error) {
            (Some(got), _) if i32::from(got) == code => pass(name, format!("exited with {got}")),
            (Some(got), _) => fail(name, format!("exited with {got}")),
            (None, Some(why)) => fail(name, why.clone()),
            (None, None) => fail(name, "no exit code was reported".into()),
        });
    }
    for pattern in &expect.output {
        let name = format!("output matches /{pattern}/");
        results.push(match Regex::new(pattern) {
            Err(e) => fail(name, format!("invalid regular expression: {e}")),
            Ok(re) => match re.find(&seen.output) {
                Some(m) => pass(name, format!("matched '{}'", m.as_str())),
                None => fail(name, format!("no match in {lines} lines of output")),
            },
        });
    }
    for text in &expect.contains {
        let name = format!("output contains {text:?}");
        results.push(if seen.output.contains(text.as_str()) {
            pass(name, "found".into())
        } else {
            fail(name, format!("not found in {lines} lines of output"))
        });
    }
    results
}

fn pass(name: String, detail: String) -> CheckResult {
    CheckResult {
        name,
        passed: true,
        detail,
    }
}

fn fail(name: String, detail: String) -> CheckResult {
    CheckResult {
        name,
        passed: false,
        detail,
    }
}

/// Everything a report says.
#[derive(Debug, Clone)]
pub struct Report {
    pub image: String,
    pub digest: String,
    pub environment: Option<String>,
    pub duration: Duration,
    pub exit_code: Option<u8>,
    pub checks: Vec<CheckResult>,
    pub output: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
    }

    /// The JSON report.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "image": self.image,
            "digest": self.digest,
            "environment": self.environment,
            "passed": self.passed(),
            "tests": self.checks.len(),
            "failures": self.failures(),
            "duration_secs": self.duration.as_secs_f64(),
            "exit_code": self.exit_code,
            "checks": self.checks.iter().map(|c| json!({
                "name": c.name,
                "passed": c.passed,
                "detail": c.detail,
            })).collect::<Vec<_>>(),
            "output": self.output,
        })
    }

    /// The JUnit XML report: one suite (the image), one test case per check, the app's output
    /// as the suite's system-out.
    pub fn to_junit(&self) -> String {
        let suite = format!("fuse test {}", self.image);
        let time = format!("{:.3}", self.duration.as_secs_f64());
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        xml.push_str(&format!(
            "<testsuites name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" time=\"{time}\">\n",
            xml_escape(&suite),
            self.checks.len(),
            self.failures()
        ));
        xml.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"0\" time=\"{time}\">\n",
            xml_escape(&suite),
            self.checks.len(),
            self.failures()
        ));
        xml.push_str("    <properties>\n");
        let mut property = |name: &str, value: &str| {
            xml.push_str(&format!(
                "      <property name=\"{name}\" value=\"{}\"/>\n",
                xml_escape(value)
            ));
        };
        property("image", &self.image);
        property("digest", &self.digest);
        if let Some(env) = &self.environment {
            property("environment", env);
        }
        xml.push_str("    </properties>\n");
        for check in &self.checks {
            let open = format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{time}\"",
                xml_escape(&self.image),
                xml_escape(&check.name)
            );
            if check.passed {
                xml.push_str(&format!("{open}/>\n"));
            } else {
                xml.push_str(&format!(
                    "{open}>\n      <failure message=\"{}\" type=\"expectation\">{}</failure>\n    </testcase>\n",
                    xml_escape(&check.detail),
                    xml_escape(&check.detail)
                ));
            }
        }
        xml.push_str(&format!(
            "    <system-out>{}</system-out>\n",
            xml_escape(&self.output)
        ));
        xml.push_str("  </testsuite>\n</testsuites>\n");
        xml
    }
}

/// Escapes text for XML attributes and content, dropping the characters XML 1.0 cannot hold
/// (console output has control characters).
pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// A host port nobody listens on now (the kernel's pick), for the forwarded test port.
fn free_host_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("Cannot find a free host port for the HTTP check")?;
    Ok(listener.local_addr()?.port())
}

/// Output captured for the checks, and streamed to stderr with `--verbose`.
#[derive(Clone)]
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        if self.echo {
            let _ = std::io::stderr().write_all(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `fuse test`: returns the exit code (0 all passed, 1 otherwise).
pub fn command(args: TestArgs, progress: &mut dyn FnMut(&str)) -> Result<i32> {
    let store = Store::open_default()?;
    let target_path = Path::new(&args.target);
    let test_config = if target_path.exists() {
        Config::discover(target_path, args.config.path.as_deref())?
    } else {
        match &args.config.path {
            Some(path) => Some(Config::load(path)?),
            None => None,
        }
    };
    let test = test_config
        .as_ref()
        .map(|c| c.test.clone())
        .unwrap_or_default();

    let flags = Expectations {
        exit_code: args.expect_exit,
        output: args.expect_output.clone(),
        contains: args.expect_contains.clone(),
        http: args.expect_http.as_deref().map(parse_http).transpose()?,
    };
    for pattern in &flags.output {
        Regex::new(pattern).with_context(|| {
            format!("Invalid --expect-output '{pattern}': not a regular expression")
        })?;
    }
    let mut expect = if flags.is_empty() {
        Expectations::from_config(&test)
    } else {
        flags
    };
    if expect.is_empty() {
        expect.exit_code = Some(0);
    }

    // Flags over the [test] table: --env over its environment, -e over its env.
    let mut selection = args.selection.selection()?;
    if selection.environment.is_none() {
        selection.environment = test.environment.clone();
    }
    let mut env: Vec<(String, String)> = test.env.clone().into_iter().collect();
    for (k, v) in selection.env.drain(..) {
        env.retain(|(key, _)| *key != k);
        env.push((k, v));
    }
    selection.env = env;

    let image = run::resolve_image(
        &store,
        &args.target,
        crate::builder::BuildRequest {
            name: args.name.clone(),
            arch: args.arch,
            config: args.config.path.clone(),
            interpreters: crate::runtimes::Interpreters {
                sysroot: args.sysroot.clone(),
                ..Default::default()
            },
            ..Default::default()
        },
        progress,
    )?;
    let timeout = args
        .timeout
        .map(Duration::from_secs)
        .or(test.timeout)
        .unwrap_or(DEFAULT_TIMEOUT);
    let report = run_test(
        &store, &image, &selection, &expect, timeout, &args, progress,
    )?;

    // Check lines on stdout, unless stdout carries the JSON report.
    let json_to_stdout = args.json.as_deref() == Some(Path::new("-"));
    let mut lines = String::new();
    for check in &report.checks {
        let mark = if check.passed { "PASS" } else { "FAIL" };
        lines.push_str(&format!("{mark} {}: {}\n", check.name, check.detail));
    }
    let summary = format!(
        "{} {}{}: {} of {} checks passed in {:.1}s",
        if report.passed() { "PASSED" } else { "FAILED" },
        report.image,
        report
            .environment
            .as_deref()
            .map(|e| format!(" (environment {e})"))
            .unwrap_or_default(),
        report.checks.len() - report.failures(),
        report.checks.len(),
        report.duration.as_secs_f64()
    );
    lines.push_str(&summary);
    lines.push('\n');
    if json_to_stdout {
        eprint!("{lines}");
    } else {
        print!("{lines}");
    }
    if !report.passed() && !args.verbose {
        let tail: Vec<&str> = report.output.lines().collect();
        let start = tail.len().saturating_sub(OUTPUT_TAIL);
        eprintln!("fuse: the app's last {} output lines:", tail.len() - start);
        for line in &tail[start..] {
            eprintln!("  | {line}");
        }
    }

    if let Some(path) = &args.junit {
        std::fs::write(path, report.to_junit())
            .with_context(|| format!("Cannot write the JUnit report {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        if json_to_stdout {
            println!("{text}");
        } else {
            std::fs::write(path, format!("{text}\n"))
                .with_context(|| format!("Cannot write the JSON report {}", path.display()))?;
        }
    }
    Ok(if report.passed() { 0 } else { 1 })
}

/// The guest port of an HTTP expectation: given, else the health check's, else the only
/// named port.
fn http_guest_port(image: &StoredImage, http: &HttpExpectation) -> Result<u16> {
    if let Some(port) = http.port {
        return Ok(port);
    }
    let config = &image.manifest.config;
    if let Some(check) = &config.healthcheck {
        return Ok(match check.probe {
            config::HealthProbe::Http { port, .. } | config::HealthProbe::Tcp { port } => port,
        });
    }
    if config.ports.len() == 1 {
        return Ok(*config.ports.values().next().expect("one port"));
    }
    bail!(
        "The HTTP check needs a guest port: give it as --expect-http {}@PORT (or name one in [ports] of fuse.toml)",
        http.path
    )
}

fn run_test(
    store: &Store,
    image: &StoredImage,
    selection: &Selection,
    expect: &Expectations,
    timeout: Duration,
    args: &TestArgs,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    let manifest = &image.manifest;
    let overlay = environments::run_overlay(manifest, selection, None)?;
    let scratch = store.temp_dir()?;
    // The image's disk, booted directly (kernel and initramfs out of its UKI).
    let (root_disk, boot, firmware) = crate::disk_image::vm_boot(
        store,
        image,
        crate::disk_image::BootMode::Direct,
        scratch.path(),
    )?;
    let mut vm = VmConfig::new(
        manifest.arch,
        boot.kernel,
        boot.initrd,
        root_disk,
        boot.cmdline,
    );
    vm.firmware = firmware;
    vm.memory_mib = args
        .memory
        .or(manifest.config.memory)
        .unwrap_or(run::DEFAULT_MEMORY_MIB);
    vm.cpus = args.cpus.or(manifest.config.cpus).unwrap_or(1);
    vm.accel = args.accel;
    vm.network = true;
    vm.timeout = Some(timeout);
    vm.fw_cfg
        .extend(environments::write_overlay(scratch.path(), &overlay)?);
    let http = match &expect.http {
        Some(h) => {
            let guest = http_guest_port(image, h)?;
            let host = free_host_port()?;
            vm.port_forwards.push(PortForward {
                host,
                guest,
                proto: Proto::Tcp,
            });
            Some((h.clone(), host))
        }
        None => None,
    };

    let capture = Capture {
        buf: Arc::new(Mutex::new(Vec::new())),
        echo: args.verbose,
    };
    let stop = StopRequest::new();
    let http_seen: Arc<Mutex<Option<std::result::Result<u16, String>>>> = Arc::default();
    // Without an exit-code expectation the app is a server: stop the VM once it answered.
    let stop_after_http = expect.exit_code.is_none();
    let vm_done = Arc::new(AtomicBool::new(false));
    let mut prober = None;
    let mut on_spawn = |s: &Spawned| {
        let Some((h, host)) = http.clone() else {
            return;
        };
        let (stop, seen, started) = (stop.clone(), http_seen.clone(), s.started);
        let vm_done = vm_done.clone();
        prober = Some(std::thread::spawn(move || {
            let deadline = started + timeout;
            let mut last = Err("no probe finished".to_string());
            while Instant::now() < deadline && !vm_done.load(Ordering::SeqCst) {
                last = crate::health::http_status(host, &h.path);
                if last.is_ok() {
                    break;
                }
                std::thread::sleep(PROBE_INTERVAL);
            }
            if let Err(why) = &last {
                last = Err(format!(
                    "no HTTP answer within {}s (last: {why})",
                    timeout.as_secs()
                ));
            }
            *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
            if stop_after_http {
                stop.abort("The HTTP check is done");
            }
        }));
    };
    let started = Instant::now();
    let mut out = capture.clone();
    let result = run_controlled(
        &vm,
        &mut out,
        progress,
        RunControl {
            stop: Some(stop.clone()),
            on_spawn: Some(&mut on_spawn),
        },
    );
    let duration = started.elapsed();
    if let Some(thread) = prober.take() {
        // The VM is gone: a probe still waiting would only time out.
        vm_done.store(true, Ordering::SeqCst);
        let _ = thread.join();
    }
    let mut seen = Observed {
        output: String::from_utf8_lossy(&capture.buf.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned(),
        http: http_seen.lock().unwrap_or_else(|e| e.into_inner()).take(),
        ..Observed::default()
    };
    match result {
        Ok(outcome) => seen.exit_code = Some(outcome.exit_code),
        Err(e) if e.is_interrupted() => {
            return Err(e).context(format!("Test of {} interrupted", image.name))
        }
        Err(RunError::Aborted { .. }) if http.is_some() && stop_after_http => {
            seen.stopped_after_http = true;
        }
        Err(e) => {
            let text = e.to_string();
            seen.run_error = Some(text.lines().next().unwrap_or("the VM failed").to_string());
        }
    }
    if http.is_some() && seen.http.is_none() {
        seen.http = Some(Err(seen
            .run_error
            .clone()
            .unwrap_or_else(|| "the app exited before answering".into())));
    }
    let mut checks = evaluate(expect, &seen);
    // A VM that failed without any check noticing (no exit expectation) still fails the test.
    if let Some(why) = &seen.run_error {
        if expect.exit_code.is_none() && expect.http.is_none() {
            checks.push(fail("the app runs to completion".into(), why.clone()));
        }
    }
    Ok(Report {
        image: image.name.to_string(),
        digest: image.digest.clone(),
        environment: environments::effective_environment(manifest, selection),
        duration,
        exit_code: seen.exit_code,
        checks,
        output: seen.output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(code: Option<u8>, output: &str) -> Observed {
        Observed {
            exit_code: code,
            output: output.into(),
            ..Observed::default()
        }
    }

    #[test]
    fn checks_pass_and_fail_with_a_reason() {
        let expect = Expectations {
            exit_code: Some(0),
            output: vec![r"listening on \d+".into()],
            contains: vec!["ready".into(), "missing".into()],
            http: None,
        };
        let results = evaluate(&expect, &observed(Some(0), "ready\nlistening on 8080\n"));
        let passed: Vec<bool> = results.iter().map(|r| r.passed).collect();
        assert_eq!(passed, vec![true, true, true, false]);
        assert_eq!(results[0].name, "exit code is 0");
        assert_eq!(results[1].detail, "matched 'listening on 8080'");
        assert!(results[3].detail.contains("not found in 2 lines"));

        let wrong = evaluate(&expect, &observed(Some(3), ""));
        assert_eq!(wrong[0].detail, "exited with 3");
        let timed_out = Observed {
            run_error: Some("The VM did not finish within 5s".into()),
            ..Observed::default()
        };
        assert!(evaluate(&expect, &timed_out)[0]
            .detail
            .contains("within 5s"));
    }

    #[test]
    fn http_checks() {
        let expect = Expectations {
            http: Some(parse_http("/health=204@8080").unwrap()),
            ..Expectations::default()
        };
        let ok = Observed {
            http: Some(Ok(204)),
            ..Observed::default()
        };
        assert!(evaluate(&expect, &ok)[0].passed);
        let bad = Observed {
            http: Some(Ok(500)),
            ..Observed::default()
        };
        assert_eq!(evaluate(&expect, &bad)[0].detail, "answered 500");
        assert_eq!(
            parse_http("/").unwrap(),
            HttpExpectation {
                path: "/".into(),
                status: 200,
                port: None
            }
        );
        for bad in ["health", "/a=99", "/a@0", "/a=200@x", "/a b"] {
            assert!(parse_http(bad).is_err(), "{bad}");
        }
    }

    fn report(passed: bool) -> Report {
        Report {
            image: "web:1.0".into(),
            digest: "sha256:abc".into(),
            environment: Some("prod".into()),
            duration: Duration::from_millis(1500),
            exit_code: Some(0),
            checks: vec![
                pass("exit code is 0".into(), "exited with 0".into()),
                CheckResult {
                    name: "output contains \"<ok>\"".into(),
                    passed,
                    detail: "not found & more".into(),
                },
            ],
            output: "line \u{1b}[1mbold\u{1b}[0m <tag>\n".into(),
        }
    }

    #[test]
    fn junit_and_json_reports() {
        let failed = report(false);
        let xml = failed.to_junit();
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert!(
            xml.contains("name=\"output contains &quot;&lt;ok&gt;&quot;\""),
            "{xml}"
        );
        assert!(
            xml.contains("<failure message=\"not found &amp; more\""),
            "{xml}"
        );
        assert!(
            xml.contains("<system-out>line [1mbold[0m &lt;tag&gt;\n</system-out>"),
            "{xml}"
        );
        assert!(xml.contains("<property name=\"environment\" value=\"prod\"/>"));
        assert!(!xml.contains('\u{1b}'), "no control characters in XML");
        let json = failed.to_json();
        assert_eq!(json["passed"], false);
        assert_eq!(json["failures"], 1);
        assert_eq!(json["checks"][1]["passed"], false);
        assert_eq!(json["environment"], "prod");

        let ok = report(true);
        assert!(ok.passed());
        assert!(ok.to_junit().contains("failures=\"0\""));
    }

    #[test]
    fn expectations_from_the_test_table() {
        let c = Config::from_str(
            Path::new("fuse.toml"),
            "[ports]\nweb = 8080\n[test]\nexit_code = 3\ncontains = \"hi\"\nhttp = { path = \"/h\" }\n",
        )
        .unwrap();
        let e = Expectations::from_config(&c.test);
        assert_eq!(e.exit_code, Some(3));
        assert_eq!(e.contains, vec!["hi"]);
        assert_eq!(e.http.unwrap().status, 200);
    }
}
