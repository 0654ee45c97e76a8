//! Boot benchmark: boots the bundled hello image N times (FUSE_BENCH_RUNS, default 5) and prints
//! the median time from QEMU spawn to the app's first output and to QEMU's exit; in the same run
//! it boots the same root filesystem on Debian's `linux-image-cloud-amd64` kernel (with the
//! virtio and squashfs modules it needs loaded by our init) and prints the ratio.
//!
//! `cargo bench -p fuse-packager --bench boot` (add `-- --no-baseline` to skip Debian's kernel).

use anyhow::{bail, Context, Result};
use fuse_boot::accel::AccelChoice;
use fuse_boot::qemu::{self, VmConfig, VmOutcome};
use fuse_packager::builder::{self, BuildRequest};
use fuse_packager::fsutil::human_size;
use fuse_packager::store::Store;
use fuse_rootfs::Arch;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Modules Debian's cloud kernel needs to reach our root disk and network, in load order.
const DEBIAN_MODULES: [&str; 10] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "fs/squashfs/squashfs.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
];

fn main() {
    if let Err(err) = run() {
        eprintln!("bench-boot: error: {err:#}");
        std::process::exit(1);
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

struct Series {
    label: String,
    first_output: Vec<Duration>,
    total: Vec<Duration>,
}

impl Series {
    fn boot(label: &str, config: &VmConfig, runs: usize) -> Result<Series> {
        let mut series = Series {
            label: label.to_string(),
            first_output: Vec::new(),
            total: Vec::new(),
        };
        for i in 0..runs {
            let mut output = Vec::new();
            let outcome: VmOutcome = qemu::run_with(config, &mut output, &mut |_| {})
                .with_context(|| format!("{label}: boot {} failed", i + 1))?;
            if outcome.exit_code != 0
                || !String::from_utf8_lossy(&output).contains("Hello from fuse")
            {
                bail!(
                    "{label}: boot {} printed {:?} and exited {}",
                    i + 1,
                    String::from_utf8_lossy(&output),
                    outcome.exit_code
                );
            }
            series
                .first_output
                .push(outcome.first_output.context("no output")?);
            series.total.push(outcome.total);
            eprintln!(
                "  {label} run {}: first output {:.3}s, exit {:.3}s",
                i + 1,
                outcome.first_output.unwrap_or_default().as_secs_f64(),
                outcome.total.as_secs_f64()
            );
        }
        Ok(series)
    }
}

fn run() -> Result<()> {
    let runs: usize = std::env::var("FUSE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let with_baseline = !std::env::args().any(|a| a == "--no-baseline");
    let work = tempfile::tempdir()?;
    let hello = work.path().join("hello-1.0");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/hello.c");
    let status = Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(&hello)
        .arg(&src)
        .status()
        .context("gcc")?;
    if !status.success() {
        bail!("Cannot compile {}", src.display());
    }
    let store = Store::open(work.path().join("store"))?;
    let image = builder::build(
        &store,
        &BuildRequest {
            input: hello,
            name: None,
            arch: Some(Arch::X86_64),
            kernel_source: None,
        },
        &mut |l| eprintln!("fuse: {l}"),
    )?;
    let m = &image.manifest;
    println!(
        "hello image {}: {} (kernel {}, init {}, rootfs {})",
        image.name,
        human_size(m.total_size()),
        human_size(m.kernel.size),
        human_size(m.init.size),
        human_size(m.rootfs.size)
    );
    let mut config = VmConfig::new(
        Arch::X86_64,
        store.blob_path(&m.kernel.digest),
        store.blob_path(&m.init.digest),
        store.blob_path(&m.rootfs.digest),
        m.cmdline.clone(),
    );
    config.accel = AccelChoice::Auto;
    config.network = true;
    config.memory_mib = 256;
    config.timeout = Some(Duration::from_secs(120));

    let ours = Series::boot("fuse kernel", &config, runs)?;
    let mut all = vec![ours];
    if with_baseline {
        let (kernel, initrd) = debian_baseline(work.path())?;
        let mut base = config.clone();
        base.kernel = kernel;
        base.initrd = initrd;
        base.verbose = std::env::var_os("FUSE_BENCH_VERBOSE").is_some();
        all.push(Series::boot("debian cloud kernel", &base, runs)?);
    }

    println!("\nboot to app output, {runs} runs each, median (QEMU spawn -> first app output / -> QEMU exit):");
    for s in &all {
        println!(
            "  {:<22} {:>7.3}s  {:>7.3}s",
            s.label,
            median(s.first_output.clone()).as_secs_f64(),
            median(s.total.clone()).as_secs_f64()
        );
    }
    if let [ours, base] = &all[..] {
        println!(
            "  ratio debian/fuse     {:>7.2}x  {:>7.2}x",
            median(base.first_output.clone()).as_secs_f64()
                / median(ours.first_output.clone()).as_secs_f64(),
            median(base.total.clone()).as_secs_f64() / median(ours.total.clone()).as_secs_f64()
        );
    }
    Ok(())
}

/// Debian's cloud kernel and an initramfs of our init plus the modules it needs, unpacked from
/// the Debian package into the cache (`apt-get download`, no install).
fn debian_baseline(work: &Path) -> Result<(PathBuf, PathBuf)> {
    let cache = fuse_packager::paths::cache_dir().join("bench/debian-cloud-amd64");
    if !cache.join("done").exists() {
        std::fs::create_dir_all(&cache)?;
        let dl = work.join("deb");
        std::fs::create_dir_all(&dl)?;
        let depends = Command::new("apt-cache")
            .args(["depends", "linux-image-cloud-amd64"])
            .output()?;
        let package = String::from_utf8_lossy(&depends.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string))
            .context("apt-cache depends linux-image-cloud-amd64 named no kernel package")?;
        let status = Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&dl)
            .status()?;
        if !status.success() {
            bail!("apt-get download {package} failed");
        }
        let deb = std::fs::read_dir(&dl)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("no .deb downloaded")?;
        let status = Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(cache.join("root"))
            .status()?;
        if !status.success() {
            bail!("dpkg -x {} failed", deb.display());
        }
        std::fs::write(cache.join("done"), package)?;
    }
    let root = cache.join("root");
    let vmlinuz = std::fs::read_dir(root.join("boot"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .context("no vmlinuz in the Debian package")?;
    let modules_root = std::fs::read_dir(root.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("kernel"))
        .next()
        .context("no modules in the Debian package")?;
    let mut tree = fuse_boot::initramfs::initramfs_tree(Arch::X86_64)?;
    let mut list = String::new();
    for (i, module) in DEBIAN_MODULES.iter().enumerate() {
        let image_path = format!("/lib/modules/{i:02}-{}", module.rsplit('/').next().unwrap());
        tree.add_host_file(&image_path, modules_root.join(module), 0o644)?;
        list.push_str(&image_path);
        list.push('\n');
    }
    tree.add_bytes(
        fuse_boot::initramfs::MODULE_LIST_PATH,
        list.into_bytes(),
        0o644,
    )?;
    let initrd = work.join("debian-initrd.cpio");
    let mut out = std::fs::File::create(&initrd)?;
    fuse_rootfs::cpio::write_newc(&tree, &mut out)?;
    Ok((vmlinuz, initrd))
}
