//! The accelerator probe VMs, booted for real: the probe firmware runs to its end under TCG
//! (this checks the blobs and the machine arguments, not KVM), and `auto` caches the KVM verdict.
//! Each test says why it is skipped when QEMU (or a usable /dev/kvm) is missing.

use std::fs;
use std::time::{Duration, Instant};

use fuse_boot::vm::{
    find_qemu, probe_accel, select_accel, Accel, AccelChoice, ProbeVerdict, PROBE_TIMEOUT,
};
use fuse_rootfs::Arch;

/// Generous: under TCG on a loaded host QEMU itself takes a while to start.
const TCG_PATIENCE: Duration = Duration::from_secs(10);

/// The x86 firmware writes to `isa-debug-exit`; the aarch64 one powers `-M virt` off through
/// PSCI.
#[test]
fn test_probe_firmware_under_tcg() {
    for arch in Arch::ALL {
        let Ok(qemu) = find_qemu(arch) else {
            eprintln!("skipped for {arch}: QEMU not installed");
            continue;
        };
        let verdict = probe_accel(arch, &qemu, Accel::Tcg, TCG_PATIENCE);
        assert_eq!(verdict, ProbeVerdict::Usable, "{arch}");
    }
}

#[test]
fn test_auto_caches_verdict() {
    let Ok(qemu) = find_qemu(Arch::X86_64) else {
        eprintln!("skipped: qemu-system-x86_64 not installed");
        return;
    };
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if Arch::host() != Arch::X86_64 || kvm.is_err() {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("accel.json");
    // The only test of this binary that touches the variable.
    std::env::set_var("FUSE_CACHE_DIR", dir.path());
    let select = || select_accel(AccelChoice::Auto, Arch::X86_64, &qemu).unwrap();

    // A fresh probe is stored.
    let started = Instant::now();
    let first = select();
    eprintln!("KVM probe: {first:?} in {:?}", started.elapsed());
    assert!(started.elapsed() < PROBE_TIMEOUT + Duration::from_secs(2));
    let mut stored: serde_json::Value = serde_json::from_slice(&fs::read(&cache).unwrap()).unwrap();
    let entries = stored["entries"].as_object_mut().unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = entries.values_mut().next().unwrap();
    assert_eq!(entry["kvm"].as_bool(), Some(first.accel == Accel::Kvm));

    // The next selection uses it without probing.
    let started = Instant::now();
    assert_eq!(select(), first);
    assert!(started.elapsed() < Duration::from_millis(100));

    // A seeded verdict is used as it is.
    *entry = serde_json::json!({"kvm": false, "reason": "seeded"});
    fs::write(&cache, stored.to_string()).unwrap();
    let seeded = select();
    std::env::remove_var("FUSE_CACHE_DIR");
    assert_eq!(seeded.accel, Accel::Tcg);
    assert!(
        seeded
            .notice
            .as_deref()
            .unwrap_or_default()
            .contains("(seeded)"),
        "{seeded:?}"
    );
}
