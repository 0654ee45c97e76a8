//! The QEMU process: spawned in its own process group (so the terminal's Ctrl-C reaches fuse
//! only), with `PR_SET_PDEATHSIG = SIGKILL` (so it dies with fuse, even when fuse is
//! SIGKILLed) and umask 0177 (its QMP socket is its user's alone), owned by a
//! [`ProcessGuard`] whose `Drop` kills the group and reaps it (panics, early returns).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};

/// Makes the process spawned by `cmd` die with its parent (even on SIGKILL).
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid is async-signal-safe and called before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Makes what the process spawned by `cmd` creates its user's alone: QEMU's QMP socket (which
/// controls the VM) is bound `0777 & !umask`, so 0177 makes it 0600, as are its files. QEMU
/// makes no directories here, which this umask would leave unusable.
fn private_files(cmd: &mut Command) {
    // SAFETY: umask is async-signal-safe and cannot fail; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o177);
            Ok(())
        });
    }
}

/// Owns a child process that leads its own process group: `Drop` kills the whole group and
/// reaps the child, unless it was reaped already.
#[derive(Debug)]
pub(crate) struct ProcessGuard {
    child: Child,
    /// The exit status, once reaped.
    status: Option<ExitStatus>,
}

impl ProcessGuard {
    /// Spawns `cmd` in a new process group that dies with this process, with umask 0177.
    pub(crate) fn spawn(cmd: &mut Command) -> io::Result<ProcessGuard> {
        cmd.process_group(0);
        die_with_parent(cmd);
        private_files(cmd);
        Ok(ProcessGuard {
            child: cmd.spawn()?,
            status: None,
        })
    }

    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The child's pid, which is also its process group id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the child has been reaped.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// The exit status if the child has exited (it is then reaped).
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// SIGKILLs the process group and reaps the child.
    pub(crate) fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        // The group id is the child's pid; the unreaped child keeps it from being reused.
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: sends a signal to a process group we created; no memory is involved.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        self.status = self.child.wait().ok();
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poll::wait_until;
    use std::io::Read;
    use std::process::Stdio;
    use std::time::Duration;

    #[test]
    fn test_guard_kills_group_on_drop() {
        let mut cmd = Command::new("sh");
        // A grandchild in the same group must die too.
        cmd.args(["-c", "sleep 100 & echo $!; wait"])
            .stdout(Stdio::piped());
        let mut guard = ProcessGuard::spawn(&mut cmd).unwrap();
        let mut line = String::new();
        let mut stdout = guard.child_mut().stdout.take().unwrap();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
        let grandchild: libc::pid_t = line.trim().parse().unwrap();
        drop(guard);
        // The grandchild is reparented and reaped by init (or a subreaper): wait for it.
        let gone = wait_until(Duration::from_secs(2), Duration::from_millis(10), || {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            stat.map_or(true, |s| s.contains(") Z ")).then_some(())
        });
        assert!(gone.is_some(), "sleep {grandchild} survived");
    }

    #[test]
    fn what_the_child_creates_is_its_users_alone() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "umask"]).stdout(Stdio::piped());
        let mut guard = ProcessGuard::spawn(&mut cmd).unwrap();
        let mut out = String::new();
        let mut stdout = guard.child_mut().stdout.take().unwrap();
        stdout.read_to_string(&mut out).unwrap();
        assert_eq!(out.trim(), "0177");
    }
}
