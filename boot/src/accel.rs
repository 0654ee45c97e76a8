//! Choice of QEMU accelerator: KVM where it really works, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: under nested virtualisation QEMU may abort (MSRs the
//! outer hypervisor refuses) or hang. [`select`] therefore runs a tiny probe VM once per host,
//! with the same CPU model and machine the runner uses, and caches the verdict in
//! `$FUSE_CACHE_DIR/accel.json` (else `$XDG_CACHE_HOME/fuse`, else `~/.cache/fuse`), keyed by
//! the QEMU binary (path, size, mtime), the host kernel release and the guest architecture.
//!
//! The x86 probe is a 64 KiB firmware blob whose reset vector writes 0x2a to an
//! `isa-debug-exit` port: QEMU then exits with status `(0x2a << 1) | 1` = 85. Anything else
//! (an error, another status, no exit within [`PROBE_TIMEOUT`]) means KVM is not usable.
//!
//! The aarch64 probe (arm64 hosts) is a 4 KiB firmware blob for `-M virt` that calls PSCI
//! `SYSTEM_OFF` through `hvc`: QEMU then exits with status 0. An aarch64 guest on an x86_64
//! host (and the reverse) always runs under TCG: `auto` picks it without a probe or notice.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use fuse_rootfs::Arch;

use crate::qemu::ProcessGuard;

/// How long the probe VM may take before KVM is declared hanging. A working probe exits in
/// about 0.1 s.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2500);
/// The status QEMU exits with when the probe ran to its end.
const PROBE_OK_STATUS: i32 = (0x2a << 1) | 1;
/// The status QEMU exits with when the aarch64 probe powered the machine off through PSCI.
const AARCH64_PROBE_OK_STATUS: i32 = 0;
/// Version of the cache file layout.
const CACHE_VERSION: u64 = 1;

/// What the user asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if it works here, else TCG.
    #[default]
    Auto,
    /// KVM, or an error.
    Kvm,
    /// TCG (emulation), always available.
    Tcg,
}

/// An unknown `--accel` value.
#[derive(Debug, thiserror::Error)]
#[error("Unknown accelerator '{0}': use auto, kvm or tcg")]
pub struct UnknownAccel(pub String);

impl FromStr for AccelChoice {
    type Err = UnknownAccel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(UnknownAccel(other.to_string())),
        }
    }
}

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The accelerator chosen, and the one-line notice to show the user when KVM was wanted
/// (`auto`) but is not usable. The notice has no `fuse: ` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelSelection {
    pub accel: Accel,
    pub notice: Option<String>,
}

/// Errors choosing the accelerator.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("KVM was requested but /dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded); use --accel tcg")]
    KvmMissing,
    #[error("KVM was requested but /dev/kvm cannot be opened: {0}; add your user to the 'kvm' group or use --accel tcg")]
    KvmDenied(#[source] io::Error),
    #[error(
        "KVM was requested but cannot run {guest} guests on this {host} host; use --accel tcg"
    )]
    ForeignArch { guest: Arch, host: Arch },
}

/// Picks the accelerator for a guest of `arch` run by the QEMU binary `qemu`.
///
/// `Auto` probes KVM (cached per host, see the module documentation); `Kvm` only checks that
/// `/dev/kvm` can be opened, so a broken KVM shows up as a boot failure the user asked for.
pub fn select(choice: AccelChoice, arch: Arch, qemu: &Path) -> Result<AccelSelection, AccelError> {
    let tcg = |notice: Option<String>| AccelSelection {
        accel: Accel::Tcg,
        notice,
    };
    match choice {
        AccelChoice::Tcg => Ok(tcg(None)),
        AccelChoice::Kvm => {
            if arch != Arch::host() {
                return Err(AccelError::ForeignArch {
                    guest: arch,
                    host: Arch::host(),
                });
            }
            match kvm_device_usable() {
                Ok(()) => Ok(AccelSelection {
                    accel: Accel::Kvm,
                    notice: None,
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(AccelError::KvmMissing),
                Err(e) => Err(AccelError::KvmDenied(e)),
            }
        }
        AccelChoice::Auto => {
            // Emulating another architecture: TCG is the only option, and expected.
            if arch != Arch::host() {
                return Ok(tcg(None));
            }
            let reason = match kvm_device_usable() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => "no /dev/kvm".to_string(),
                Err(e) => format!("/dev/kvm: {e}"),
                Ok(()) => match cached_probe(arch, qemu) {
                    Verdict::Usable => {
                        return Ok(AccelSelection {
                            accel: Accel::Kvm,
                            notice: None,
                        })
                    }
                    Verdict::Unusable(reason) => reason,
                },
            };
            Ok(tcg(Some(format!(
                "KVM is not usable here ({reason}); using TCG (slower). Pass --accel tcg to silence."
            ))))
        }
    }
}

fn kvm_device_usable() -> io::Result<()> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
}

/// The outcome of a KVM probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Usable,
    /// Why not, in a few words.
    Unusable(String),
}

/// The probe verdict for this host, from the cache or from a fresh probe (then cached).
fn cached_probe(arch: Arch, qemu: &Path) -> Verdict {
    let Some(key) = cache_key(arch, qemu) else {
        return probe_kvm(arch, qemu);
    };
    let path = cache_dir().map(|d| d.join("accel.json"));
    let mut cache = path
        .as_deref()
        .and_then(|p| fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["version"].as_u64() == Some(CACHE_VERSION))
        .unwrap_or_else(|| serde_json::json!({ "version": CACHE_VERSION, "entries": {} }));
    if let Some(entry) = cache["entries"].get(&key) {
        match (entry["kvm"].as_bool(), entry["reason"].as_str()) {
            (Some(true), _) => return Verdict::Usable,
            (Some(false), Some(reason)) => return Verdict::Unusable(reason.to_string()),
            _ => {}
        }
    }
    let verdict = probe_kvm(arch, qemu);
    let entry = match &verdict {
        Verdict::Usable => serde_json::json!({ "kvm": true }),
        Verdict::Unusable(reason) => serde_json::json!({ "kvm": false, "reason": reason }),
    };
    if !cache["entries"].is_object() {
        cache["entries"] = serde_json::json!({});
    }
    cache["entries"][&key] = entry;
    if let Some(path) = path {
        // A cache that cannot be written only costs another probe next time.
        let _ = write_atomically(
            &path,
            &serde_json::to_vec_pretty(&cache).unwrap_or_default(),
        );
    }
    verdict
}

/// Where fuse keeps host-specific caches.
pub fn cache_dir() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("FUSE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("fuse"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".cache/fuse"))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".accel.json.{}", std::process::id()));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// What identifies a probe result: the QEMU binary, the host kernel and the guest arch.
fn cache_key(arch: Arch, qemu: &Path) -> Option<String> {
    let qemu = fs::canonicalize(qemu).ok()?;
    let meta = fs::metadata(&qemu).ok()?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Some(format!(
        "{}|{}|{}.{}|{}|{}",
        arch.as_str(),
        qemu.display(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.size(),
        release.trim()
    ))
}

/// Runs the probe VM (uncached). Prefer [`select`].
pub fn probe_kvm(arch: Arch, qemu: &Path) -> Verdict {
    match arch {
        Arch::X86_64 => probe_x86(qemu),
        Arch::Aarch64 => probe_aarch64(qemu),
    }
}

/// The aarch64 probe firmware for `-M virt`: PSCI `SYSTEM_OFF` (function id 0x84000008) through
/// `hvc`, the conduit QEMU's virt machine uses for a guest without EL2/EL3 firmware.
pub fn aarch64_probe_firmware() -> Vec<u8> {
    let code: [u32; 4] = [
        0x5280_0100, // movz w0, #0x0008
        0x72b0_8000, // movk w0, #0x8400, lsl #16
        0xd400_0002, // hvc #0
        0x1400_0000, // b . (only reached if SYSTEM_OFF returned)
    ];
    let mut blob: Vec<u8> = code.iter().flat_map(|w| w.to_le_bytes()).collect();
    blob.resize(4096, 0);
    blob
}

fn probe_aarch64(qemu: &Path) -> Verdict {
    run_probe(
        qemu,
        &aarch64_probe_firmware(),
        &["-accel", "kvm", "-cpu", "host", "-M", "virt"],
        AARCH64_PROBE_OK_STATUS,
    )
}

/// The x86 probe firmware: `mov al, 0x2a; out 0xf4, al; hlt` at the reset vector.
pub fn x86_probe_firmware() -> Vec<u8> {
    let mut blob = vec![0xf4u8; 64 * 1024]; // hlt everywhere else
    let code = [
        0xb0, 0x2a, // mov al, 0x2a
        0xe6, 0xf4, // out 0xf4, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ];
    blob[0xfff0..0xfff0 + code.len()].copy_from_slice(&code);
    blob
}

fn probe_x86(qemu: &Path) -> Verdict {
    // Same CPU model and machine as real runs: `-cpu host` is what fails under some
    // nested hypervisors.
    run_probe(
        qemu,
        &x86_probe_firmware(),
        &[
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-M",
            crate::qemu::X86_MACHINE,
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ],
        PROBE_OK_STATUS,
    )
}

/// Boots `firmware` with `machine_args`; usable when QEMU exits with `ok_status` in time.
fn run_probe(qemu: &Path, firmware_bytes: &[u8], machine_args: &[&str], ok_status: i32) -> Verdict {
    let dir = match tempfile::Builder::new().prefix("fuse-kvm-probe").tempdir() {
        Ok(dir) => dir,
        Err(e) => return Verdict::Unusable(format!("probe not possible: {e}")),
    };
    let firmware = dir.path().join("probe.bin");
    if let Err(e) = fs::write(&firmware, firmware_bytes) {
        return Verdict::Unusable(format!("probe not possible: {e}"));
    }
    let mut cmd = Command::new(qemu);
    cmd.args(machine_args)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-bios")
        .arg(&firmware)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut probe = match ProcessGuard::spawn(&mut cmd) {
        Ok(probe) => probe,
        Err(e) => return Verdict::Unusable(format!("cannot start {}: {e}", qemu.display())),
    };
    let started = Instant::now();
    let status = loop {
        match probe.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < PROBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            // Dropping the guard kills and reaps the probe.
            _ => return Verdict::Unusable("probe timed out".to_string()),
        }
    };
    if status.code() == Some(ok_status) {
        return Verdict::Usable;
    }
    let mut stderr = String::new();
    if let Some(mut err) = probe.child_mut().stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let what = match (status.code(), status.signal()) {
        (_, Some(libc::SIGABRT)) => "probe VM aborted".to_string(),
        (_, Some(signal)) => format!("probe VM killed by signal {signal}"),
        (code, _) => format!("probe VM exited with {}", code.unwrap_or(-1)),
    };
    // QEMU's error line says why, e.g. "qemu-system-x86_64: error: failed to set MSR 0x10a
    // to 0x69"; keep what follows the last "error: " or the program name.
    let line = stderr
        .lines()
        .find(|l| l.contains("error"))
        .or(stderr.lines().next())
        .map(|l| {
            let l = l.rsplit_once("error: ").map_or(l, |(_, why)| why);
            l.strip_prefix(&format!("{}: ", program_name(qemu)))
                .unwrap_or(l)
                .trim()
        })
        .filter(|l| !l.is_empty());
    match line {
        Some(line) => Verdict::Unusable(format!("{what}: {line}")),
        None => Verdict::Unusable(what),
    }
}

fn program_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_choice() {
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert_eq!("kvm".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert!("hvf".parse::<AccelChoice>().is_err());
    }

    #[test]
    fn test_firmware_reset_vector() {
        let fw = x86_probe_firmware();
        assert_eq!(fw.len(), 65536);
        assert_eq!(&fw[0xfff0..0xfff4], &[0xb0, 0x2a, 0xe6, 0xf4]);
    }

    #[test]
    fn test_tcg_needs_no_probe() {
        let sel = select(AccelChoice::Tcg, Arch::X86_64, Path::new("/nonexistent")).unwrap();
        assert_eq!(sel.accel, Accel::Tcg);
        assert_eq!(sel.notice, None);
    }

    /// The probe firmware itself runs to its end under TCG (checks the blob, not KVM).
    #[test]
    fn test_probe_firmware_under_tcg() {
        let Ok(qemu) = crate::qemu::find_qemu(Arch::X86_64) else {
            eprintln!("skipped: qemu-system-x86_64 not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("probe.bin");
        fs::write(&fw, x86_probe_firmware()).unwrap();
        let status = Command::new(qemu)
            .args(["-accel", "tcg", "-M", crate::qemu::X86_MACHINE])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-bios"])
            .arg(&fw)
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(PROBE_OK_STATUS));
    }

    /// The aarch64 probe firmware powers `-M virt` off through PSCI under TCG.
    #[test]
    fn test_aarch64_probe_firmware_under_tcg() {
        let Ok(qemu) = crate::qemu::find_qemu(Arch::Aarch64) else {
            eprintln!("skipped: qemu-system-aarch64 not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("probe.bin");
        fs::write(&fw, aarch64_probe_firmware()).unwrap();
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-M", "virt"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-bios",
            ])
            .arg(&fw)
            .stdin(Stdio::null());
        let mut probe = ProcessGuard::spawn(&mut cmd).unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(status) = probe.try_wait().unwrap() {
                break status;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "probe hangs");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(AARCH64_PROBE_OK_STATUS));
    }

    #[test]
    fn test_foreign_arch_is_tcg_without_notice() {
        let foreign = if Arch::host() == Arch::X86_64 {
            Arch::Aarch64
        } else {
            Arch::X86_64
        };
        let sel = select(AccelChoice::Auto, foreign, Path::new("/nonexistent")).unwrap();
        assert_eq!(
            sel,
            AccelSelection {
                accel: Accel::Tcg,
                notice: None
            }
        );
        let err = select(AccelChoice::Kvm, foreign, Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("--accel tcg"), "{err}");
    }

    #[test]
    fn test_auto_caches_verdict() {
        let Ok(qemu) = crate::qemu::find_qemu(Arch::X86_64) else {
            eprintln!("skipped: qemu-system-x86_64 not installed");
            return;
        };
        if Arch::host() != Arch::X86_64 || kvm_device_usable().is_err() {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let key = cache_key(Arch::X86_64, &qemu).unwrap();
        let cache = dir.path().join("accel.json");
        // Seed a verdict: select must use it without probing.
        let seeded = serde_json::json!({"version": CACHE_VERSION, "entries": {
            key.clone(): {"kvm": false, "reason": "seeded"}}});
        fs::write(&cache, seeded.to_string()).unwrap();
        let verdict = with_cache_dir(dir.path(), || cached_probe(Arch::X86_64, &qemu));
        assert_eq!(verdict, Verdict::Unusable("seeded".into()));

        // A fresh probe is stored.
        fs::remove_file(&cache).unwrap();
        let started = Instant::now();
        let first = with_cache_dir(dir.path(), || cached_probe(Arch::X86_64, &qemu));
        eprintln!("KVM probe: {first:?} in {:?}", started.elapsed());
        assert!(started.elapsed() < PROBE_TIMEOUT + Duration::from_secs(2));
        let stored: serde_json::Value = serde_json::from_slice(&fs::read(&cache).unwrap()).unwrap();
        assert_eq!(
            stored["entries"][&key]["kvm"].as_bool(),
            Some(first == Verdict::Usable)
        );
        let started = Instant::now();
        let second = with_cache_dir(dir.path(), || cached_probe(Arch::X86_64, &qemu));
        assert_eq!(first, second);
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    /// Runs `f` with `FUSE_CACHE_DIR` set; tests that touch the variable hold this lock.
    fn with_cache_dir<T>(dir: &Path, f: impl FnOnce() -> T) -> T {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("FUSE_CACHE_DIR", dir);
        let result = f();
        std::env::remove_var("FUSE_CACHE_DIR");
        result
    }
}
