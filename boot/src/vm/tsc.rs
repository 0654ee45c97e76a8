//! The host's TSC rate, given to x86_64 guests under TCG (`tsc_early_khz=`).
//!
//! TCG answers the guest's `rdtsc` with the host's own TSC (QEMU's `cpu_get_host_ticks`), so
//! the guest's TSC runs at the host's rate. The kernel calibrates it against the PIT early in
//! boot; under TCG that quick calibration often fails on a loaded host, and the fallback
//! against the HPET then costs ~95 ms of the boot (measured with two CPU hogs on the 2-core
//! host: 5 of 8 `--verbose` boots; none of 8 with the rate given). The kernel still refines
//! the rate against the HPET a second after boot, so a small error here is corrected there.
//! Under KVM the kernel reads the rate from kvmclock and nothing is passed.

use std::sync::OnceLock;

/// The host's TSC rate in kHz, measured once per process (5 ms); `None` on a host that is not
/// x86_64, whose TSC is not invariant, or where the measurement was disturbed.
pub(crate) fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(|| invariant_tsc().then(measure).flatten())
}

/// Whether the host's TSC ticks at one rate whatever the CPU's frequency and sleep states:
/// otherwise no single rate describes it.
fn invariant_tsc() -> bool {
    cfg!(target_arch = "x86_64")
        && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
            info.lines()
                .find(|l| l.starts_with("flags"))
                .is_some_and(|flags| {
                    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
                    has("constant_tsc") && has("nonstop_tsc")
                })
        })
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u32> {
    use std::time::{Duration, Instant};
    /// A TSC reading and the clock's between two TSC reads close together (not preempted).
    fn sample() -> Option<(u64, Instant)> {
        for _ in 0..20 {
            // SAFETY: rdtsc has no preconditions on x86_64.
            let before = unsafe { core::arch::x86_64::_rdtsc() };
            let now = Instant::now();
            // SAFETY: as above.
            let after = unsafe { core::arch::x86_64::_rdtsc() };
            if after.wrapping_sub(before) < 5_000 {
                return Some((before + (after - before) / 2, now));
            }
        }
        None
    }
    let (t0, i0) = sample()?;
    std::thread::sleep(Duration::from_millis(5));
    let (t1, i1) = sample()?;
    let nanos = i1.duration_since(i0).as_nanos();
    let khz = u128::from(t1.checked_sub(t0)?) * 1_000_000 / nanos.max(1);
    // A TSC between 100 MHz and 10 GHz; anything else was not measured right.
    (100_000..10_000_000)
        .contains(&khz)
        .then(|| u32::try_from(khz).ok())
        .flatten()
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_two_measurements_agree() {
        if !invariant_tsc() {
            assert_eq!(host_tsc_khz(), None);
            return;
        }
        let (a, b) = (measure().unwrap(), measure().unwrap());
        // 5 ms against the monotonic clock: well within 1 % of each other.
        assert!(a.abs_diff(b) * 100 < a, "{a} kHz then {b} kHz");
        assert!(host_tsc_khz().is_some());
    }
}
