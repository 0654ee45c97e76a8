//! What `fuse test` checks, and the one boot it checks them on: the exit code, the output
//! (regular expressions, substrings), an HTTP answer through a forwarded port; the JUnit XML
//! and JSON reports. Where the expectations come from (flags, the `[test]` table) is the
//! command's business (`crate::cli`).

use crate::image::config::HealthProbe;
use crate::image::store::{Store, StoredImage};
use crate::run::overlay::effective_environment;
use crate::run::{launch, Hooks, RunOptions};
use anyhow::{bail, Context, Result};
use fuse_boot::poll;
use fuse_boot::vm::{PortForward, Proto, RunError, Spawned, StopRequest};
use regex::Regex;
use serde_json::json;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The whole test run's default limit (boots under TCG take seconds, JVMs longer).
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Between two HTTP probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// What one test run checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Expectations {
    pub(crate) exit_code: Option<i32>,
    pub(crate) output: Vec<String>,
    pub(crate) contains: Vec<String>,
    pub(crate) http: Option<HttpExpectation>,
}

/// `GET path` on a guest port must answer `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpExpectation {
    pub(crate) path: String,
    pub(crate) status: u16,
    /// `None`: the image's health check port, else its only named port.
    pub(crate) port: Option<u16>,
}

impl Expectations {
    pub(crate) fn is_empty(&self) -> bool {
        self.exit_code.is_none()
            && self.output.is_empty()
            && self.contains.is_empty()
            && self.http.is_none()
    }
}

/// Parses `PATH[=STATUS][@PORT]`.
pub(crate) fn parse_http(spec: &str) -> Result<HttpExpectation> {
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
pub(crate) struct CheckResult {
    pub(crate) name: String,
    pub(crate) passed: bool,
    /// Why it failed, or what was seen.
    pub(crate) detail: String,
}

/// What the VM run gave the checks.
#[derive(Debug, Clone, Default)]
pub(crate) struct Observed {
    /// The app's exit code, if it reported one.
    pub(crate) exit_code: Option<u8>,
    /// Why there is no exit code (timeout, boot failure), if there is none.
    pub(crate) run_error: Option<String>,
    pub(crate) output: String,
    /// The HTTP status seen, or why there was none.
    pub(crate) http: Option<std::result::Result<u16, String>>,
    /// Whether fuse stopped the VM itself after the HTTP check (so no exit code is expected).
    pub(crate) stopped_after_http: bool,
}

/// Evaluates the expectations against what was observed, in a fixed order.
pub(crate) fn evaluate(expect: &Expectations, seen: &Observed) -> Vec<CheckResult> {
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
pub(crate) struct Report {
    pub(crate) image: String,
    pub(crate) digest: String,
    pub(crate) environment: Option<String>,
    pub(crate) duration: Duration,
    pub(crate) exit_code: Option<u8>,
    pub(crate) checks: Vec<CheckResult>,
    pub(crate) output: String,
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub(crate) fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
    }

    /// The JSON report.
    pub(crate) fn to_json(&self) -> serde_json::Value {
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
    pub(crate) fn to_junit(&self) -> String {
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
pub(crate) fn xml_escape(text: &str) -> String {
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

/// The guest port of an HTTP expectation: given, else the health check's, else the only
/// named port.
fn http_guest_port(image: &StoredImage, http: &HttpExpectation) -> Result<u16> {
    if let Some(port) = http.port {
        return Ok(port);
    }
    let config = &image.manifest.config;
    if let Some(check) = &config.healthcheck {
        return Ok(match check.probe {
            HealthProbe::Http { port, .. } | HealthProbe::Tcp { port } => port,
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

/// Boots `image` once with `options` (through [`launch`], like `fuse run`) and checks
/// `expect` against what it did. `options.timeout` bounds the whole run; `echo` streams the
/// app's output to stderr.
pub(crate) fn run_test(
    store: &Store,
    image: &StoredImage,
    options: &RunOptions,
    expect: &Expectations,
    echo: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    let mut options = RunOptions {
        // Its own free host port for the HTTP check, and no fixed host ports of the image's:
        // parallel CI jobs must not collide. The HTTP check is the readiness check.
        image_defaults: false,
        ..options.clone()
    };
    let timeout = options.timeout.unwrap_or(DEFAULT_TIMEOUT);
    options.timeout = Some(timeout);
    let http = match &expect.http {
        Some(h) => {
            let guest = http_guest_port(image, h)?;
            let host = free_host_port()?;
            options.publish.push(PortForward {
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
        echo,
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
            let remaining = timeout.saturating_sub(started.elapsed());
            let mut last = Err("no probe finished".to_string());
            let answered = poll::wait_until(remaining, PROBE_INTERVAL, || {
                if vm_done.load(Ordering::SeqCst) {
                    return Some(false);
                }
                last = crate::run::health::http_status(host, &h.path);
                last.is_ok().then_some(true)
            });
            if answered != Some(true) {
                if let Err(why) = &last {
                    last = Err(format!(
                        "no HTTP answer within {}s (last: {why})",
                        timeout.as_secs()
                    ));
                }
            }
            *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
            if stop_after_http {
                stop.abort("The HTTP check is done");
            }
        }));
    };
    let started = Instant::now();
    let mut out = capture.clone();
    let hooks = Hooks {
        on_spawn: Some(&mut on_spawn),
        stop: Some(stop.clone()),
        ..Hooks::default()
    };
    let result = launch(store, image, &options, hooks, &mut out, progress);
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
        Err(e) => match e.chain().find_map(|c| c.downcast_ref::<RunError>()) {
            Some(run) if run.is_interrupted() => {
                return Err(e).context(format!("Test of {} interrupted", image.name))
            }
            Some(RunError::Aborted { .. }) if http.is_some() && stop_after_http => {
                seen.stopped_after_http = true;
            }
            Some(run) => {
                let text = fuse_boot::error::with_causes(run);
                seen.run_error = Some(text.lines().next().unwrap_or("the VM failed").to_string());
            }
            // Not the VM's failure (a bad option, a missing file): the test did not run.
            None => return Err(e),
        },
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
        // With --seed/--metadata-server the user-data picks it, which fuse does not read.
        environment: (!options.cloud.is_set())
            .then(|| effective_environment(&image.manifest, &options.selection))
            .flatten(),
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
}
