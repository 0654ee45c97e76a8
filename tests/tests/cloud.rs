//! The cloud machine (`fuse run --machine cloud`): the image's disk booted as an EC2 Nitro
//! instance boots it, under QEMU. UEFI firmware (OVMF; AAVMF with ACPI tables on aarch64, as
//! Graviton), the root disk on NVMe (no virtio disk), an Intel e1000 NIC (no virtio-net). The
//! app, a small C server, reports the hardware it sees over the network (a published port on
//! the host's 127.0.0.1), and a graceful stop (QMP system_powerdown: the ACPI power button)
//! reaches it as SIGTERM.

mod common;

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
