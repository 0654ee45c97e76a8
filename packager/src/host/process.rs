//! Processes identified beyond their pid, which the kernel reuses: a pid plus its start time
//! names one process for good. Instance state and the store's scratch directories record their
//! owners this way, so a later fuse can tell whether the owner still runs.

use serde::{Deserialize, Serialize};

/// A process, identified beyond its pid (pids are reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessId {
    pub(crate) pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub(crate) start_time: u64,
}

impl ProcessId {
    /// The process `pid` as it is now, if it exists.
    pub(crate) fn of(pid: u32) -> Option<ProcessId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); zombies are gone as far as we care.
        if fields.first() == Some(&"Z") {
            return None;
        }
        let start_time = fields.get(19)?.parse().ok()?;
        Some(ProcessId { pid, start_time })
    }

    /// This process.
    pub(crate) fn current() -> Option<ProcessId> {
        ProcessId::of(std::process::id())
    }

    /// Whether this very process still runs.
    pub(crate) fn is_alive(&self) -> bool {
        ProcessId::of(self.pid).is_some_and(|now| now == *self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_identity_includes_start_time() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        let reused = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !reused.is_alive(),
            "same pid, other start time: another process"
        );
        assert!(ProcessId::of(u32::MAX / 2).is_none());
    }
}
