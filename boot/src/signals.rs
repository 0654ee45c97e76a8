//! SIGINT/SIGTERM/SIGHUP handling while a VM runs.
//!
//! QEMU runs in its own process group, so Ctrl-C on the terminal reaches fuse only. While
//! at least one [`SignalWatch`] is alive, the three signals are caught: the handler records
//! the signal and writes a byte to a self-pipe that the run loop polls. When the last watch
//! is dropped, the previous dispositions are restored, so outside a VM run the signals act
//! as before.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;

/// The signals that stop a running VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// How many stop signals arrived since the process started.
static RECEIVED: AtomicU64 = AtomicU64::new(0);
/// The last stop signal that arrived.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The write end of the self-pipe (-1 before it exists).
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// The read end of the self-pipe (-1 before it exists).
static PIPE_READ: AtomicI32 = AtomicI32::new(-1);

/// Live watches and the dispositions to restore when the last one goes.
static STATE: Mutex<Installed> = Mutex::new(Installed {
    watches: 0,
    previous: Vec::new(),
});

struct Installed {
    watches: usize,
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe operations here: atomics and write(2).
    // SAFETY: __errno_location returns a valid pointer to this thread's errno.
    let saved_errno = unsafe { *libc::__errno_location() };
    LAST_SIGNAL.store(signal, Ordering::SeqCst);
    RECEIVED.fetch_add(1, Ordering::SeqCst);
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: writes one byte from a valid local to a non-blocking pipe; a full pipe
        // (EAGAIN) is fine, the counter above carries the information.
        unsafe { libc::write(fd, std::ptr::addr_of!(byte).cast(), 1) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Catches the stop signals while alive; see the module documentation.
#[derive(Debug)]
pub struct SignalWatch {
    baseline: u64,
}

impl SignalWatch {
    /// Starts catching the stop signals (if no other watch does already).
    pub fn install() -> io::Result<SignalWatch> {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        ensure_pipe()?;
        // Taken under the lock, before the handlers go in: a signal from now on counts.
        let baseline = RECEIVED.load(Ordering::SeqCst);
        if state.watches == 0 {
            let mut previous = Vec::new();
            for signal in STOP_SIGNALS {
                // SAFETY: a zeroed sigaction is a valid starting point; the fields set below
                // make it a plain handler with an empty mask.
                let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART;
                // SAFETY: sa_mask is a valid sigset_t owned by `action`.
                unsafe { libc::sigemptyset(&mut action.sa_mask) };
                // SAFETY: as above, for the old action we read back.
                let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
                // SAFETY: both pointers are valid for the call; the handler is
                // async-signal-safe.
                if unsafe { libc::sigaction(signal, &action, &mut old) } != 0 {
                    let err = io::Error::last_os_error();
                    restore(&previous);
                    return Err(err);
                }
                previous.push((signal, old));
            }
            state.previous = previous;
        }
        state.watches += 1;
        Ok(SignalWatch { baseline })
    }

    /// The file descriptor that becomes readable when a stop signal arrives.
    pub fn fd(&self) -> RawFd {
        PIPE_READ.load(Ordering::SeqCst)
    }

    /// Empties the self-pipe after a wake-up.
    pub fn drain(&self) {
        let fd = self.fd();
        let mut buf = [0u8; 64];
        // SAFETY: reads into a valid local buffer from a non-blocking pipe we own.
        while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    /// How many stop signals arrived since this watch was installed (a second one forces).
    pub fn count(&self) -> u64 {
        RECEIVED.load(Ordering::SeqCst) - self.baseline
    }

    /// The stop signal received since this watch was installed, if any.
    pub fn received(&self) -> Option<libc::c_int> {
        if RECEIVED.load(Ordering::SeqCst) != self.baseline {
            Some(LAST_SIGNAL.load(Ordering::SeqCst))
        } else {
            None
        }
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.watches -= 1;
        if state.watches == 0 {
            let previous = std::mem::take(&mut state.previous);
            restore(&previous);
        }
    }
}

fn restore(previous: &[(libc::c_int, libc::sigaction)]) {
    for (signal, old) in previous {
        // SAFETY: `old` is the action sigaction(2) gave back for this signal.
        unsafe { libc::sigaction(*signal, old, std::ptr::null_mut()) };
    }
}

/// Creates the self-pipe once per process (called with `STATE` held).
fn ensure_pipe() -> io::Result<()> {
    if PIPE_READ.load(Ordering::SeqCst) >= 0 {
        return Ok(());
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    PIPE_WRITE.store(fds[1], Ordering::SeqCst);
    PIPE_READ.store(fds[0], Ordering::SeqCst);
    Ok(())
}

/// Serialises the tests that install watches or raise signals: the counters are global.
#[cfg(test)]
pub(crate) static TEST_LOCK: Mutex<()> = Mutex::new(());

/// The conventional name of a stop signal, for messages.
pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_signal_is_seen_and_disposition_restored() {
        let _serial = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let watch = SignalWatch::install().unwrap();
        assert_eq!(watch.received(), None);
        // SIGHUP: the test harness does not rely on it, and the handler catches it.
        // SAFETY: raising a signal whose handler we just installed.
        unsafe { libc::raise(libc::SIGHUP) };
        assert_eq!(watch.received(), Some(libc::SIGHUP));
        let mut pfd = libc::pollfd {
            fd: watch.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
        watch.drain();
        // A watch created later does not see the old signal.
        let second = SignalWatch::install().unwrap();
        assert_eq!(second.received(), None);
        drop(second);
        drop(watch);

        // SAFETY: reading the current disposition only.
        let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: valid out pointer, null new action.
        unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut now) };
        assert_ne!(
            now.sa_sigaction,
            on_signal as extern "C" fn(libc::c_int) as usize
        );
    }
}
