//! Integrity at boot: one flipped byte in the app's executable, on the stored disk, must stop
//! the VM before the app runs (dm-verity's `panic_on_corruption`), with fuse saying why and
//! exiting with its integrity code; `fuse verify` names the block the kernel refused.
//!
//! The byte is flipped in place and the blob's mtime put back: bit rot, which keeps a file's
//! size and mtime, so a store check trusting those (after one clean run here) still lets the
//! disk reach the kernel, and dm-verity is what is tested.

mod common;

use common::{flip_byte, Sandbox};
use fuse_tests::{assert_no_leaked_qemu, on_every_arch};
use std::path::{Path, PathBuf};

on_every_arch! {
    a_flipped_byte_in_the_executable_stops_the_vm_before_the_app_runs => flipped_byte;
}

/// fuse's exit code for a root that failed verification.
const EXIT_INTEGRITY: i32 = fuse_boot::spec::EXIT_INTEGRITY as i32;

/// 384 KiB of pseudo-random bytes: incompressible, so squashfs stores its 128 KiB blocks as
/// they are, and the test finds them on the disk.
fn noise() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..384 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The app: the noise in its .rodata (read whole before it prints, so every page of the
/// executable that holds it is read from the root), then a line.
fn program(sb: &Sandbox, arch: &str) -> PathBuf {
    let bin = sb.dir.join("noise.bin");
    std::fs::write(&bin, noise()).unwrap();
    let src = format!(
        r#"
#include <stdio.h>
extern const unsigned char noise[], noise_end[];
__asm__(".section .rodata\n.global noise\n.global noise_end\n"
        "noise: .incbin \"{}\"\nnoise_end:\n.previous\n");
int main(void) {{
    unsigned sum = 0;
    for (const unsigned char *p = noise; p < noise_end; p++) sum = sum * 31 + *p;
    printf("the app ran (%08x)\n", sum);
    return 0;
}}
"#,
        bin.display()
    );
    sb.program_for(arch, &src, "noisy-1.0", &["-static"])
}

/// Writes the store's "checked, as the file is now" record for `blob` (the format of
/// `image::store::file_stamp`).
fn record_as_checked(sb: &Sandbox, blob: &Path) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(blob).unwrap();
    let stamp = format!(
        "size {} mtime {}.{:09} ctime {}.{:09} inode {} dev {}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
        m.dev()
    );
    let name = blob.file_name().unwrap();
    std::fs::write(sb.home().join("images/verified").join(name), stamp).unwrap();
}

fn blob(sb: &Sandbox, digest: &str) -> PathBuf {
    sb.home()
        .join("images/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn flipped_byte(arch: &str) {
    let sb = Sandbox::new();
    let app = program(&sb, arch);
    sb.fuse()
        .args(["build", "--arch", arch])
        .arg(&app)
        .run()
        .assert_success();
    // Clean: the app runs (and a store that checks blobs once has now checked this one).
    let clean = sb.fuse().args(["run", "--accel", "tcg", "noisy:1.0"]).run();
    clean.assert_success().assert_stdout_contains("the app ran");

    let inspect = common::json(
        sb.fuse()
            .args(["inspect", "--json", "noisy:1.0"])
            .run()
            .assert_success(),
    );
    let disk = blob(&sb, inspect["digest"].as_str().unwrap());
    // The executable is in the app's filesystem, partition 4 (/dev/dm-1).
    let root = &inspect["disk"]["partitions"][3];
    let (root_at, root_len) = (
        root["offset"].as_u64().unwrap(),
        root["size"].as_u64().unwrap(),
    );
    // The executable's bytes: the noise, found as it is inside the root partition.
    let bytes = std::fs::read(&disk).unwrap();
    let needle = &noise()[200 * 1024..200 * 1024 + 64];
    let found = bytes[root_at as usize..(root_at + root_len) as usize]
        .windows(needle.len())
        .position(|w| w == needle)
        .expect(
            "the executable's incompressible bytes are stored as they are in the app's partition",
        );
    let at = root_at + found as u64 + 10;
    let block = (at - root_at) / 4096;
    drop(bytes);
    flip_byte(&disk, at);
    // Bit rot below the filesystem changes no metadata, but our write changed the ctime, so
    // the store would now hash the disk and refuse it (tests/store.rs covers that). Re-record
    // it as checked, so this test sees what the kernel does when a bad byte gets past the store.
    record_as_checked(&sb, &disk);

    let out = sb.fuse().args(["run", "--accel", "tcg", "noisy:1.0"]).run();
    out.assert_code(EXIT_INTEGRITY);
    assert!(
        !out.stdout_str().contains("the app ran"),
        "the app ran on a corrupt root:\n{out}"
    );
    let stderr = out.stderr_str();
    assert!(
        // Without kernel messages fuse cannot tell which of the two filesystems it was.
        stderr.contains("root or app filesystem is corrupt") && stderr.contains("fuse verify"),
        "{out}"
    );
    // With kernel messages, the kernel's own line names the device and the block, and so
    // does fuse.
    let verbose = sb
        .fuse()
        .args(["run", "--accel", "tcg", "--verbose", "noisy:1.0"])
        .run();
    verbose.assert_code(EXIT_INTEGRITY);
    assert!(
        verbose.stderr_str().contains(&format!(
            "app filesystem (/app) is corrupt: block {block} failed dm-verity verification"
        )),
        "block {block}:\n{verbose}"
    );

    // `fuse verify` on a copy of that disk names the check and the block.
    let copy = sb.dir.join("copy.raw");
    std::fs::copy(&disk, &copy).unwrap();
    let verify = sb.fuse().arg("verify").arg(&copy).run();
    verify.assert_code(1);
    let line = format!("dm-verity: data block {block} fails verification");
    assert!(verify.stderr_str().contains(&line), "{line}:\n{verify}");
    assert_no_leaked_qemu();
}
