//! `fuse test IMAGE|APP`: boot an image once (through the same launch path and flags as
//! `fuse run`) and check what CI checks before promoting it:
//! the exit code, the output (regular expressions, substrings), an HTTP answer through a
//! forwarded port. Prints one line per check, writes JUnit XML (`--junit FILE`) and a JSON
//! report (`--json FILE`, or `--json` alone for stdout), exits 0 when every check passed;
//! `--attach` pushes the JSON report beside the image in its registry.
//!
//! Expectations come from the `--expect-*` flags, else from the `[test]` table of the app's
//! configuration (`docs/config.md`), else "exits with 0". The `[test]` table is read from the
//! app's configuration, or from `--config PATH` for a stored image: it is not in the image, so
//! changing a test never changes an image's digest.

use super::args::{BuildFlags, VmFlags};
use super::print::progress_line;
use crate::build::config::{Config, TestConfig};
use crate::image::manifest::rfc3339;
use crate::image::store::Store;
use crate::registry::reference::{is_remote, Reference};
use crate::registry::referrers;
use crate::run::check::{self, Expectations, HttpExpectation};
use crate::run::RunOptions;
use anyhow::{bail, Context, Result};
use regex::Regex;
use std::path::{Path, PathBuf};

/// Output lines shown on stderr under a failed output check.
const OUTPUT_TAIL: usize = 20;

/// `fuse test` flags: the build and VM flags of `fuse run`, and what to expect.
#[derive(Debug, clap::Args)]
pub(super) struct TestArgs {
    /// An app (built first) or an image name[:version] or digest.
    target: String,
    #[command(flatten)]
    build: BuildFlags,
    #[command(flatten)]
    vm: VmFlags,
    #[command(flatten)]
    registry: super::registry::RegistryFlags,
    /// The app must exit with this code.
    #[arg(long, value_name = "CODE")]
    expect_exit: Option<i32>,
    /// The output must match this regular expression (repeatable).
    #[arg(long, value_name = "REGEX")]
    expect_output: Vec<String>,
    /// The output must contain this text (repeatable).
    #[arg(long, value_name = "TEXT")]
    expect_contains: Vec<String>,
    /// `GET PATH` must answer STATUS (default 200) on guest port PORT (default: the image's
    /// health check port, else its only named port); the VM is stopped after the answer.
    #[arg(long, value_name = "PATH[=STATUS][@PORT]")]
    expect_http: Option<String>,
    /// Write a JUnit XML report.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// Write a JSON report to FILE, or to stdout with `--json` alone (check lines then go to
    /// stderr).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    json: Option<PathBuf>,
    /// Attach the JSON report to the tested image in its registry (the target must be a
    /// registry reference), as an OCI 1.1 artifact (application/vnd.fuse.test-report.v1+json)
    /// whose subject is the image's manifest.
    #[arg(long)]
    attach: bool,
}

/// The artifact type of a test report attached with `--attach`.
const TEST_REPORT: &str = "application/vnd.fuse.test-report.v1+json";

/// The expectations of a `[test]` table.
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

/// `fuse test`: returns the exit code (0 all passed, 1 otherwise).
pub(super) fn command(args: TestArgs) -> Result<i32> {
    let store = Store::open_default()?;
    let target_path = Path::new(&args.target);
    let attach_to = match args.attach {
        true if !target_path.exists() && is_remote(&args.target) => {
            Some(Reference::parse(&args.target)?)
        }
        true => bail!(
            "--attach attaches the report to an image in a registry: give a registry reference (HOST[:PORT]/REPOSITORY[:TAG]), not {}",
            args.target
        ),
        false => None,
    };
    let test_config = if target_path.exists() {
        Config::discover(target_path, args.build.config.as_deref())?
    } else {
        match &args.build.config {
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
        http: args
            .expect_http
            .as_deref()
            .map(check::parse_http)
            .transpose()?,
    };
    for pattern in &flags.output {
        Regex::new(pattern).with_context(|| {
            format!("Invalid --expect-output '{pattern}': not a regular expression")
        })?;
    }
    let mut expect = if flags.is_empty() {
        from_config(&test)
    } else {
        flags
    };
    if expect.is_empty() {
        expect.exit_code = Some(0);
    }

    // Flags over the [test] table: --env over its environment, -e over its env, --timeout
    // over its timeout.
    let mut options = RunOptions::try_from(&args.vm)?;
    let selection = &mut options.selection;
    let from_table = test.environment.is_some() || !test.env.is_empty();
    if options.cloud.is_set() && from_table {
        // The user-data decides, as --env and -e may not be given with it.
        progress_line(
            "notice: the [test] table's environment and env are not used: with --seed or --metadata-server the user-data configures the app",
        );
    } else if selection.environment.is_none() {
        selection.environment = test.environment.clone();
    }
    if !options.cloud.is_set() {
        let mut env: Vec<(String, String)> = test.env.clone().into_iter().collect();
        for (k, v) in selection.env.drain(..) {
            env.retain(|(key, _)| *key != k);
            env.push((k, v));
        }
        selection.env = env;
    }
    options.timeout = options
        .timeout
        .or(test.timeout)
        .or(Some(check::DEFAULT_TIMEOUT));
    options.check_ports()?;

    let image = super::images::resolve(&store, &args.target, &args.build, &args.registry)?;
    let report = check::run_test(
        &store,
        &image,
        &options,
        &expect,
        args.vm.verbose,
        &mut |l| progress_line(l),
    )?;

    // The result of this digest, for `fuse deploy`'s promotion gate.
    store.record_test_result(
        &image.digest,
        &crate::image::store::TestResult {
            passed: report.passed(),
            at: rfc3339(crate::host::now_secs() as i64),
            checks: report.checks.len(),
            failures: report.failures(),
        },
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
    if !report.passed() && !args.vm.verbose {
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
    if let Some(reference) = &attach_to {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        let dir = store.temp_dir()?;
        let path = dir.path().join("test-report.json");
        std::fs::write(&path, format!("{text}\n"))
            .with_context(|| format!("Cannot write {}", path.display()))?;
        let digest = referrers::attach_to_image(
            reference,
            image.manifest.arch,
            &(&args.registry).into(),
            &image.digest,
            &referrers::Artifact {
                artifact_type: TEST_REPORT,
                path: &path,
                title: "test-report.json",
                created: &rfc3339(crate::host::now_secs() as i64),
            },
        )?;
        progress_line(&format!(
            "attached the test report to {reference}: {digest}"
        ));
    }
    Ok(if report.passed() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_from_the_test_table() {
        let c = Config::from_str(
            Path::new("fuse.toml"),
            "[ports]\nweb = 8080\n[test]\nexit_code = 3\ncontains = \"hi\"\nhttp = { path = \"/h\" }\n",
        )
        .unwrap();
        let e = from_config(&c.test);
        assert_eq!(e.exit_code, Some(3));
        assert_eq!(e.contains, vec!["hi"]);
        assert_eq!(e.http.unwrap().status, 200);
    }
}
