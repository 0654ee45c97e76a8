//! Choice of QEMU accelerator: KVM where it really works, TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: under nested virtualisation QEMU may abort (MSRs the
//! outer hypervisor refuses) or hang. [`select_accel`] therefore runs a tiny probe VM once per
//! host, with the same CPU model and machine the runner uses, and caches the verdict in
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

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fuse_rootfs::Arch;

use super::config::{Accel, AccelChoice};
use super::machine;
use super::process::ProcessGuard;
use crate::poll::wait_until;

/// How long the probe VM may take before KVM is declared hanging. A working probe exits in
/// about 0.1 s.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(2500);
/// The status QEMU exits with when the probe ran to its end.
const PROBE_OK_STATUS: i32 = (0x2a << 1) | 1;
/// The status QEMU exits with when the aarch64 probe powered the machine off through PSCI.
const AARCH64_PROBE_OK_STATUS: i32 = 0;
/// Version of the cache file layout.
const CACHE_VERSION: u64 = 1;

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
    #[error("KVM was requested but /dev/kvm cannot be opened; add your user to the 'kvm' group or use --accel tcg")]
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
pub fn select_accel(
    choice: AccelChoice,
    arch: Arch,
    qemu: &Path,
) -> Result<AccelSelection, AccelError> {
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
                    ProbeVerdict::Usable => {
                        return Ok(AccelSelection {
                            accel: Accel::Kvm,
                            notice: None,
                        })
                    }
                    ProbeVerdict::Unusable(reason) => reason,
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

/// The outcome of a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeVerdict {
    Usable,
    /// Why not, in a few words.
    Unusable(String),
}

/// The probe verdict for this host, from the cache or from a fresh probe (then cached).
fn cached_probe(arch: Arch, qemu: &Path) -> ProbeVerdict {
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
            (Some(true), _) => return ProbeVerdict::Usable,
            (Some(false), Some(reason)) => return ProbeVerdict::Unusable(reason.to_string()),
            _ => {}
        }
    }
    let verdict = probe_kvm(arch, qemu);
    let entry = match &verdict {
        ProbeVerdict::Usable => serde_json::json!({ "kvm": true }),
        ProbeVerdict::Unusable(reason) => serde_json::json!({ "kvm": false, "reason": reason }),
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
fn cache_dir() -> Option<PathBuf> {
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

/// Runs the KVM probe VM (uncached). Prefer [`select_accel`].
fn probe_kvm(arch: Arch, qemu: &Path) -> ProbeVerdict {
    probe_accel(arch, qemu, Accel::Kvm, PROBE_TIMEOUT)
}

/// Boots the probe firmware for `arch` under `accel`: usable when it runs to its end within
/// `patience`. Same CPU model and machine as real runs (`-cpu host` is what fails under some
/// nested hypervisors), except that the aarch64 probe needs no `acpi=off`.
pub fn probe_accel(arch: Arch, qemu: &Path, accel: Accel, patience: Duration) -> ProbeVerdict {
    let cpu = machine::cpu_model(accel);
    let accel = accel.as_str();
    match arch {
        Arch::X86_64 => run_probe(
            qemu,
            &x86_probe_firmware(),
            &[
                "-accel",
                accel,
                "-cpu",
                cpu,
                "-M",
                machine::X86_MACHINE,
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=4",
            ],
            PROBE_OK_STATUS,
            patience,
        ),
        Arch::Aarch64 => run_probe(
            qemu,
            &aarch64_probe_firmware(),
            &["-accel", accel, "-cpu", cpu, "-M", "virt"],
            AARCH64_PROBE_OK_STATUS,
            patience,
        ),
    }
}

/// The aarch64 probe firmware for `-M virt`: PSCI `SYSTEM_OFF` (function id 0x84000008) through
/// `hvc`, the conduit QEMU's virt machine uses for a guest without EL2/EL3 firmware.
fn aarch64_probe_firmware() -> Vec<u8> {
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

/// The x86 probe firmware: `mov al, 0x2a; out 0xf4, al; hlt` at the reset vector.
fn x86_probe_firmware() -> Vec<u8> {
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

/// Boots `firmware` with `machine_args`; usable when QEMU exits with `ok_status` within
/// `patience`.
fn run_probe(
    qemu: &Path,
    firmware_bytes: &[u8],
    machine_args: &[&str],
    ok_status: i32,
    patience: Duration,
) -> ProbeVerdict {
    let dir = match tempfile::Builder::new().prefix("fuse-kvm-probe").tempdir() {
        Ok(dir) => dir,
        Err(e) => return ProbeVerdict::Unusable(format!("probe not possible: {e}")),
    };
    let firmware = dir.path().join("probe.bin");
    if let Err(e) = fs::write(&firmware, firmware_bytes) {
        return ProbeVerdict::Unusable(format!("probe not possible: {e}"));
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
        Err(e) => return ProbeVerdict::Unusable(format!("cannot start {}: {e}", qemu.display())),
    };
    let exited = wait_until(patience, Duration::from_millis(10), || {
        probe.try_wait().transpose()
    });
    let Some(Ok(status)) = exited else {
        // Dropping the guard kills and reaps the probe.
        return ProbeVerdict::Unusable("probe timed out".to_string());
    };
    if status.code() == Some(ok_status) {
        return ProbeVerdict::Usable;
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
        Some(line) => ProbeVerdict::Unusable(format!("{what}: {line}")),
        None => ProbeVerdict::Unusable(what),
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
    fn test_firmware_reset_vector() {
        let fw = x86_probe_firmware();
        assert_eq!(fw.len(), 65536);
        assert_eq!(&fw[0xfff0..0xfff4], &[0xb0, 0x2a, 0xe6, 0xf4]);
    }

    #[test]
    fn test_tcg_needs_no_probe() {
        let sel = select_accel(AccelChoice::Tcg, Arch::X86_64, Path::new("/nonexistent")).unwrap();
        assert_eq!(sel.accel, Accel::Tcg);
        assert_eq!(sel.notice, None);
    }

    #[test]
    fn test_foreign_arch_is_tcg_without_notice() {
        let foreign = if Arch::host() == Arch::X86_64 {
            Arch::Aarch64
        } else {
            Arch::X86_64
        };
        let sel = select_accel(AccelChoice::Auto, foreign, Path::new("/nonexistent")).unwrap();
        assert_eq!(
            sel,
            AccelSelection {
                accel: Accel::Tcg,
                notice: None
            }
        );
        let err = select_accel(AccelChoice::Kvm, foreign, Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("--accel tcg"), "{err}");
    }
}
