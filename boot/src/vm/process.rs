//! The QEMU process: spawned in its own process group (so the terminal's Ctrl-C reaches fuse
//! only), with `PR_SET_PDEATHSIG = SIGKILL` (so it dies with fuse, even when fuse is
//! SIGKILLed) and umask 0177 (its QMP socket is its user's alone), owned by a
//! [`ProcessGuard`] whose `Drop` kills the group and reaps it (panics, early returns).
//!
//! A QEMU that drops its uid (`-runas`, when fuse runs as root) loses its parent-death signal:
//! the kernel clears it on any change of credentials. [`ProcessGuard::watch_over`] then starts
//! a sentinel, a forked child of fuse that waits for fuse to go (its pipe from fuse reaches
//! end of file, however fuse ends) and kills QEMU's process group.

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
    sentinel: Option<Sentinel>,
}

/// A child of fuse that kills a process group when fuse is gone (see the module docs).
#[derive(Debug)]
struct Sentinel {
    pid: libc::pid_t,
    /// The write end of its pipe: closed when fuse ends, however it ends.
    _alive: std::os::fd::OwnedFd,
}

impl Sentinel {
    fn spawn(pgid: libc::pid_t) -> io::Result<Sentinel> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two descriptors we then own; close-on-exec keeps them out of
        // every program fuse starts.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fork in a threaded process: the child makes only async-signal-safe calls
        // (setpgid, close, read, kill, _exit) and never returns into Rust code.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: the forked child: only async-signal-safe calls on its own descriptors,
            // then _exit; it never returns.
            unsafe {
                // Its own group: the terminal's Ctrl-C is for fuse, not for it.
                libc::setpgid(0, 0);
                libc::close(fds[1]);
                let mut byte = 0u8;
                loop {
                    let n = libc::read(fds[0], (&mut byte as *mut u8).cast(), 1);
                    if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                        break;
                    }
                }
                libc::kill(-pgid, libc::SIGKILL);
                libc::_exit(0);
            }
        }
        let err = io::Error::last_os_error();
        // SAFETY: both descriptors are ours; the read end is the sentinel's alone now.
        unsafe { libc::close(fds[0]) };
        // SAFETY: as above, fds[1] is open and owned by nothing else.
        let alive = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
        if pid < 0 {
            return Err(err);
        }
        Ok(Sentinel { pid, _alive: alive })
    }

    /// Ends the sentinel without it acting: called before the group it watches is reaped,
    /// so it can never signal a reused process group id.
    fn dismiss(self) {
        // SAFETY: signals and reaps our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
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
            sentinel: None,
        })
    }

    /// Starts a sentinel that kills the child's group if fuse dies: for a child that changes
    /// its credentials and so loses the parent-death signal (QEMU's `-runas`).
    pub(crate) fn watch_over(&mut self) -> io::Result<()> {
        if self.sentinel.is_none() {
            self.sentinel = Some(Sentinel::spawn(self.child.id() as libc::pid_t)?);
        }
        Ok(())
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
            if self.status.is_some() {
                // Reaped: its group id may be reused from now on.
                if let Some(sentinel) = self.sentinel.take() {
                    sentinel.dismiss();
                }
            }
        }
        Ok(self.status)
    }

    /// SIGKILLs the process group and reaps the child.
    pub(crate) fn kill(&mut self) {
        if let Some(sentinel) = self.sentinel.take() {
            sentinel.dismiss();
        }
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
