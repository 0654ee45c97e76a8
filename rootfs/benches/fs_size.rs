//! Size and time of the same tree as squashfs (this crate's writer, zstd and xz) and as erofs
//! (`mkfs.erofs -zlz4hc`), to choose the root filesystem format on numbers.
//!
//! Run: `cargo bench -p fuse-rootfs --bench fs_size [-- DIR]`. DIR defaults to the first JDK
//! under /usr/lib/jvm, else /usr/lib/x86_64-linux-gnu. Needs mkfs.erofs (erofs-utils) and
//! mksquashfs (squashfs-tools) for the reference rows; missing tools are skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fuse_rootfs::squashfs::{write_squashfs, Compression, SquashfsOptions};
use fuse_rootfs::tree::Tree;

fn sample_dir() -> PathBuf {
    if let Some(arg) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        return PathBuf::from(arg);
    }
    let mut jdks: Vec<PathBuf> = std::fs::read_dir("/usr/lib/jvm")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.is_symlink() && p.join("bin/java").exists())
        .collect();
    jdks.sort();
    jdks.into_iter()
        .next()
        .unwrap_or_else(|| PathBuf::from("/usr/lib/x86_64-linux-gnu"))
}

fn mib(n: u64) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

fn row(name: &str, size: u64, secs: f64, input: u64) {
    println!(
        "{name:<28} {:>9.1} MiB  {:>5.1}%  {secs:>6.1} s",
        mib(size),
        100.0 * size as f64 / input as f64
    );
}

fn external(name: &str, out: &Path, cmd: &mut Command, input: u64) {
    let t = Instant::now();
    match cmd.output() {
        Ok(o) if o.status.success() => {
            let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
            row(name, size, t.elapsed().as_secs_f64(), input);
        }
        Ok(o) => println!(
            "{name:<28} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!("{name:<28} skipped: {e}"),
    }
}

fn main() {
    let src = sample_dir();
    let mut tree = Tree::new();
    if let Err(e) = tree.add_host_dir_recursive("/sample", &src) {
        eprintln!("cannot read {}: {e}", src.display());
        std::process::exit(1);
    }
    let input = tree.total_file_bytes();
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "sample: {} ({} files, {:.1} MiB)",
        src.display(),
        tree.file_count(),
        mib(input)
    );
    for (name, compression, level) in [
        ("fuse squashfs zstd-15", Compression::Zstd, None),
        ("fuse squashfs zstd-19", Compression::Zstd, Some(19)),
        ("fuse squashfs xz-6", Compression::Xz, None),
    ] {
        let out = tmp.path().join("img");
        let opts = SquashfsOptions {
            compression,
            level,
            ..Default::default()
        };
        let t = Instant::now();
        write_squashfs(&tree, &out, &opts).unwrap();
        let size = std::fs::metadata(&out).unwrap().len();
        row(name, size, t.elapsed().as_secs_f64(), input);
    }
    let out = tmp.path().join("erofs");
    external(
        "mkfs.erofs -zlz4hc",
        &out,
        Command::new("mkfs.erofs")
            .arg("-zlz4hc")
            .arg("-T0")
            .arg(&out)
            .arg(&src),
        input,
    );
    for comp in ["zstd", "xz"] {
        let out = tmp.path().join(format!("sq-{comp}"));
        external(
            &format!("mksquashfs -comp {comp}"),
            &out,
            Command::new("mksquashfs").arg(&src).arg(&out).args([
                "-comp",
                comp,
                "-noappend",
                "-quiet",
                "-no-progress",
                "-processors",
                "1",
            ]),
            input,
        );
    }
}
