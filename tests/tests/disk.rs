//! The bootable disk: UEFI boots through OVMF, direct boot out of the disk, reproducibility,
//! `fuse verify` locating corruption, the ESP checked by fsck.vfat, and a qcow2 export booting.

mod common;

use common::{flip_byte, java_jar, json, sha256_hex, Sandbox, EXIT_7, HELLO};
use fuse_tests::{assert_no_leaked_qemu, on_every_arch, FuseCmd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// OVMF under TCG is slow (firmware init alone is seconds): be generous.
const UEFI_TIMEOUT: Duration = Duration::from_secs(600);

/// Builds `app` and exports its raw disk; returns (image digest, disk file).
fn build_and_export(sb: &Sandbox, app: &Path) -> (String, PathBuf) {
    let built = sb.build_json(app);
    let image = built["image"].as_str().unwrap().to_string();
    let disk = sb.dir.join("disk.raw");
    sb.fuse()
        .args(["export", &image, "--format", "raw", "-o"])
        .arg(&disk)
        .run()
        .assert_success();
    (built["digest"].as_str().unwrap().to_string(), disk)
}

#[test]
fn uefi_boot_through_ovmf_prints_and_exits_with_the_apps_code() {
    let sb = Sandbox::new();
    let app = sb.program(EXIT_7, "seven", &["-static"]);
    let out = sb
        .fuse()
        .timeout(UEFI_TIMEOUT)
        .args(["run", "--accel", "tcg", "--firmware", "uefi"])
        .arg(&app)
        .run();
    out.assert_code(7);
    // Only the app's output: the firmware's screen clears and boot manager lines are hidden.
    assert_eq!(out.stdout_str().trim_end(), "about to exit 7", "{out}");
    assert_no_leaked_qemu();
}

on_every_arch! {
    uefi_boot_of_the_bundled_native_example => uefi_native_example;
    uefi_boot_of_the_bundled_java_example => uefi_java_example;
}

/// The bundled examples, as a cloud boots them: the disk through the arch's UEFI firmware.
fn uefi_native_example(arch: &str) {
    let sb = Sandbox::new();
    let src = include_str!("../../examples/hello/hello.c");
    let app = sb.program_for(arch, src, "hello-1.0", &["-static"]);
    let out = sb
        .fuse()
        .timeout(UEFI_TIMEOUT)
        .args(["run", "--accel=tcg", "--firmware=uefi", "--arch", arch])
        .arg(&app)
        .args(["--", "from-uefi"])
        .run();
    out.assert_success();
    let stdout = out.stdout_str();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "only the app's output:\n{out}");
    assert!(
        lines[0].starts_with("Hello from fuse! Linux 6.12") && lines[0].contains(arch),
        "{out}"
    );
    assert_eq!(lines[1], "arg 1: from-uefi", "{out}");
    assert_no_leaked_qemu();
}

fn uefi_java_example(arch: &str) {
    let sb = Sandbox::new();
    let jar = java_jar(
        sb.dir.path(),
        "hello-1.0.jar",
        "Hello",
        &[(
            "Hello.java",
            include_str!("../../examples/java-hello/Hello.java"),
        )],
        &[],
    );
    let out = sb
        .fuse()
        .timeout(UEFI_TIMEOUT)
        .args(["run", "--accel=tcg", "--firmware=uefi", "--arch", arch])
        .arg(&jar)
        .run();
    out.assert_success();
    let os_arch = if arch == "x86_64" { "amd64" } else { "aarch64" };
    out.assert_stdout_contains("Hello from fuse! Java 17")
        .assert_stdout_contains(&format!("({os_arch})"));
    assert_no_leaked_qemu();
}

#[test]
fn direct_boot_reads_kernel_and_init_out_of_the_disk() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let inspect = sb.build_json(&app);
    let image = inspect["image"].as_str().unwrap();
    let manifest = json(
        sb.fuse()
            .args(["inspect", "--json", image])
            .run()
            .assert_success(),
    );
    // The kernel, init, root and app blobs go: only the disk is left to boot from.
    for part in ["kernel", "init", "rootfs", "appfs"] {
        let d = manifest[part]["digest"].as_str().unwrap();
        let blob = sb
            .home()
            .join("images/blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        std::fs::remove_file(&blob).unwrap();
    }
    let out = sb.fuse().args(["run", image]).run();
    out.assert_success();
    assert_eq!(out.stdout_str().trim_end(), "hello from the guest", "{out}");
    // The disk's layout as inspect shows it: ESP, root, its verity hash tree, the app's
    // filesystem and its tree, 1 MiB aligned; the root and /app are the dm-verity devices
    // over the partitions the command line names.
    let disk = &manifest["disk"];
    let parts = disk["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 5);
    assert_eq!(parts[0]["type_name"], "EFI System");
    assert_eq!(parts[1]["type"], "4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
    assert_eq!(parts[2]["type"], "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
    assert_eq!(parts[3]["name"], "fuse-app");
    assert_eq!(parts[4]["name"], "fuse-app-verity");
    for p in parts {
        assert_eq!(p["offset"].as_u64().unwrap() % (1 << 20), 0, "{p}");
    }
    let cmdline = manifest["cmdline"].as_str().unwrap();
    for (data, hashes) in [(1, 2), (3, 4)] {
        assert!(
            cmdline.contains(&format!(
                "verity 1 PARTUUID={} PARTUUID={} ",
                parts[data]["guid"].as_str().unwrap(),
                parts[hashes]["guid"].as_str().unwrap()
            )),
            "{cmdline}"
        );
    }
    assert!(cmdline.contains("fuse.root=/dev/dm-0"), "{cmdline}");
    assert!(cmdline.contains("fuse.app=/dev/dm-1"), "{cmdline}");
    let root_hash = disk["verity"]["root_hash"].as_str().unwrap();
    assert!(
        cmdline.contains(&format!(" sha256 {root_hash} ")),
        "{cmdline}"
    );
    assert_eq!(disk["esp"]["files"][0]["path"], "/EFI/BOOT/BOOTX64.EFI");
    let sections: Vec<&str> = disk["uki"]["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        sections.ends_with(&[".osrel", ".cmdline", ".linux", ".initrd", ".fuse"]),
        "{sections:?}"
    );
    assert_no_leaked_qemu();
}

#[test]
fn same_inputs_give_the_same_disk_anywhere_anytime() {
    let a = Sandbox::new();
    let b = Sandbox::new();
    let app_a = a.program(HELLO, "hello-1.0", &["-static"]);
    // The same bytes, in another directory, with another mtime.
    let other_dir = b.dir.join("elsewhere");
    std::fs::create_dir_all(&other_dir).unwrap();
    let app_b = other_dir.join("hello-1.0");
    std::fs::copy(&app_a, &app_b).unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06"])
        .arg(&app_b)
        .status()
        .unwrap();
    assert!(touched.success());

    let build = |sb: &Sandbox, app: &Path, epoch: &str, tz: &str| {
        json(
            sb.fuse()
                .env("SOURCE_DATE_EPOCH", epoch)
                .env("TZ", tz)
                .args(["build", "--json"])
                .arg(app)
                .run()
                .assert_success(),
        )["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The same SOURCE_DATE_EPOCH (an input: file times derive from it), another time zone.
    let da = build(&a, &app_a, "1700000000", "UTC");
    std::thread::sleep(Duration::from_millis(1100));
    let db = build(&b, &app_b, "1700000000", "Pacific/Auckland");
    assert_eq!(da, db, "image digests differ");
    // The digest is the disk's: the stored blobs are byte for byte the same.
    let blob = |sb: &Sandbox, d: &str| {
        sb.home()
            .join("images/blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    assert_eq!(sha256_hex(&blob(&a, &da)), da.trim_start_matches("sha256:"));
    assert_eq!(sha256_hex(&blob(&a, &da)), sha256_hex(&blob(&b, &db)));
}

#[test]
fn verify_reports_each_corruption_with_its_location() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let (_, disk) = build_and_export(&sb, &app);
    sb.fuse()
        .args(["verify", "hello:1.0"])
        .run()
        .assert_success();
    sb.fuse()
        .arg("verify")
        .arg(&disk)
        .run()
        .assert_success()
        .assert_stdout_contains(": ok");
    let layout = json(
        sb.fuse()
            .args(["inspect", "--json"])
            .arg(&disk)
            .run()
            .assert_success(),
    )["disk"]
        .clone();
    let root = layout["partitions"][1]["offset"].as_u64().unwrap();
    let linux = layout["uki"]["sections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == ".linux")
        .unwrap()["disk_offset"]
        .as_u64()
        .unwrap();
    let cases = [
        (root + 100_000, "root partition", Some(100_000)),
        (linux + 5_000, "UKI section .linux", Some(5_000)),
        (512 + 60, "GPT primary header", Some(60)),
    ];
    for (at, part, part_offset) in cases {
        let bad = sb.dir.join("bad.raw");
        std::fs::copy(&disk, &bad).unwrap();
        flip_byte(&bad, at);
        let out = sb.fuse().arg("verify").arg(&bad).run();
        out.assert_code(1);
        let stderr = out.stderr_str();
        let line = stderr
            .lines()
            .find(|l| l.starts_with("fuse: corrupt: ") && l.contains(part))
            .unwrap_or_else(|| panic!("no problem reported in {part}:\n{out}"));
        match part_offset {
            Some(o) => assert!(
                line.contains(&format!("byte {o} (disk byte {at})")),
                "{line}"
            ),
            None => assert!(line.contains(&format!("disk byte {at}")), "{line}"),
        }
        assert!(stderr.contains("fuse: error:"), "{out}");
    }
}

#[test]
fn fsck_vfat_finds_the_esp_clean() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let (_, disk) = build_and_export(&sb, &app);
    let layout = json(
        sb.fuse()
            .args(["inspect", "--json"])
            .arg(&disk)
            .run()
            .assert_success(),
    )["disk"]
        .clone();
    let esp = &layout["partitions"][0];
    let (offset, size) = (
        esp["offset"].as_u64().unwrap(),
        esp["size"].as_u64().unwrap(),
    );
    let bytes = std::fs::read(&disk).unwrap();
    let esp_file = sb.dir.join("esp.img");
    std::fs::write(&esp_file, &bytes[offset as usize..(offset + size) as usize]).unwrap();
    let out = FuseCmd::program("fsck.vfat").arg("-n").arg(&esp_file).run();
    out.assert_success();
    assert!(!out.stdout_str().to_lowercase().contains("dirty"), "{out}");
}

#[test]
fn qcow2_export_boots_through_uefi() {
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let qcow2 = sb.dir.join("hello.qcow2");
    sb.fuse()
        .args(["build", "--format", "qcow2", "-o"])
        .arg(&qcow2)
        .arg(&app)
        .run()
        .assert_success();
    let info = FuseCmd::program("qemu-img")
        .args(["info", "--output=json"])
        .arg(&qcow2)
        .run();
    info.assert_success();
    assert!(
        info.stdout_str().contains("\"format\": \"qcow2\""),
        "{info}"
    );
    // Booted by QEMU itself, as a hypervisor that was handed the file would.
    let vars = sb.dir.join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &vars).unwrap();
    let out = FuseCmd::program("qemu-system-x86_64")
        .timeout(UEFI_TIMEOUT)
        .args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-drive",
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
            "-drive",
        ])
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-drive")
        .arg(format!(
            "if=none,id=d,format=qcow2,readonly=on,file={}",
            qcow2.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d,bootindex=0"])
        .run();
    out.assert_success();
    let stdout = out.stdout_str();
    assert!(stdout.contains("hello from the guest"), "{out}");
    assert!(stdout.contains("<<fuse:exit 0>>"), "{out}");
    assert_no_leaked_qemu();
}

#[test]
fn another_user_builds_the_same_disk() {
    // Root builds...
    let sb = Sandbox::new();
    let app = sb.program(HELLO, "hello-1.0", &["-static"]);
    let ours = sb.build_json(&app)["digest"].as_str().unwrap().to_string();

    // ...and `nobody` builds from its own copies: binary, app, home, store and cache. The
    // kernel cache entries are copied so it need not rebuild the kernel (6 minutes).
    let other = Sandbox::new();
    let root = other.dir.path();
    let kernels = root.join("cache/kernels");
    std::fs::create_dir_all(&kernels).unwrap();
    let shared_kernels = sb.kernels_dir(std::env::consts::ARCH);
    for entry in std::fs::read_dir(shared_kernels).unwrap() {
        let entry = entry.unwrap();
        if entry.path().join("kernel.json").is_file() {
            let copied = std::process::Command::new("cp")
                .arg("-a")
                .arg(entry.path())
                .arg(&kernels)
                .status()
                .unwrap();
            assert!(copied.success());
        }
    }
    let fuse = root.join("fuse");
    std::fs::copy(fuse_tests::fuse_bin(), &fuse).unwrap();
    let their_app = root.join("hello-1.0");
    std::fs::copy(&app, &their_app).unwrap();
    for dir in ["home", "store"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let chowned = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(root)
        .status()
        .unwrap();
    assert!(chowned.success());
    let out = FuseCmd::program("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&fuse)
        .args(["build", "--json"])
        .arg(&their_app)
        .env("HOME", root.join("home"))
        .env("FUSE_HOME", root.join("store"))
        .env("FUSE_CACHE_DIR", root.join("cache"))
        .env("USER", "nobody")
        .env("LOGNAME", "nobody")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("XDG_DATA_HOME")
        .timeout(Duration::from_secs(300))
        .run();
    out.assert_success();
    assert_eq!(json(&out)["digest"].as_str().unwrap(), ours, "{out}");
}
