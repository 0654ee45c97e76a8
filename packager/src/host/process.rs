//! Processes identified beyond their pid, which the kernel reuses: a pid plus its start time
//! names one process for good. Instance state and the store's scratch directories record their
//! owners this way, so a later fuse can tell whether the owner still runs.

use serde::{Deserialize, Serialize};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

/// The QEMU processes (of this user: others' command lines name other stores) with `path`
/// among their arguments, as `-drive ...,file=PATH`: the VMs booting that disk.
pub(crate) fn qemus_naming(path: &Path) -> Vec<u32> {
    let needle = path.as_os_str().as_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|&b| b == 0);
        let is_qemu = args.next().is_some_and(|a0| {
            let name = a0.rsplit(|&b| b == b'/').next().unwrap_or(a0);
            name.starts_with(b"qemu-system")
        });
        let names_path = args.any(|a| {
            a.split(|&b| b == b',')
                .any(|part| part == needle || part.strip_prefix(b"file=") == Some(needle))
        });
        if is_qemu && names_path && ProcessId::of(pid).is_some() {
            found.push(pid);
        }
    }
    found.sort_unstable();
    found
}

/// The CPUs this process may run on (its affinity mask), lowest first.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it, and CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Makes `cmd` run as repeatably as the host allows: no address-space randomisation (so the
/// addresses a program's allocator hands out are the same every run) and, with `cpu`, all its
/// threads on that one CPU (so they interleave the same way far more often). For tools whose
/// output depends on addresses or thread timing, such as a JDK 17 CDS dump.
pub(crate) fn run_repeatably(cmd: &mut std::process::Command, cpu: Option<usize>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: personality and sched_setaffinity are plain syscalls, async-signal-safe; they run
    // between fork and exec on the child's stack and touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            // ADDR_NO_RANDOMIZE on top of the current persona; a kernel that refuses it only
            // makes the output vary, which the caller checks.
            let current = libc::personality(0xffff_ffff);
            if current >= 0 {
                libc::personality((current | libc::ADDR_NO_RANDOMIZE) as libc::c_ulong);
            }
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
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

    #[test]
    fn a_qemu_booting_a_disk_is_found_by_its_path() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        // A shell named like QEMU, with the disk in its arguments as QEMU's -drive has it.
        let fake = dir.path().join("qemu-system-x86_64");
        std::os::unix::fs::symlink("/bin/sh", &fake).unwrap();
        let disk = dir.path().join("blobs/abc");
        let mut child = std::process::Command::new(&fake)
            // Two commands: a shell execs a lone last one, and would no longer look like QEMU.
            .args(["-c", "sleep 30; true", "-drive"])
            .arg(format!(
                "if=none,id=root,format=raw,file={}",
                disk.display()
            ))
            .process_group(0)
            .spawn()
            .unwrap();
        let found = fuse_boot::poll::wait_until(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_millis(10),
            || {
                let pids = qemus_naming(&disk);
                (!pids.is_empty()).then_some(pids)
            },
        );
        let other = qemus_naming(&dir.path().join("blobs/ab"));
        // SAFETY: kills the process group of the child spawned above (the shell and its sleep).
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        child.wait().unwrap();
        // (The shell's child is briefly a copy of it, between its fork and its exec.)
        let found = found.unwrap_or_default();
        assert!(found.contains(&child.id()), "{found:?}");
        assert!(other.is_empty(), "{other:?}");
    }
}
