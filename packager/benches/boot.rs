//! Boot benchmark: boots the bundled hello image N times (FUSE_BENCH_RUNS, default 5) and prints
//! the median time from QEMU spawn to the app's first output and to QEMU's exit; in the same run
//! it boots the same root filesystem on Debian's `linux-image-cloud-amd64` kernel (with the
//! virtio and squashfs modules it needs loaded by our init) and prints the ratio. The same again
//! for aarch64 (hello cross-compiled with aarch64-linux-gnu-gcc, `-M virt` under TCG, Debian's
//! `linux-image-cloud-arm64` as the baseline) when this fuse has an aarch64 init.
//!
//! `cargo bench -p fuse-packager --bench boot` (add `-- --no-baseline` to skip Debian's kernels,
//! `-- --arch aarch64` for one arch only). `-- --without-verity` compares, instead of Debian's
//! kernel, the same disk booted with its root partition mounted directly, without dm-verity:
//! the cost of verifying the root; `-- --app PATH` boots that app instead of the hello example.
//! `-- --cloud` compares, instead, the direct boot with the cloud machine's path (`fuse run
//! --machine cloud`: UEFI firmware, the unified kernel image from the disk's ESP, the root on
//! NVMe, an e1000 NIC; aarch64 with ACPI), booting the same disk.

use anyhow::{bail, Context, Result};
use fuse_boot::cmdline::Volume;
use fuse_boot::vm::{self, VmConfig, VmOutcome};
use fuse_boot::vm::{AccelChoice, Machine};
use fuse_packager::bench::{self, BenchImage};
use fuse_rootfs::Arch;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Modules Debian's cloud kernel needs to reach our root disk and network, in load order (the
/// same on amd64 and arm64; arm64's PCI host bridge and PL011 are built in).
const DEBIAN_MODULES: [&str; 12] = [
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
    // fuse's status and console ports, and its run overlay (fw_cfg): fuse's kernel has them
    // built in.
    "drivers/char/virtio_console.ko",
    "drivers/firmware/qemu_fw_cfg.ko",
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
    fn append(&mut self, other: Series) {
        self.first_output.extend(other.first_output);
        self.total.extend(other.total);
    }

    fn boot(label: &str, config: &VmConfig, runs: usize) -> Result<Series> {
        let mut series = Series {
            label: label.to_string(),
            first_output: Vec::new(),
            total: Vec::new(),
        };
        for i in 0..runs {
            let mut output = Vec::new();
            let outcome: VmOutcome = vm::run_with(config, &mut output, &mut |_| {})
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
    // `--arch A` benchmarks one arch only; by default every arch this fuse has an init for.
    let only: Option<Arch> = std::env::args()
        .skip_while(|a| a != "--arch")
        .nth(1)
        .map(|a| a.parse())
        .transpose()?;
    let work = tempfile::tempdir()?;
    let store = work.path().join("store");
    let mut all = Vec::new();
    for arch in Arch::ALL {
        if only.is_some_and(|o| o != arch) {
            continue;
        }
        if fuse_boot::init::init_binary(arch).is_none() {
            eprintln!(
                "bench-boot: skipping {arch}: this fuse has no init for it (no cross compiler)"
            );
            continue;
        }
        all.extend(bench_arch(arch, &store, work.path(), runs, with_baseline)?);
    }

    println!("\nboot to app output, {runs} runs each, median (QEMU spawn -> first app output / -> QEMU exit):");
    for s in &all {
        println!(
            "  {:<30} {:>7.3}s  {:>7.3}s",
            s.label,
            median(s.first_output.clone()).as_secs_f64(),
            median(s.total.clone()).as_secs_f64()
        );
    }
    for pair in all.chunks(2) {
        if let [ours, base] = pair {
            println!(
                "  {:<30} {:>7.2}x  {:>7.2}x",
                format!("ratio {}/{}", base.label, ours.label),
                median(base.first_output.clone()).as_secs_f64()
                    / median(ours.first_output.clone()).as_secs_f64(),
                median(base.total.clone()).as_secs_f64() / median(ours.total.clone()).as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Builds the hello example for `arch` and boots it `runs` times on the fuse kernel, then (with
/// `baseline`) on Debian's cloud kernel for that arch.
fn bench_arch(
    arch: Arch,
    store: &Path,
    work: &Path,
    runs: usize,
    baseline: bool,
) -> Result<Vec<Series>> {
    // `--app PATH`: that app (it must print "Hello from fuse"), e.g. the Java example's jar.
    let app: Option<PathBuf> = std::env::args()
        .skip_while(|a| a != "--app")
        .nth(1)
        .map(PathBuf::from);
    let hello = match app {
        Some(app) => app,
        None => compile_hello(arch, work)?,
    };
    let image: BenchImage = bench::build_image(store, &hello, arch)?;
    println!("{arch} hello image {}", image.summary);
    let mut config = VmConfig::new(arch, image.kernel, image.initrd, image.disk, image.cmdline);
    config.accel = AccelChoice::Auto;
    config.network = true;
    config.memory_mib = 256;
    config.timeout = Some(Duration::from_secs(120));
    // An empty run overlay, as `fuse run` always passes: the init takes its configuration from
    // it and looks for no cloud (without it the VM's network would be isolated, see
    // `vm::session`, and the init would probe for a metadata service).
    let overlay = work.join(format!("{arch}-overlay"));
    std::fs::write(
        &overlay,
        fuse_boot::spec::RunOverlay::default().try_encode()?,
    )?;
    config.fw_cfg = vec![(
        fuse_boot::spec::RUN_OVERLAY_FW_CFG_NAME.to_string(),
        overlay,
    )];

    if std::env::args().any(|a| a == "--without-verity") {
        let mut plain = config.clone();
        plain.cmdline = without_verity(arch, &config.cmdline)?;
        // Alternated, so a change in the machine's load weighs on both alike.
        let (a, b) = (
            format!("{arch} dm-verity root"),
            format!("{arch} plain root"),
        );
        let mut with = Series::boot(&a, &config, 1)?;
        let mut without = Series::boot(&b, &plain, 1)?;
        for _ in 1..runs {
            with.append(Series::boot(&a, &config, 1)?);
            without.append(Series::boot(&b, &plain, 1)?);
        }
        return Ok(vec![with, without]);
    }
    if std::env::args().any(|a| a == "--cloud") {
        let mut cloud = config.clone();
        cloud.machine = Machine::Cloud;
        let scratch = work.join(format!("{arch}-uefi"));
        std::fs::create_dir_all(&scratch)?;
        cloud.firmware = bench::uefi_firmware(arch, &scratch)?;
        let (a, b) = (
            format!("{arch} direct"),
            format!("{arch} cloud (UEFI, NVMe)"),
        );
        let mut direct = Series::boot(&a, &config, 1)?;
        let mut uefi = Series::boot(&b, &cloud, 1)?;
        for _ in 1..runs {
            direct.append(Series::boot(&a, &config, 1)?);
            uefi.append(Series::boot(&b, &cloud, 1)?);
        }
        return Ok(vec![direct, uefi]);
    }
    let mut series = vec![Series::boot(&format!("{arch} fuse kernel"), &config, runs)?];
    if baseline {
        let (kernel, initrd) = debian_baseline(arch, work)?;
        let mut base = config.clone();
        base.kernel = kernel;
        base.initrd = initrd;
        // Debian's kernel has dm-verity as a module and no dm-mod.create= (CONFIG_DM_INIT):
        // it mounts the same partitions directly.
        base.cmdline = without_verity(arch, &config.cmdline)?;
        base.verbose = std::env::var_os("FUSE_BENCH_VERBOSE").is_some();
        series.push(Series::boot(
            &format!("{arch} debian cloud kernel"),
            &base,
            runs,
        )?);
    }
    Ok(series)
}

/// The image's command line with its filesystems' partitions mounted directly, not through
/// dm-verity.
fn without_verity(arch: Arch, cmdline: &str) -> Result<String> {
    let verity = fuse_boot::cmdline::parse_verity(cmdline)
        .context("the image's command line has no dm-verity table")?
        .map_err(anyhow::Error::msg)?;
    let app = fuse_boot::cmdline::parse_volume(cmdline, Volume::App)
        .context("the image's command line has no dm-verity table for /app")?
        .map_err(anyhow::Error::msg)?;
    Ok(format!(
        "{} fuse.app=PARTUUID={}",
        fuse_boot::cmdline::image_cmdline(arch, &format!("PARTUUID={}", verity.data_partuuid)),
        app.data_partuuid
    ))
}

/// The hello example, compiled statically for `arch` into `work`.
fn compile_hello(arch: Arch, work: &Path) -> Result<PathBuf> {
    let hello = work.join(format!("{arch}/hello-1.0"));
    std::fs::create_dir_all(hello.parent().unwrap())?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello/hello.c");
    let gcc = if arch == Arch::host() {
        "gcc".to_string()
    } else {
        format!("{}-gcc", arch.gnu_triple())
    };
    let status = Command::new(&gcc)
        .args(["-O2", "-static", "-o"])
        .arg(&hello)
        .arg(&src)
        .status()
        .with_context(|| format!("Cannot run {gcc}"))?;
    if !status.success() {
        bail!("Cannot compile {} with {gcc}", src.display());
    }
    Ok(hello)
}

/// Debian's cloud kernel for `arch` and an initramfs of our init plus the modules it needs,
/// unpacked from the Debian package into the cache (`apt-get download`, no install; the arm64
/// package through fuse's private arm64 apt state, see fuse's `host::sysroot`).
fn debian_baseline(arch: Arch, work: &Path) -> Result<(PathBuf, PathBuf)> {
    let darch = fuse_packager::bench::debian_arch(arch);
    let cache = fuse_packager::bench::cache_dir().join(format!("bench/debian-cloud-{darch}"));
    if !cache.join("done").exists() {
        std::fs::create_dir_all(&cache)?;
        let dl = work.join(format!("deb-{darch}"));
        std::fs::create_dir_all(&dl)?;
        let meta = format!("linux-image-cloud-{darch}");
        let deb = if arch == Arch::host() {
            let depends = Command::new("apt-cache")
                .args(["depends", &meta])
                .output()?;
            let package = String::from_utf8_lossy(&depends.stdout)
                .lines()
                .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_string))
                .with_context(|| format!("apt-cache depends {meta} named no kernel package"))?;
            let status = Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&dl)
                .status()?;
            if !status.success() {
                bail!("apt-get download {package} failed");
            }
            std::fs::read_dir(&dl)?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .context("no .deb downloaded")?
        } else {
            use fuse_packager::bench::{deb_field, download_debs};
            let meta_deb = download_debs(arch, &[&meta], &dl)?.remove(0);
            // `linux-image-6.1.0-NN-cloud-arm64 (= VERSION)`: the real kernel package.
            let depends = deb_field(&meta_deb, "Depends")?;
            let package = depends
                .split([' ', ','])
                .next()
                .filter(|p| !p.is_empty())
                .with_context(|| format!("{meta} depends on no kernel package"))?
                .to_string();
            download_debs(arch, &[&package], &dl)?.remove(0)
        };
        let status = Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(cache.join("root"))
            .status()?;
        if !status.success() {
            bail!("dpkg -x {} failed", deb.display());
        }
        std::fs::write(cache.join("done"), deb.display().to_string())?;
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
    let mut tree = fuse_boot::initramfs::initramfs_tree(arch)?;
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
    let initrd = work.join(format!("debian-initrd-{darch}.cpio"));
    let mut out = std::fs::File::create(&initrd)?;
    fuse_rootfs::cpio::write_newc(&tree, &mut out)?;
    Ok((vmlinuz, initrd))
}
