//! Environments and injection, on real boots: one image with every environment baked in, the
//! environment selected at boot without changing the image, config files per environment, and
//! values injected at run that reach the app and nothing else (not the image, not the store,
//! not the kernel command line).

mod common;

use common::{image_digest, json, Sandbox};
use fuse_tests::assert_no_leaked_qemu;
use std::path::{Path, PathBuf};

/// Prints the variables and files the tests look at, its arguments and /proc/cmdline.
const SHOW: &str = r#"
#include <stdio.h>
#include <stdlib.h>
extern char **environ;
static void show_file(const char *path) {
    char line[512];
    FILE *f = fopen(path, "r");
    if (!f) { printf("file %s: (none)\n", path); return; }
    while (fgets(line, sizeof line, f)) printf("file %s: %s", path, line);
    fclose(f);
}
int main(int argc, char **argv) {
    for (char **e = environ; *e; e++) printf("env %s\n", *e);
    for (int i = 1; i < argc; i++) printf("arg %s\n", argv[i]);
    show_file("/etc/app/app.conf");
    show_file("/etc/app/common.conf");
    FILE *f = fopen("/proc/cmdline", "r");
    char line[1024];
    if (f && fgets(line, sizeof line, f)) printf("cmdline %s", line);
    f = fopen("/proc/meminfo", "r");
    if (f && fgets(line, sizeof line, f)) printf("meminfo %s", line);
    return 0;
}
"#;

const CONFIG: &str = r#"
name = "envshow"
version = "2.0"
memory = 400

[env]
GREETING = "hello"
LOG_LEVEL = "info"
BAKED = "baked-marker-value"

[files]
"/etc/app/common.conf" = "conf/common.conf"

[environments.dev.env]
LOG_LEVEL = "debug"

[environments.dev.files]
"/etc/app/app.conf" = "conf/dev.conf"
"#;

/// `fuse-prod.toml`: defines prod (the main file does not mention it).
const PROD_LAYER: &str = r#"
args = ["--workers", "8"]

[env]
DB_URL = "postgres://db.prod/shop"

[files]
"/etc/app/app.conf" = "conf/prod.conf"
"#;

/// An app directory with the program, fuse.toml, fuse-prod.toml and the config files.
fn app(sb: &Sandbox) -> PathBuf {
    let exe = sb.program(SHOW, "envshow", &["-static"]);
    sb.dir.write("fuse.toml", CONFIG);
    sb.dir.write("fuse-prod.toml", PROD_LAYER);
    sb.dir.write("conf/common.conf", "shared by all\n");
    sb.dir.write("conf/dev.conf", "mode = development\n");
    sb.dir.write("conf/prod.conf", "mode = production\n");
    exe
}

fn env_lines(stdout: &str) -> Vec<&str> {
    let mut env: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("env "))
        .collect();
    env.sort();
    env
}

#[test]
fn one_image_every_environment_selected_at_boot() {
    let sb = Sandbox::new();
    let exe = app(&sb);
    let built = sb.build_json(&exe);
    assert_eq!(
        built["image"], "envshow:2.0",
        "name and version from fuse.toml"
    );
    let built_digest = built["digest"].as_str().unwrap().to_string();

    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "envshow:2.0"])
            .run()
            .assert_success(),
    );
    assert_eq!(
        inspect["config"]["environments"],
        serde_json::json!(["dev", "prod"])
    );
    assert_eq!(inspect["config"]["default_environment"], "dev");

    // The configured path is a link into /run, which the init points at the selected
    // environment; every environment's copy is in the image, in the app's filesystem (a new
    // value changes the app's partition, not the root's).
    let listing = sb.rootfs_listing("envshow:2.0");
    assert!(
        listing.contains("/etc/app/app.conf -> /run/fuse/current/etc/app/app.conf"),
        "{listing}"
    );
    for path in [
        "/app/.fuse/env/dev",
        "/app/.fuse/env/prod",
        "/app/.fuse/files/dev/etc/app/app.conf",
        "/app/.fuse/files/prod/etc/app/app.conf",
        "/app/.fuse/environment",
    ] {
        assert!(listing.contains(path), "{path} missing:\n{listing}");
    }

    // No --env: the default, dev.
    let dev = sb
        .fuse()
        .args(["run", "--accel", "tcg", "envshow:2.0"])
        .run();
    dev.assert_success();
    let out = dev.stdout_str();
    let env = env_lines(&out);
    for wanted in ["FUSE_ENV=dev", "GREETING=hello", "LOG_LEVEL=debug"] {
        assert!(env.contains(&wanted), "{wanted} missing:\n{dev}");
    }
    assert!(
        !out.contains("DB_URL"),
        "prod's variable leaks into dev:\n{dev}"
    );
    assert!(
        !out.contains("arg "),
        "dev keeps the image's arguments:\n{dev}"
    );
    // `memory = 400` from fuse.toml, recorded in the image (the default is 256 MiB).
    let mem_kib: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("meminfo MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal:\n{dev}"));
    assert!(mem_kib > 300 * 1024, "MemTotal {mem_kib} kB:\n{dev}");
    dev.assert_stdout_contains("file /etc/app/app.conf: mode = development")
        .assert_stdout_contains("file /etc/app/common.conf: shared by all");

    // Boxfuse's spelling selects prod: same image, another environment.
    let prod = sb
        .fuse()
        .args(["run", "--accel", "tcg", "-env=prod", "envshow:2.0"])
        .run();
    prod.assert_success();
    let out = prod.stdout_str();
    let env = env_lines(&out);
    for wanted in [
        "FUSE_ENV=prod",
        "GREETING=hello",
        "LOG_LEVEL=info",
        "DB_URL=postgres://db.prod/shop",
    ] {
        assert!(env.contains(&wanted), "{wanted} missing:\n{prod}");
    }
    prod.assert_stdout_contains("arg --workers\narg 8\n")
        .assert_stdout_contains("file /etc/app/app.conf: mode = production")
        .assert_stdout_contains("file /etc/app/common.conf: shared by all");
    assert_ne!(
        env_lines(&dev.stdout_str()),
        env,
        "two environments, two outputs"
    );

    // Selecting an environment changed nothing stored: same digest, and a rebuild agrees.
    assert_eq!(image_digest(&sb, "envshow:2.0"), built_digest);
    let rebuilt = sb.build_json(&exe);
    assert_eq!(rebuilt["digest"].as_str().unwrap(), built_digest);
    assert_no_leaked_qemu();
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.push(path);
            }
        }
    }
    out
}

/// The files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .collect()
}

#[test]
fn injected_values_reach_the_app_but_not_the_image_or_the_kernel_command_line() {
    let sb = Sandbox::new();
    let exe = app(&sb);
    sb.fuse().arg("build").arg(&exe).run().assert_success();
    let before = image_digest(&sb, "envshow:2.0");

    // Unique per run, so finding them anywhere can only mean a leak of this run.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let from_flag = format!("flag-secret-{nonce}");
    let from_file = format!("file-secret-{nonce}");
    let env_file = sb.dir.write(
        "secrets.env",
        format!("# injected at run\nFILE_SECRET=\"{from_file}\"\nGREETING=overridden-by-file\n"),
    );
    let out = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--env", "prod", "envshow:2.0"])
        .arg("-e")
        .arg(format!("FLAG_SECRET={from_flag}"))
        .arg("--env-file")
        .arg(&env_file)
        .args(["-e", "GREETING=overridden-by-flag"])
        .run();
    out.assert_success();
    let stdout = out.stdout_str();
    let env = env_lines(&stdout);
    let flag_line = format!("FLAG_SECRET={from_flag}");
    let file_line = format!("FILE_SECRET={from_file}");
    assert!(env.contains(&flag_line.as_str()), "{out}");
    assert!(env.contains(&file_line.as_str()), "{out}");
    // -e over the env file over the image; the environment's values stay.
    assert!(env.contains(&"GREETING=overridden-by-flag"), "{out}");
    assert!(env.contains(&"DB_URL=postgres://db.prod/shop"), "{out}");

    // Not on the kernel command line (the app printed it).
    let cmdline = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cmdline "))
        .unwrap_or_else(|| panic!("no cmdline line:\n{out}"));
    assert!(cmdline.contains("fuse.root="), "{cmdline}");
    assert!(
        !cmdline.contains(&from_flag) && !cmdline.contains(&from_file),
        "{cmdline}"
    );

    // Not in the image: same digest, and no blob of it, nor any file of its root filesystem
    // (unpacked, since the blob is compressed), nor anything else in the store holds them.
    assert_eq!(
        image_digest(&sb, "envshow:2.0"),
        before,
        "the image did not change"
    );
    let inspect = json(
        sb.fuse()
            .args(["inspect", "--json", "envshow:2.0"])
            .run()
            .assert_success(),
    );
    let blobs = sb.home().join("images/blobs/sha256");
    let blob =
        |d: &serde_json::Value| blobs.join(d.as_str().unwrap().trim_start_matches("sha256:"));
    let image_blobs = [
        blob(&inspect["digest"]),
        blob(&inspect["kernel"]["digest"]),
        blob(&inspect["init"]["digest"]),
        blob(&inspect["rootfs"]["digest"]),
        blob(&inspect["appfs"]["digest"]),
    ];
    let unpacked = sb.dir.join("unpacked");
    // The root, then the app's filesystem where the VM mounts it.
    for (blob, dest) in [
        (&image_blobs[3], unpacked.clone()),
        (&image_blobs[4], unpacked.join("app")),
    ] {
        let status = std::process::Command::new("unsquashfs")
            .args(["-quiet", "-no-progress", "-f", "-d"])
            .arg(&dest)
            .arg(blob)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("unsquashfs (squashfs-tools) is needed");
        assert!(status.success());
    }
    // The scan finds what is baked, so finding nothing below means something.
    assert!(
        !files_containing(&unpacked, "baked-marker-value").is_empty(),
        "the scan cannot see baked values"
    );
    for secret in [&from_flag, &from_file] {
        for blob in &image_blobs {
            let bytes = std::fs::read(blob).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} is in blob {}",
                blob.display()
            );
        }
        assert_eq!(files_containing(&unpacked, secret), Vec::<PathBuf>::new());
        assert_eq!(files_containing(&sb.home(), secret), Vec::<PathBuf>::new());
    }
    assert_no_leaked_qemu();
}
