//! Building the minimal guest kernel from `kernel-config/` fragments, cached content-addressed.
//!
//! The cache key covers everything that changes the output: the kernel source's digest, the
//! fragments, the arch and the compiler's version. A hit is a directory lookup, so `fuse run`
//! pays for a kernel build once per host. Builds are reproducible: build timestamp, user, host
//! and version are fixed, and the build directory is a fixed path under the cache.

use crate::host::digest;
use crate::host::lock::FileLock;
use anyhow::{bail, Context, Result};
use fuse_rootfs::Arch;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options shared by every fuse kernel.
pub(crate) const BASE_FRAGMENT: &str = include_str!("../../../kernel-config/fragments/base.config");
/// x86_64 additions.
pub(crate) const X86_64_FRAGMENT: &str =
    include_str!("../../../kernel-config/fragments/x86_64.config");
/// aarch64 (arm64) additions.
pub(crate) const AARCH64_FRAGMENT: &str =
    include_str!("../../../kernel-config/fragments/aarch64.config");

/// Debian's kernel source package, the default source.
pub(crate) const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.12.tar.xz";

/// Bump when the build recipe changes in a way that changes the output.
const RECIPE_VERSION: &str = "fuse-kernel-recipe-1";

/// A built kernel in the cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Kernel {
    /// The bootable kernel file (bzImage on x86_64, Image on arm64).
    pub(crate) path: PathBuf,
    /// Empty in a record that has none: filled in on first use (see [`check_cached`]).
    #[serde(default)]
    pub(crate) digest: String,
    pub(crate) size: u64,
    /// `uname -r` of the guest.
    pub(crate) release: String,
    #[serde(with = "crate::host::serde_text::one")]
    pub(crate) arch: Arch,
    /// The cache key it was found or built under.
    pub(crate) key: String,
}

/// What to build.
#[derive(Debug, Clone)]
pub(crate) struct KernelRequest {
    pub(crate) arch: Arch,
    /// A tarball or an unpacked source tree; `None` means Debian's linux-source-6.12.
    pub(crate) source: Option<PathBuf>,
}

/// The fragments for an arch, base first, as one merged Kconfig fragment.
pub(crate) fn fragments(arch: Arch) -> Result<String> {
    let arch_fragment = match arch {
        Arch::X86_64 => X86_64_FRAGMENT,
        Arch::Aarch64 => AARCH64_FRAGMENT,
    };
    Ok(format!("{BASE_FRAGMENT}\n{arch_fragment}"))
}

/// The options a fragment sets: `CONFIG_X` -> value (`n` for `# CONFIG_X is not set`).
pub(crate) fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                if name.starts_with("CONFIG_") {
                    options.insert(name.to_string(), "n".to_string());
                }
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((name, value)) = line.split_once('=') {
            options.insert(name.trim().to_string(), value.trim().to_string());
        }
    }
    options
}

/// Options of the fragment that the final `.config` did not take (unmet dependencies or typos),
/// as `CONFIG_X: wanted V, got W` lines.
pub(crate) fn unapplied_options(fragment: &str, final_config: &str) -> Vec<String> {
    let have = parse_config(final_config);
    parse_config(fragment)
        .into_iter()
        .filter_map(|(name, wanted)| {
            let got = have.get(&name).map(String::as_str).unwrap_or("n");
            (got != wanted).then(|| format!("{name}: wanted {wanted}, got {got}"))
        })
        .collect()
}

fn kernels_dir() -> PathBuf {
    crate::host::paths::cache_dir().join("kernels")
}

fn source_path(request: &KernelRequest) -> PathBuf {
    request
        .source
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOURCE))
}

fn cross_compile_prefix(arch: Arch) -> Option<String> {
    (arch != Arch::host()).then(|| format!("{}-", arch.gnu_triple()))
}

/// Extra compiler flags for the kernel of `arch` (make's `KCFLAGS`), part of the cache key.
///
/// x86_64: `-Os` makes gcc inline constant-size memsets as `rep stosb`, one store per byte.
/// The memset that poisons the freed init code (`free_reserved_area`, 800 KiB at every boot)
/// then writes, byte by byte, into pages QEMU's TCG has translated code from, and each such
/// store takes TCG's self-modifying-code slow path: 0.3–0.6 s of every boot under emulation.
/// `rep stosq` (and `rep movsq` for copies) does the same in an eighth of the stores; on
/// hardware (KVM) both take the CPU's fast-string path, so nothing is lost there.
fn kernel_cflags(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "-mstringop-strategy=rep_8byte",
        Arch::Aarch64 => "",
    }
}

fn compiler_version(arch: Arch) -> Result<String> {
    let gcc = format!("{}gcc", cross_compile_prefix(arch).unwrap_or_default());
    let output = Command::new(&gcc).arg("--version").output().with_context(|| {
        format!("Cannot run {gcc} to build the kernel: apt-get install build-essential (or gcc-{}-linux-gnu for cross builds)", arch.as_str())
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// The digest of the kernel source: a tarball's bytes (memoised by path, size and mtime so a
/// warm lookup does not rehash 140 MB), or a tree's file list with sizes and mtimes.
fn source_digest(source: &Path) -> Result<String> {
    let meta = std::fs::metadata(source).with_context(|| {
        if source == Path::new(DEFAULT_SOURCE) {
            format!("Kernel source {} not found: apt-get install linux-source-6.12, or pass --linux-src PATH", source.display())
        } else {
            format!("Kernel source {} not found: pass a Linux source tarball or tree with --linux-src", source.display())
        }
    })?;
    if meta.is_dir() {
        if !source.join("Makefile").is_file() || !source.join("Kconfig").is_file() {
            bail!(
                "{} is not a Linux source tree (no Makefile and Kconfig at its top)",
                source.display()
            );
        }
        return tree_digest(source);
    }
    use std::os::unix::fs::MetadataExt;
    let memo_key = format!(
        "{}|{}|{}.{}",
        source.display(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    );
    let memo_path = kernels_dir().join("source-digests.json");
    let mut memo: BTreeMap<String, String> = std::fs::read(&memo_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(d) = memo.get(&memo_key) {
        return Ok(d.clone());
    }
    let d = digest::of_file(source)
        .with_context(|| format!("Cannot read kernel source {}", source.display()))?;
    memo.insert(memo_key, d.clone());
    std::fs::create_dir_all(kernels_dir())?;
    crate::host::fs::write_atomic(&memo_path, &serde_json::to_vec_pretty(&memo)?)?;
    Ok(d)
}

fn tree_digest(root: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut lines = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("Cannot read {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            if name == ".git" {
                continue;
            }
            let path = entry.path();
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                lines.push(format!(
                    "{}\t{}\t{}",
                    rel.display(),
                    meta.len(),
                    meta.mtime()
                ));
            }
        }
    }
    lines.sort();
    Ok(digest::of_bytes(lines.join("\n").as_bytes()))
}

/// The cache key of a request: source digest + the options the fragments set + arch +
/// compiler version. Options, not the fragments' text: a comment edited costs no rebuild.
pub(crate) fn cache_key(request: &KernelRequest) -> Result<String> {
    let source = source_path(request);
    let options = key_options(&fragments(request.arch)?);
    let text = format!(
        "{RECIPE_VERSION}\nsource {}\narch {}\ncompiler {}\nkcflags {}\n--- options\n{options}",
        source_digest(&source)?,
        request.arch,
        compiler_version(request.arch)?,
        kernel_cflags(request.arch),
    );
    Ok(digest::hex_part(&digest::of_bytes(text.as_bytes()))[..32].to_string())
}

/// What of a fragment goes into the cache key: its options, sorted, one per line.
fn key_options(fragment: &str) -> String {
    parse_config(fragment)
        .iter()
        .map(|(name, value)| format!("{name}={value}\n"))
        .collect()
}

fn image_file_name(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "bzImage",
        // The uncompressed Image: the one arm64 form both QEMU's -kernel and UEFI (it is a PE
        // with CONFIG_EFI, for the disk's unified kernel image) boot. Image.gz is 2.3 MB
        // instead of 5.3 MB, but firmware cannot start it, and QEMU 7.2 cannot boot EFI zboot.
        Arch::Aarch64 => "Image",
    }
}

fn load_cached(dir: &Path) -> Option<Kernel> {
    let info = std::fs::read(dir.join("kernel.json")).ok()?;
    let mut kernel: Kernel = serde_json::from_slice(&info).ok()?;
    // The file is found next to its record, so a cache directory can be moved or copied
    // (another user's cache, a CI cache restored elsewhere) and still hit.
    kernel.path = dir.join(image_file_name(kernel.arch));
    kernel.path.is_file().then_some(kernel)
}

/// Returns the cached kernel, building it first if needed. `progress` receives human-readable
/// progress lines (the CLI prints them on stderr). A cache entry whose kernel file does not
/// match its recorded digest is rebuilt, with a notice.
pub(crate) fn ensure(request: &KernelRequest, progress: &mut dyn FnMut(&str)) -> Result<Kernel> {
    let key = cache_key(request)?;
    let final_dir = kernels_dir().join(&key);
    if let Some(mut kernel) = load_cached(&final_dir) {
        if check_cached(&final_dir, &mut kernel)?.is_none() {
            return Ok(kernel);
        }
    }
    std::fs::create_dir_all(kernels_dir())
        .with_context(|| format!("Cannot create {}", kernels_dir().display()))?;
    // Concurrent fuse processes (parallel tests, two terminals) wait for one build.
    let _lock = FileLock::exclusive(&kernels_dir().join(format!("{key}.lock")))?;
    if let Some(mut kernel) = load_cached(&final_dir) {
        match check_cached(&final_dir, &mut kernel)? {
            None => return Ok(kernel),
            Some(why) => progress(&format!(
                "the cached kernel {} is damaged ({why}): rebuilding it",
                kernel.path.display()
            )),
        }
    }
    // A damaged or half-made entry is in the way of the finished build's rename.
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("Cannot remove {}", final_dir.display()))?;
    }
    build(request, &key, &final_dir, progress)
}

/// The record of the last check of a cache entry, in the entry.
const CHECKED_FILE: &str = "checked";

/// What is wrong with the cached `kernel` in `dir`, if anything: its file must have the
/// recorded size and digest. Hashed when the file changed since the last check (size, mtime,
/// ctime, inode, recorded in [`CHECKED_FILE`]), so a warm lookup reads no kernel. A record
/// without a digest (an older fuse's) gets the file's on first use.
fn check_cached(dir: &Path, kernel: &mut Kernel) -> Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&kernel.path)
        .with_context(|| format!("Cannot read {}", kernel.path.display()))?;
    let stamp = format!(
        "size {} mtime {}.{:09} ctime {}.{:09} inode {}\n",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino()
    );
    let record = dir.join(CHECKED_FILE);
    if !kernel.digest.is_empty() && std::fs::read_to_string(&record).is_ok_and(|r| r == stamp) {
        return Ok(None);
    }
    if meta.len() != kernel.size {
        return Ok(Some(format!(
            "{} bytes, recorded {}",
            meta.len(),
            kernel.size
        )));
    }
    let actual = digest::of_file(&kernel.path)
        .with_context(|| format!("Cannot read {}", kernel.path.display()))?;
    if kernel.digest.is_empty() {
        kernel.digest = actual;
        crate::host::fs::write_atomic(
            &dir.join("kernel.json"),
            &serde_json::to_vec_pretty(kernel)?,
        )?;
    } else if actual != kernel.digest {
        return Ok(Some(format!(
            "sha256 {}, recorded {}",
            digest::short(&actual),
            digest::short(&kernel.digest)
        )));
    }
    // Best effort: without the record, the next use hashes again.
    let _ = crate::host::fs::write_atomic(&record, stamp.as_bytes());
    Ok(None)
}

fn check_build_tools() -> Result<()> {
    for tool in ["make", "flex", "bison", "bc", "tar"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            bail!("{tool} not found, needed to build the kernel: apt-get install build-essential flex bison bc libelf-dev libssl-dev (or run ci/setup)");
        }
    }
    Ok(())
}

fn build(
    request: &KernelRequest,
    key: &str,
    final_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Kernel> {
    check_build_tools()?;
    let arch = request.arch;
    let source = source_path(request);
    // A fixed build path (no pid, no temp name) keeps paths that leak into the kernel stable.
    let work = kernels_dir().join(format!("build-{key}"));
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("Cannot clean {}", work.display()))?;
    }
    let out = work.join("out");
    std::fs::create_dir_all(&out)?;
    let started = Instant::now();
    progress(&format!(
        "Building the {arch} kernel from {} (first use; cached afterwards in {})",
        source.display(),
        final_dir.display()
    ));

    let src_dir = if source.is_dir() {
        source.clone()
    } else {
        let src_dir = work.join("src");
        std::fs::create_dir_all(&src_dir)?;
        progress("  unpacking kernel source");
        let status = Command::new("tar")
            .arg("-xf")
            .arg(&source)
            .arg("-C")
            .arg(&src_dir)
            .arg("--strip-components=1")
            .status()
            .context("Cannot run tar")?;
        if !status.success() {
            bail!(
                "Cannot unpack kernel source {}: tar failed ({status})",
                source.display()
            );
        }
        src_dir
    };

    let fragment = fragments(arch)?;
    let fragment_path = work.join("fuse.config");
    std::fs::write(&fragment_path, &fragment)?;

    let make = |args: &[&str]| {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(&src_dir)
            .arg(format!("O={}", out.display()))
            .arg(format!("ARCH={}", arch.kernel_arch()))
            .args(args)
            .env("KBUILD_BUILD_TIMESTAMP", "Thu Jan  1 00:00:00 UTC 1970")
            .env("KBUILD_BUILD_USER", "fuse")
            .env("KBUILD_BUILD_HOST", "fuse")
            .env("KBUILD_BUILD_VERSION", "1")
            .env("LC_ALL", "C");
        let kcflags = kernel_cflags(arch);
        if !kcflags.is_empty() {
            cmd.arg(format!("KCFLAGS={kcflags}"));
        }
        if let Some(prefix) = cross_compile_prefix(arch) {
            cmd.arg(format!("CROSS_COMPILE={prefix}"));
        }
        cmd
    };

    progress("  configuring (allnoconfig + kernel-config fragments)");
    let config_out = make(&[
        "allnoconfig",
        &format!("KCONFIG_ALLCONFIG={}", fragment_path.display()),
    ])
    .output()
    .context("Cannot run make")?;
    if !config_out.status.success() {
        bail!(
            "Kernel configuration failed: {}",
            String::from_utf8_lossy(&config_out.stderr).trim()
        );
    }
    let final_config = std::fs::read_to_string(out.join(".config"))?;
    let unapplied = unapplied_options(&fragment, &final_config);
    if !unapplied.is_empty() {
        bail!(
            "Kernel fragments did not apply (unmet dependency or unknown option): {}",
            unapplied.join("; ")
        );
    }

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let target = image_file_name(arch);
    let mut child = make(&[&format!("-j{jobs}"), target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("Cannot run make")?;
    let stderr = child.stderr.take().expect("piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut lines: Vec<String> = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines
    });
    let stdout = child.stdout.take().expect("piped");
    let mut compiled = 0usize;
    let mut last_report = Instant::now();
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if line.trim_start().starts_with("CC") || line.trim_start().starts_with("AS") {
            compiled += 1;
        }
        if last_report.elapsed() >= Duration::from_secs(15) {
            last_report = Instant::now();
            progress(&format!(
                "  compiling: {compiled} files done, {}s elapsed",
                started.elapsed().as_secs()
            ));
        }
    }
    let status = child.wait()?;
    let errors = stderr_reader.join().unwrap_or_default();
    if !status.success() {
        let tail: Vec<&String> = errors.iter().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
        bail!(
            "Kernel build failed (work dir {}): {}",
            work.display(),
            tail.join("\n")
        );
    }

    let release_out = make(&["-s", "kernelrelease"]).output()?;
    let release = String::from_utf8_lossy(&release_out.stdout)
        .trim()
        .to_string();
    let built = out
        .join("arch")
        .join(match arch {
            Arch::X86_64 => "x86",
            Arch::Aarch64 => "arm64",
        })
        .join("boot")
        .join(target);

    let staging = kernels_dir().join(format!(".staging-{key}"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    std::fs::copy(&built, staging.join(target))
        .with_context(|| format!("Kernel build produced no {}", built.display()))?;
    std::fs::write(staging.join("config"), &final_config)?;
    // The kernel has no kallsyms (size): keep the symbol map for reading traces and profiles.
    std::fs::copy(out.join("System.map"), staging.join("System.map")).ok();
    let kernel = Kernel {
        path: final_dir.join(target),
        digest: digest::of_file(&built)?,
        size: std::fs::metadata(&built)?.len(),
        release,
        arch,
        key: key.to_string(),
    };
    std::fs::write(
        staging.join("kernel.json"),
        serde_json::to_vec_pretty(&kernel)?,
    )?;
    std::fs::rename(&staging, final_dir)
        .with_context(|| format!("Cannot move the kernel into {}", final_dir.display()))?;
    std::fs::remove_dir_all(&work).ok();
    progress(&format!(
        "  kernel {} built in {}s ({} bytes)",
        kernel.release,
        started.elapsed().as_secs(),
        kernel.size
    ));
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_sees_options_not_comments() {
        let base = key_options("# why\nCONFIG_A=y\n# CONFIG_B is not set\n");
        assert_eq!(
            base,
            key_options("# a better why\n\nCONFIG_A=y\n# CONFIG_B is not set\n")
        );
        assert_ne!(
            base,
            key_options("# why\nCONFIG_A=m\n# CONFIG_B is not set\n")
        );
        assert_ne!(base, key_options("# why\nCONFIG_A=y\n"));
    }

    #[test]
    fn every_fragment_option_has_a_comment_saying_why() {
        for (name, text) in [
            ("base", BASE_FRAGMENT),
            ("x86_64", X86_64_FRAGMENT),
            ("aarch64", AARCH64_FRAGMENT),
        ] {
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if line.starts_with("CONFIG_") {
                    let previous = if i > 0 { lines[i - 1] } else { "" };
                    assert!(
                        previous.starts_with("# ") && previous.len() > 4,
                        "{name}.config line {}: {line} has no comment above it",
                        i + 1
                    );
                }
            }
        }
    }

    #[test]
    fn fragments_parse_and_cover_the_required_drivers() {
        let options = parse_config(&fragments(Arch::X86_64).unwrap());
        for required in [
            "CONFIG_VIRTIO_PCI",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_HW_RANDOM_VIRTIO",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_SQUASHFS",
            "CONFIG_TMPFS",
            "CONFIG_DEVTMPFS",
            "CONFIG_IPV6",
            "CONFIG_UNIX",
            "CONFIG_FUTEX",
            "CONFIG_EPOLL",
            "CONFIG_EVENTFD",
            "CONFIG_TIMERFD",
            "CONFIG_SIGNALFD",
            "CONFIG_FW_CFG_SYSFS",
            "CONFIG_EFI_STUB",
        ] {
            assert_eq!(
                options.get(required).map(String::as_str),
                Some("y"),
                "{required}"
            );
        }
        assert!(!options.contains_key("CONFIG_MODULES"));
    }

    #[test]
    fn aarch64_fragments_cover_the_virt_machine() {
        let options = parse_config(&fragments(Arch::Aarch64).unwrap());
        for required in [
            "CONFIG_VIRTIO_PCI",
            "CONFIG_PCI_HOST_GENERIC",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_SERIAL_AMBA_PL011_CONSOLE",
            "CONFIG_SQUASHFS_ZSTD",
            "CONFIG_FW_CFG_SYSFS",
            "CONFIG_KEYBOARD_GPIO",
            "CONFIG_INPUT_EVDEV",
        ] {
            assert_eq!(
                options.get(required).map(String::as_str),
                Some("y"),
                "{required}"
            );
        }
        // x86-only options stay out of the arm64 kernel.
        assert!(!options.contains_key("CONFIG_PVH"));
        assert!(!options.contains_key("CONFIG_XZ_DEC_X86"));
    }

    #[test]
    fn both_arches_cover_the_cloud_machine() {
        for arch in [Arch::X86_64, Arch::Aarch64] {
            let options = parse_config(&fragments(arch).unwrap());
            for required in [
                "CONFIG_BLK_DEV_NVME",
                "CONFIG_ENA_ETHERNET",
                "CONFIG_E1000",
                "CONFIG_PCI_MSI",
                "CONFIG_ACPI",
                "CONFIG_ACPI_TINY_POWER_BUTTON",
                "CONFIG_EFI",
                "CONFIG_SERIAL_8250_CONSOLE",
            ] {
                assert_eq!(
                    options.get(required).map(String::as_str),
                    Some("y"),
                    "{arch}: {required}"
                );
            }
        }
        // Graviton: its 16550 UART is a PCI device, its clock comes through UEFI.
        let arm = parse_config(&fragments(Arch::Aarch64).unwrap());
        for required in ["CONFIG_SERIAL_8250_PCI", "CONFIG_RTC_DRV_EFI"] {
            assert_eq!(
                arm.get(required).map(String::as_str),
                Some("y"),
                "{required}"
            );
        }
    }

    #[test]
    fn unapplied_options_are_reported() {
        let fragment = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_N=64\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=32\n";
        assert_eq!(
            unapplied_options(fragment, config),
            vec![
                "CONFIG_B: wanted y, got n",
                "CONFIG_C: wanted n, got y",
                "CONFIG_N: wanted 64, got 32"
            ]
        );
        assert!(unapplied_options(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n").is_empty());
    }

    #[test]
    fn a_cached_kernel_is_checked_against_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bzImage");
        std::fs::write(&path, b"a kernel").unwrap();
        let mut kernel = Kernel {
            path: path.clone(),
            digest: digest::of_bytes(b"a kernel"),
            size: 8,
            release: "6.12".into(),
            arch: Arch::X86_64,
            key: "k".into(),
        };
        assert_eq!(check_cached(dir.path(), &mut kernel).unwrap(), None);
        let record = std::fs::read_to_string(dir.path().join(CHECKED_FILE)).unwrap();
        assert_eq!(check_cached(dir.path(), &mut kernel).unwrap(), None);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CHECKED_FILE)).unwrap(),
            record
        );

        std::fs::write(&path, b"a kern").unwrap();
        let why = check_cached(dir.path(), &mut kernel).unwrap().unwrap();
        assert_eq!(why, "6 bytes, recorded 8");
        std::fs::write(&path, b"a kernal").unwrap();
        let why = check_cached(dir.path(), &mut kernel).unwrap().unwrap();
        assert!(why.starts_with("sha256 "), "{why}");

        // A record without a digest (an older fuse's) gets the file's.
        kernel.digest.clear();
        assert_eq!(check_cached(dir.path(), &mut kernel).unwrap(), None);
        assert_eq!(kernel.digest, digest::of_bytes(b"a kernal"));
        let saved: Kernel =
            serde_json::from_slice(&std::fs::read(dir.path().join("kernel.json")).unwrap())
                .unwrap();
        assert_eq!(saved.digest, kernel.digest);
    }
}
