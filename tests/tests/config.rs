//! `fuse.toml` errors (each one line, naming the file and place, nothing stored, no VM) and
//! `fuse test` (real boots): passing and failing checks, exit codes, JUnit and JSON reports.

mod common;

use common::{json, Sandbox, HELLO};
use fuse_tests::assert_no_leaked_qemu;

#[test]
fn syntax_error_is_reported_with_file_line_and_column() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    let config = sb
        .dir
        .write("fuse.toml", "name = \"hello\"\nmemory = = 512\n");
    let line = sb.assert_refused(
        ["build".as_ref(), app.as_os_str()],
        &[&format!("{}:2:10:", config.display())],
    );
    assert!(!line.contains('\n'));
}

#[test]
fn unknown_keys_are_named_with_their_file() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    let config = sb
        .dir
        .write("fuse.toml", "name = \"hello\"\nmemroy = 512\n");
    sb.assert_refused(
        ["build".as_ref(), app.as_os_str()],
        &[
            &format!("{}:2:1:", config.display()),
            "unknown field `memroy`",
        ],
    );

    // In a layer: the layer is named.
    sb.dir.write("fuse.toml", "name = \"hello\"\n");
    let layer = sb
        .dir
        .write("fuse-prod.toml", "[env]\nA = \"1\"\n[ports]\nhttp = 80\n");
    sb.assert_refused(
        ["build".as_ref(), app.as_os_str()],
        &[
            &format!("{}:3:2:", layer.display()),
            "unknown field `ports`",
        ],
    );

    // --config names another file, with its own layers.
    std::fs::remove_file(&layer).unwrap();
    let other = sb
        .dir
        .write("other/ci.toml", "[environments.ci]\nenvs = {}\n");
    sb.assert_refused(
        [
            "build".as_ref(),
            app.as_os_str(),
            "--config".as_ref(),
            other.as_os_str(),
        ],
        &[&format!("{}:2:1:", other.display()), "`envs`"],
    );
    sb.assert_refused(
        [
            "build",
            app.to_str().unwrap(),
            "--config",
            "/nonexistent/fuse.toml",
        ],
        &["/nonexistent/fuse.toml not found"],
    );
}

#[test]
fn too_little_memory_or_zero_cpus_is_refused_by_flag_as_by_fuse_toml() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    sb.dir.write("fuse.toml", "name = \"hello\"\nmemory = 0\n");
    sb.assert_refused(
        ["build".as_ref(), app.as_os_str()],
        &["fuse.toml:2:10:", "memory must be at least 24 (MiB)"],
    );
    std::fs::remove_file(sb.dir.join("fuse.toml")).unwrap();
    for command in ["run", "test"] {
        for (flag, value, says) in [
            ("--memory", "0", "memory must be at least 24 (MiB)"),
            ("--memory", "16", "memory must be at least 24 (MiB)"),
            ("--cpus", "0", "cpus must be at least 1"),
        ] {
            sb.assert_refused(
                [
                    command.as_ref(),
                    flag.as_ref(),
                    value.as_ref(),
                    app.as_os_str(),
                ],
                &[flag, says],
            );
        }
    }
    assert_no_leaked_qemu();
}

#[test]
fn env_files_the_guest_could_not_take_are_refused_before_the_build() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    let run_with = |name: &str, text: &[u8], needles: &[&str]| {
        let file = sb.dir.write(name, text);
        sb.assert_refused(
            [
                "run".as_ref(),
                "--env-file".as_ref(),
                file.as_os_str(),
                app.as_os_str(),
            ],
            needles,
        );
    };
    run_with(
        "nul.env",
        b"A=1\nB=x\0y\n",
        &["nul.env:2:", "value of B contains a NUL byte"],
    );
    // 200 KB: over MAX_ARG_STRLEN (execve would fail with E2BIG in the guest).
    let big = format!("BIG={}\n", "x".repeat(200 * 1024));
    run_with("big.env", big.as_bytes(), &["BIG", "MAX_ARG_STRLEN"]);
    // Twelve 100 KB values: each fits, all of them are over what the init reads.
    let many: String = (0..12)
        .map(|i| format!("V{i}={}\n", "y".repeat(100 * 1024)))
        .collect();
    run_with(
        "many.env",
        many.as_bytes(),
        &["bytes", "init reads at most"],
    );
}

#[test]
fn unknown_environment_is_refused_before_boot_listing_the_defined_ones() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    sb.dir.write(
        "fuse.toml",
        "[environments.dev]\n[environments.prod.env]\nA = \"1\"\n",
    );
    sb.fuse().arg("build").arg(&app).run().assert_success();
    for spelling in [
        &["--env", "staging"][..],
        &["-env=staging"],
        &["-E", "staging"],
    ] {
        let out = sb.fuse().arg("run").args(spelling).arg("hello").run();
        out.assert_code(1).assert_stderr_contains(
            "Environment 'staging' is not defined in image hello:latest (defined: dev, prod)",
        );
        assert!(out.stdout_str().is_empty(), "{out}");
        // Before boot: the error is all there is (no accelerator notice, no QEMU output).
        assert_eq!(out.stderr_str().lines().count(), 1, "{out}");
    }

    // An image without environments says so.
    let plain = Sandbox::new();
    let app = plain.program(HELLO, "plain", &["-static"]);
    plain.fuse().arg("build").arg(&app).run().assert_success();
    plain
        .fuse()
        .args(["run", "--env", "prod", "plain"])
        .run()
        .assert_code(1)
        .assert_stderr_contains("has no environments");

    assert_no_leaked_qemu();
}

/// Several environments and no default: the image builds, and every run must name one; a run
/// without --env (foreground or detached) is refused before boot, naming the choices.
#[test]
fn several_environments_without_a_default_build_and_each_run_names_one() {
    let sb = Sandbox::new();
    let app = sb.program(REPORTER, "hello", &["-static"]);
    sb.dir.write(
        "fuse.toml",
        "[environments.test]\n[environments.prod.env]\nTOKEN = \"p\"\n",
    );
    sb.fuse().arg("build").arg(&app).run().assert_success();
    for detach in [&[][..], &["-d"]] {
        let out = sb.fuse().arg("run").args(detach).arg("hello").run();
        common::assert_one_error(
            &out,
            &["Image hello:latest has environments prod, test and no default: pick one with --env NAME"],
        );
        assert!(out.stdout_str().is_empty(), "{out}");
        assert_eq!(out.stderr_str().lines().count(), 1, "{out}");
    }
    sb.fuse()
        .args(["run", "--accel", "tcg", "--env", "prod", "hello"])
        .run()
        .assert_code(3)
        .assert_stdout_contains("booted in prod with token p");
    assert_no_leaked_qemu();
}

/// Exits with 3 after printing its environment's name.
const REPORTER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    const char *env = getenv("FUSE_ENV");
    const char *token = getenv("TOKEN");
    printf("booted in %s with token %s\n", env ? env : "none", token ? token : "none");
    printf("worker ready after 42 ms\n");
    return 3;
}
"#;

#[test]
fn fuse_test_passes_and_fails_with_reports() {
    let sb = Sandbox::new();
    let app = sb.program(REPORTER, "reporter", &["-static"]);
    sb.dir.write(
        "fuse.toml",
        r#"
[environments.dev]
[environments.ci]

[test]
environment = "ci"
exit_code = 3
output = 'ready after \d+ ms'
contains = "booted in ci"
"#,
    );

    // The [test] table of the app's fuse.toml.
    let junit = sb.dir.join("junit.xml");
    let report = sb.dir.join("report.json");
    let out = sb
        .fuse()
        .args(["test", "--accel", "tcg"])
        .arg(&app)
        .arg("--junit")
        .arg(&junit)
        .arg("--json")
        .arg(&report)
        .run();
    out.assert_success()
        .assert_stdout_contains("PASS exit code is 3: exited with 3")
        .assert_stdout_contains("PASS output contains \"booted in ci\"")
        .assert_stdout_contains("PASSED reporter:latest (environment ci): 3 of 3 checks passed");
    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    let suites = doc.root_element();
    assert_eq!(suites.tag_name().name(), "testsuites");
    assert_eq!(suites.attribute("tests"), Some("3"));
    assert_eq!(suites.attribute("failures"), Some("0"));
    let cases: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(cases.len(), 3);
    assert!(doc.descendants().all(|n| !n.has_tag_name("failure")));
    let system_out = doc
        .descendants()
        .find(|n| n.has_tag_name("system-out"))
        .and_then(|n| n.text())
        .unwrap_or_default();
    assert!(system_out.contains("booted in ci"), "{xml}");
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(value["passed"], true);
    assert_eq!(value["environment"], "ci");
    assert_eq!(value["exit_code"], 3);
    assert_eq!(value["checks"].as_array().unwrap().len(), 3);

    // Flags replace the table, and --json alone writes the report on stdout; failing checks
    // exit 1 and say why.
    let failing = sb
        .fuse()
        .args([
            "test", "--accel", "tcg", "reporter", "--env", "dev", "-e", "TOKEN=t1",
        ])
        .args(["--expect-exit", "0", "--expect-contains", "token t1"])
        .args(["--expect-output", "^never$", "--junit"])
        .arg(&junit)
        .arg("--json")
        .run();
    failing.assert_code(1);
    let value = json(&failing);
    assert_eq!(value["passed"], false);
    assert_eq!(value["failures"], 2);
    assert_eq!(value["environment"], "dev");
    let checks = value["checks"].as_array().unwrap();
    assert_eq!(checks[0]["name"], "exit code is 0");
    assert_eq!(checks[0]["detail"], "exited with 3");
    assert_eq!(checks[1]["passed"], false, "{failing}");
    assert_eq!(checks[2]["passed"], true, "{failing}");
    failing
        .assert_stderr_contains("FAIL exit code is 0: exited with 3")
        .assert_stderr_contains("FAILED reporter:latest (environment dev): 1 of 3 checks passed");
    let xml = std::fs::read_to_string(&junit).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    assert_eq!(doc.root_element().attribute("failures"), Some("2"));
    let failures: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("failure"))
        .collect();
    assert_eq!(failures.len(), 2);
    assert_eq!(failures[0].attribute("message"), Some("exited with 3"));
    assert_no_leaked_qemu();
}

/// A one-connection-at-a-time HTTP server on port 8080: 200 on /health, 404 elsewhere.
const SERVER: &str = r#"
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 8) < 0) { perror("bind"); return 1; }
    printf("listening on 8080\n");
    fflush(stdout);
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        char req[1024] = {0};
        ssize_t n = read(c, req, sizeof req - 1);
        const char *answer = n > 0 && strncmp(req, "GET /health ", 12) == 0
            ? "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
            : "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        write(c, answer, strlen(answer));
        close(c);
    }
}
"#;

#[test]
fn fuse_test_checks_an_http_answer_through_a_forwarded_port() {
    let sb = Sandbox::new();
    let app = sb.program(SERVER, "server", &["-static"]);
    sb.dir.write(
        "fuse.toml",
        "[ports]\nhttp = 8080\n[test]\nhttp = { path = \"/health\", status = 200 }\ncontains = \"listening on 8080\"\n",
    );
    let out = sb
        .fuse()
        .args(["test", "--accel", "tcg", "--timeout", "120"])
        .arg(&app)
        .run();
    out.assert_success()
        .assert_stdout_contains("PASS GET /health answers 200: answered 200")
        .assert_stdout_contains("PASS output contains \"listening on 8080\"");

    let out = sb
        .fuse()
        .args([
            "test",
            "--accel",
            "tcg",
            "server",
            "--expect-http",
            "/missing=200@8080",
        ])
        .run();
    out.assert_code(1)
        .assert_stdout_contains("FAIL GET /missing answers 200: answered 404");
    assert_no_leaked_qemu();
}

/// Reports what the VM and the run gave it: memory, vCPUs, an injected variable, a volume.
const REPORTS_ITS_MACHINE: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    long kb = 0;
    char line[256];
    FILE *m = fopen("/proc/meminfo", "r");
    while (m && fgets(line, sizeof line, m))
        if (sscanf(line, "MemTotal: %ld kB", &kb) == 1) break;
    printf("mem_mb=%ld cpus=%ld greeting=%s\n", kb / 1024, sysconf(_SC_NPROCESSORS_ONLN),
           getenv("GREETING") ? getenv("GREETING") : "-");
    FILE *f = fopen("/data/probe", "w");
    if (f && fputs("written", f) >= 0 && fclose(f) == 0) printf("volume ok\n");
    return 0;
}
"#;

/// `fuse test` takes the build and VM flags of `fuse run` (one flag group): the app is built
/// with `--kind` and `--compression`, booted with `--memory`, `--cpus`, `--env-file`, `-v`,
/// `--grace` and `--firmware`, and the checks see their effect.
#[test]
fn fuse_test_takes_the_build_and_vm_flags_of_fuse_run() {
    let sb = Sandbox::new();
    let app = sb.program(REPORTS_ITS_MACHINE, "machine-1.0", &["-static"]);
    // Starting with a byte-order mark, as Windows editors write: skipped.
    let env_file = sb
        .dir
        .write("run.env", "\u{feff}GREETING=hello-from-file\n");
    let out = sb
        .fuse()
        .args([
            "test",
            "--accel",
            "tcg",
            "--kind",
            "native",
            "--compression",
            "small",
        ])
        .args(["--memory", "200", "--cpus", "2", "-v", "probe:/data:16M"])
        .args(["--grace", "3", "--firmware", "direct", "--env-file"])
        .arg(&env_file)
        .args(["--expect-output", r"mem_mb=1[5-9][0-9] cpus=2 "])
        .args(["--expect-contains", "greeting=hello-from-file"])
        .args(["--expect-contains", "volume ok", "--expect-exit", "0"])
        .arg(&app)
        .run();
    out.assert_success()
        .assert_stdout_contains("PASSED machine:1.0: 4 of 4 checks passed");
    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "machine:1.0"])
            .run()
            .assert_success(),
    );
    assert_eq!(
        inspect["rootfs"]["format"], "squashfs+xz",
        "--compression reached the build"
    );
    assert!(
        sb.home().join("volumes/probe.ext4").exists(),
        "-v made the volume"
    );
    assert_no_leaked_qemu();
}

/// `compression = "balanced"` in fuse.toml: the root filesystem is zstd in 1 MiB blocks (what
/// `unsquashfs -s` reads from the stored blob), and the image boots.
#[test]
fn balanced_compression_writes_1mib_zstd_blocks_that_boot() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello", &["-static"]);
    sb.dir.write("fuse.toml", "compression = \"balanced\"\n");
    sb.fuse().arg("build").arg(&app).run().assert_success();
    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "hello"])
            .run()
            .assert_success(),
    );
    assert_eq!(inspect["rootfs"]["format"], "squashfs+zstd", "{inspect}");
    let digest = inspect["rootfs"]["digest"].as_str().unwrap();
    let blob = sb
        .home()
        .join("images/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let out = std::process::Command::new("unsquashfs")
        .arg("-s")
        .arg(&blob)
        .output()
        .expect("unsquashfs (squashfs-tools) is needed");
    let superblock = String::from_utf8_lossy(&out.stdout);
    assert!(
        superblock.contains("Block size 1048576") && superblock.contains("Compression zstd"),
        "{superblock}"
    );
    sb.fuse()
        .args(["run", "--accel", "tcg", "hello"])
        .run()
        .assert_success()
        .assert_stdout_contains("hello from the guest");
    assert_no_leaked_qemu();
}

/// `args` in fuse.toml (top level and per environment) are the app's arguments: they follow
/// the runtime launcher's own (`python /app/x.py`, `java … -jar /app/x.jar`), as
/// `fuse run IMAGE -- ARGS` does, instead of replacing them.
#[test]
fn configured_args_follow_the_runtime_launcher() {
    let sb = Sandbox::new();
    let script = sb.dir.write(
        "argv-1.0.py",
        "import sys\nprint(f'app args={sys.argv[1:]}')\n",
    );
    sb.dir.write(
        "fuse.toml",
        "args = [\"--port\", \"8000\"]\n[environments.dev]\n[environments.prod]\nargs = [\"--prod\"]\n",
    );
    sb.fuse().arg("build").arg(&script).run().assert_success();
    let run = |env: &str| {
        sb.fuse()
            .args(["run", "--accel", "tcg", "--env", env, "argv:1.0"])
            .run()
    };
    run("dev")
        .assert_success()
        .assert_stdout_contains("app args=['--port', '8000']");
    run("prod")
        .assert_success()
        .assert_stdout_contains("app args=['--prod']");

    let jvm = Sandbox::new();
    let jar = common::java_jar(
        jvm.dir.path(),
        "args-1.0.jar",
        "Args",
        &[(
            "Args.java",
            "public class Args { public static void main(String[] a) { \
             System.out.println(\"jar args=\" + String.join(\",\", a)); } }",
        )],
        &[],
    );
    jvm.dir
        .write("fuse.toml", "args = [\"-tcp\", \"-tcpPort\", \"9092\"]\n");
    jvm.fuse()
        .args(["run", "--accel", "tcg"])
        .arg(&jar)
        .run()
        .assert_success()
        .assert_stdout_contains("jar args=-tcp,-tcpPort,9092");
    assert_no_leaked_qemu();
}
