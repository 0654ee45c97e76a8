//! The cloud machine (`fuse run --machine cloud`): the image's disk booted as an EC2 Nitro
//! instance boots it, under QEMU. UEFI firmware (OVMF; AAVMF with ACPI tables on aarch64, as
//! Graviton), the root disk on NVMe (no virtio disk), an Intel e1000 NIC (no virtio-net). The
//! app, a small C server, reports the hardware it sees over the network (a published port on
//! the host's 127.0.0.1), and a graceful stop (QMP system_powerdown: the ACPI power button)
//! reaches it as SIGTERM.
//!
//! The run-time configuration as a cloud hands it over: fuse's user-data (made by `fuse
//! userdata`) from an IMDSv2 server the test runs on the host's loopback, which the guest
//! reaches at 169.254.169.254:80 (`fuse run --metadata-server`: QEMU's guestfwd); the same
//! from a NoCloud disk (`fuse export --format nocloud`, and one made by genisoimage from
//! hand-written files, as cloud-init's documentation makes them); and neither, where the
//! image boots with its baked default environment.

mod common;

use common::imds::Imds;
use common::{free_port, Sandbox};
use fuse_boot::poll::wait_until;
use fuse_tests::{assert_no_leaked_qemu, on_every_arch};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

/// Describes the machine it runs on (root disk, NIC driver, firmware, how the hardware is
/// described), prints that, serves it on 8080, and exits 0 on SIGTERM saying so.
const CLOUD_APP: &str = r#"
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }
static int exists(const char *p) { struct stat st; return stat(p, &st) == 0; }
int main(void) {
    char link[256], hw[512];
    ssize_t n = readlink("/sys/class/net/eth0/device/driver", link, sizeof link - 1);
    link[n > 0 ? n : 0] = 0;
    const char *nic = n > 0 ? strrchr(link, '/') + 1 : "none";
    snprintf(hw, sizeof hw, "root disk: %s\nnic: %s\nfirmware: %s\nhardware described by: %s\n",
             exists("/sys/block/nvme0n1") ? "nvme0n1" : exists("/sys/block/vda") ? "vda" : "?",
             nic, exists("/sys/firmware/efi") ? "uefi" : "none",
             exists("/sys/firmware/devicetree/base") ? "device tree"
             : exists("/sys/firmware/acpi/tables") ? "acpi" : "?");
    printf("%s", hw);
    fflush(stdout);
    /* No SA_RESTART: SIGTERM interrupts accept(). */
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, 0);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(8080)};
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 16) < 0) { perror("listen"); return 1; }
    while (!stop) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        char buf[2048];
        (void)read(c, buf, sizeof buf);
        char r[700];
        snprintf(r, sizeof r, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n%s", hw);
        (void)write(c, r, strlen(r));
        close(c);
    }
    printf("SIGTERM: stopping cleanly\n");
    return 0;
}
"#;

on_every_arch! {
    cloud_machine_boots_nvme_root_with_e1000_and_stops_gracefully => cloud_machine;
}

/// Polls `GET /` on the host port until it answers 200 (bounded: UEFI under TCG is slow),
/// while fuse keeps running; returns the body.
fn wait_for_body(running: &mut fuse_tests::Running, port: u16) -> String {
    let answer = wait_until(Duration::from_secs(400), Duration::from_millis(300), || {
        assert!(running.is_running(), "fuse exited early");
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .strip_prefix("HTTP/1.0 200 OK\r\n")
            .and_then(|rest| rest.split_once("\r\n\r\n"))
            .map(|(_, body)| body.to_string())
    });
    answer.expect("the app never answered through the published port")
}

fn cloud_machine(arch: &str) {
    let sb = Sandbox::new();
    let app = sb.program_for(arch, CLOUD_APP, "cloud-app", &["-static"]);
    // Build first so the run below only boots.
    sb.fuse()
        .args(["build", "--arch", arch])
        .arg(&app)
        .run()
        .assert_success();
    let port = free_port();
    let mut running = sb
        .fuse()
        .args([
            "run",
            "--machine",
            "cloud",
            "--accel",
            "tcg",
            "--arch",
            arch,
        ])
        .args(["--grace", "30", "-p"])
        .arg(format!("{port}:8080"))
        .arg(&app)
        .spawn();
    // What the guest's kernel found, as the app saw it, fetched through the e1000 NIC (its
    // address came from DHCP over it).
    let body = wait_for_body(&mut running, port);
    assert_eq!(
        body,
        "root disk: nvme0n1\nnic: e1000\nfirmware: uefi\nhardware described by: acpi\n"
    );
    // fuse stops the VM with QMP system_powerdown: the ACPI power button (on aarch64 through
    // the virt machine's GED), which the kernel turns into SIGTERM for the init, which
    // forwards it to the app.
    running.signal(libc::SIGTERM);
    let out = running.wait();
    out.assert_code(0)
        .assert_stdout_contains("root disk: nvme0n1\nnic: e1000\n")
        .assert_stdout_contains("SIGTERM: stopping cleanly\n");
    assert_no_leaked_qemu();
}

/// `--machine` takes only the machines there are: clap's usage error names them, before
/// anything is read or built.
#[test]
fn unknown_machine_is_refused_naming_the_choices() {
    let sb = Sandbox::new();
    let out = sb.fuse().args(["run", "--machine", "ec2", "x"]).run();
    out.assert_code(2)
        .assert_stderr_contains("Unknown machine 'ec2': use virtio or cloud");
    assert!(out.stdout_str().is_empty(), "{out}");
}

/// Prints what its run-time configuration made of it: the environment's variable, an injected
/// one, its arguments, its host name and the /etc/hosts line naming it.
const CONFIG_APP: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char host[128] = "", line[512];
    gethostname(host, sizeof host);
    printf("app-env: %s\n", getenv("APP_ENV") ? getenv("APP_ENV") : "(unset)");
    printf("injected: %s\n", getenv("INJECTED") ? getenv("INJECTED") : "(unset)");
    for (int i = 1; i < argc; i++) printf("arg: %s\n", argv[i]);
    printf("hostname: %s\n", host);
    FILE *f = fopen("/etc/hosts", "r");
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, host)) printf("hosts: %s", line);
    return 0;
}
"#;

const CONFIG_TOML: &str = r#"
name = "cfgshow"
args = ["baked-arg"]

[environments.dev.env]
APP_ENV = "dev"

[environments.prod.env]
APP_ENV = "prod"
"#;

/// Builds the `cfgshow` image for `arch` (environments dev, the default, and prod).
fn build_config_app(sb: &Sandbox, arch: &str) {
    let exe = sb.program_for(arch, CONFIG_APP, "cfgshow", &["-static"]);
    sb.dir.write("fuse.toml", CONFIG_TOML);
    sb.fuse()
        .args(["build", "--arch", arch])
        .arg(&exe)
        .run()
        .assert_success();
}

/// Boots `cfgshow` on the cloud machine with `seed` attached as its configuration disk;
/// returns how it ended (successfully) and its console output.
fn boot_with_seed(
    sb: &Sandbox,
    arch: &str,
    seed: &std::path::Path,
) -> (fuse_tests::Output, String) {
    let out = sb
        .fuse()
        .args([
            "run",
            "--machine",
            "cloud",
            "--accel",
            "tcg",
            "--arch",
            arch,
        ])
        .arg("--seed")
        .arg(seed)
        .arg("cfgshow")
        .run();
    out.assert_success();
    let stdout = out.stdout_str();
    (out, stdout)
}

/// The prefix of the init's console line saying where the run-time configuration came from.
const CONFIGURATION: &str = "fuse-init: run-time configuration: ";

/// Lines of `out` starting with `prefix`, without it.
fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter_map(|l| l.strip_prefix(prefix)).collect()
}

on_every_arch! {
    user_data_from_imdsv2_selects_the_environment_and_injects => imds_user_data;
}

fn imds_user_data(arch: &str) {
    let sb = Sandbox::new();
    build_config_app(&sb, arch);
    // The injected value comes from fuse's own environment (`-e INJECTED`), not argv; it
    // holds what JSON must escape.
    let secret = "s3cret \"quoted\" \\ back";
    let user_data = sb.dir.join("user-data.json");
    sb.fuse()
        .env("INJECTED", secret)
        .args([
            "userdata", "cfgshow", "--env", "prod", "-e", "INJECTED", "-o",
        ])
        .arg(&user_data)
        .args(["--", "run-arg", "two words"])
        .run()
        .assert_success();
    let imds = Imds::start(
        std::fs::read(&user_data).unwrap(),
        "ip-10-1-2-3.eu-west-1.compute.internal",
    );
    // The server is an IMDSv2 one: without a token, nothing.
    let mut plain = TcpStream::connect((Ipv4Addr::LOCALHOST, imds.port)).unwrap();
    plain
        .write_all(b"GET /latest/user-data HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // The server records a request after its connection closed: wait for it, then forget it.
    wait_until(Duration::from_secs(10), Duration::from_millis(10), || {
        (imds.seen().len() == 1).then_some(())
    })
    .expect("the server recorded the refused request");
    imds.clear_seen();

    let out = sb
        .fuse()
        .args([
            "run",
            "--machine",
            "cloud",
            "--accel",
            "tcg",
            "--arch",
            arch,
        ])
        .arg("--metadata-server")
        .arg(format!("127.0.0.1:{}", imds.port))
        .arg("cfgshow")
        .run();
    out.assert_success();
    let stdout = out.stdout_str();
    assert_eq!(
        lines_with(&stdout, CONFIGURATION),
        ["user-data from EC2 IMDSv2; environment prod"],
        "{out}"
    );
    assert_eq!(lines_with(&stdout, "app-env: "), ["prod"], "{out}");
    assert_eq!(lines_with(&stdout, "injected: "), [secret], "{out}");
    // The user-data's arguments replace the baked ones.
    assert_eq!(
        lines_with(&stdout, "arg: "),
        ["run-arg", "two words"],
        "{out}"
    );
    // The instance's name from the metadata: the short name, the FQDN beside it in /etc/hosts.
    assert_eq!(lines_with(&stdout, "hostname: "), ["ip-10-1-2-3"], "{out}");
    let hosts = lines_with(&stdout, "hosts: ");
    assert!(
        hosts.len() == 1
            && hosts[0].ends_with(" ip-10-1-2-3.eu-west-1.compute.internal ip-10-1-2-3"),
        "{out}"
    );
    // IMDSv2 only: a token first, then every request with it; IMDSv1 (no token) never.
    let seen = imds.seen();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("PUT", "/latest/api/token"),
        "{seen:?}"
    );
    assert!(
        seen[0]
            .ttl
            .as_deref()
            .is_some_and(|t| t.parse::<u32>().is_ok()),
        "{seen:?}"
    );
    assert!(seen[1..].iter().all(|s| s.with_token), "{seen:?}");
    let paths: Vec<&str> = seen[1..].iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/latest/user-data", "/latest/meta-data/local-hostname"],
        "{seen:?}"
    );
    // The secret reached the app, and nothing else of fuse's: not the console's init lines.
    assert!(
        !stdout
            .lines()
            .any(|l| l.starts_with("fuse-init") && l.contains("s3cret")),
        "{out}"
    );
    assert_no_leaked_qemu();
}

/// `fuse export --format nocloud`: the user-data of one deployment on a vfat `CIDATA` disk, attached as an extra virtio disk; on the cloud machine the root is NVMe.
#[test]
fn user_data_from_a_nocloud_disk_made_by_fuse_export() {
    let arch = "x86_64";
    let sb = Sandbox::new();
    build_config_app(&sb, arch);
    let seed = sb.dir.join("seed.img");
    sb.fuse()
        .args(["export", "cfgshow", "--format", "nocloud", "--env", "prod"])
        .args(["-e", "INJECTED=from-the-seed", "-o"])
        .arg(&seed)
        .run()
        .assert_success();
    let (out, stdout) = boot_with_seed(&sb, arch, &seed);
    assert_eq!(
        lines_with(&stdout, CONFIGURATION),
        ["user-data from the NoCloud disk vda (CIDATA); environment prod"],
        "{out}"
    );
    assert_eq!(lines_with(&stdout, "app-env: "), ["prod"], "{out}");
    assert_eq!(
        lines_with(&stdout, "injected: "),
        ["from-the-seed"],
        "{out}"
    );
    // No args in the user-data: the baked ones.
    assert_eq!(lines_with(&stdout, "arg: "), ["baked-arg"], "{out}");
    assert_no_leaked_qemu();
}

/// A NoCloud seed as cloud-init's documentation makes one, by hand: user-data written
/// following docs/config.md, meta-data with the instance's host name, an iso9660 image by
/// genisoimage (volume id `cidata`, Joliet and Rock Ridge).
#[test]
fn a_hand_written_iso9660_seed_configures_the_app() {
    let arch = "x86_64";
    let sb = Sandbox::new();
    build_config_app(&sb, arch);
    let files = sb.dir.join("seed-files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(
        files.join("user-data"),
        "{\n  \"fuse\": 1,\n  \"env\": {\"INJECTED\": \"by hand \\u00e9\\ud83d\\ude00\"},\n  \"args\": []\n}\n",
    )
    .unwrap();
    std::fs::write(
        files.join("meta-data"),
        "instance-id: i-0123456789\nlocal-hostname: shop-7\n",
    )
    .unwrap();
    let seed = sb.dir.join("seed.iso");
    let status = std::process::Command::new("genisoimage")
        .args(["-quiet", "-output"])
        .arg(&seed)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(files.join("user-data"))
        .arg(files.join("meta-data"))
        .status()
        .expect("genisoimage (Debian package genisoimage, installed by ci/setup)");
    assert!(status.success());
    let (out, stdout) = boot_with_seed(&sb, arch, &seed);
    assert_eq!(
        lines_with(&stdout, CONFIGURATION),
        ["user-data from the NoCloud disk vda (cidata); environment dev (the image's default)"],
        "{out}"
    );
    assert_eq!(lines_with(&stdout, "app-env: "), ["dev"], "{out}");
    assert_eq!(lines_with(&stdout, "injected: "), ["by hand é😀"], "{out}");
    // `"args": []` clears the baked arguments.
    assert!(lines_with(&stdout, "arg: ").is_empty(), "{out}");
    assert_eq!(lines_with(&stdout, "hostname: "), ["shop-7"], "{out}");
    assert_no_leaked_qemu();
}

/// Neither a fw_cfg overlay, nor a seed disk (the attached disk is blank), nor a metadata
/// service (QEMU's restricted user network refuses the guest's connection to
/// 169.254.169.254): the image's defaults, after the init waited for the service no longer
/// than the issue's bound of 1 s. The wait is the init's own measure, printed on the console.
/// (A network that silently drops the packets costs the init's connect bound, 0.5 s; no
/// network here can be made to drop them without root-only tap devices.)
#[test]
fn without_a_cloud_config_the_baked_default_boots_after_a_bounded_wait() {
    let arch = "x86_64";
    let sb = Sandbox::new();
    build_config_app(&sb, arch);
    let blank = sb.dir.write("blank.img", vec![0u8; 1 << 20]);
    let (out, stdout) = boot_with_seed(&sb, arch, &blank);
    let line = lines_with(
        &stdout,
        &format!("{CONFIGURATION}none (no cidata/config-2 disk, no IMDS answer in "),
    );
    assert_eq!(line.len(), 1, "{out}");
    let (ms, rest) = line[0].split_once(" ms)").unwrap();
    assert_eq!(rest, "; environment dev (the image's default)", "{out}");
    let ms: u64 = ms.parse().unwrap();
    assert!(
        ms <= 1000,
        "the init waited {ms} ms for a metadata service: {out}"
    );
    assert_eq!(lines_with(&stdout, "app-env: "), ["dev"], "{out}");
    assert_eq!(lines_with(&stdout, "arg: "), ["baked-arg"], "{out}");
    assert_eq!(lines_with(&stdout, "hostname: "), ["cfgshow"], "{out}");
    assert_no_leaked_qemu();
}

/// Under a plain `fuse run` the configuration is fuse's overlay, always: the init looks for
/// no cloud (no console line about it, and so no connection to a metadata service, which on
/// a host that is itself a cloud instance would be the host's).
#[test]
fn a_plain_run_never_looks_for_a_cloud_configuration() {
    let sb = Sandbox::new();
    build_config_app(&sb, "x86_64");
    let out = sb.fuse().args(["run", "--accel", "tcg", "cfgshow"]).run();
    out.assert_success();
    assert!(
        !out.stdout_str().contains("run-time configuration"),
        "{out}"
    );
    assert_eq!(lines_with(&out.stdout_str(), "app-env: "), ["dev"], "{out}");
}
