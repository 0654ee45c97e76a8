//! One deploy, rollback or destroy at a time per app and environment, with the state in AWS:
//! a `fuse:lock` tag on the environment's security group names the holder (`user@host`, its
//! pid and the pid's start time) and since when. Taking it: read the tag, refuse a live
//! holder's, write ours, wait [`SETTLE`], read it back: if another run's value is there, it
//! wrote after us and wins (last writer wins), and we stop.
//!
//! EC2 has no compare-and-swap on tags; the settle interval is what makes this hold. Two runs
//! A and B both read "no lock", then both write. Whichever wrote last sees its own value and
//! goes on; the other must see the later value at its read-back. It does when the later write
//! lands within [`SETTLE`] of the earlier one: the later writer read "no lock" before the
//! earlier write (else it would have refused), and wrote one round trip after that read, so
//! within one round trip (well under [`SETTLE`]) of the earlier write. What is left: a run
//! stalled for longer than [`SETTLE`] between its read and its write, or tags EC2 shows late
//! (its reads are eventually consistent).
//!
//! A lock is taken over, with a warning, when it is older than [`STALE`], when its holder was
//! a process of this host that no longer runs (a killed fuse), or with `--break-lock`; so a
//! crashed run never blocks an environment for good. Ctrl-C and SIGTERM while locked set a
//! flag ([`interrupted`]) that the waits check, so the run cleans up and releases the lock.

use super::aws::ec2;
use super::aws::http::{has_code, Client};
use crate::host::now_secs;
use crate::host::process::ProcessId;
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The tag on the security group.
pub(crate) const LOCK_TAG: &str = "fuse:lock";
/// A lock this old is a crashed run's.
pub(crate) const STALE: Duration = Duration::from_secs(30 * 60);
/// Between writing the lock and reading it back: longer than one EC2 round trip, so a run
/// whose check came before our write has written by the time we read (see the module docs).
const SETTLE: Duration = Duration::from_secs(2);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether Ctrl-C (or SIGTERM) came while a lock was held.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// From now on Ctrl-C and SIGTERM set [`interrupted`] instead of ending the process.
fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Ctrl-C and SIGTERM end the process again.
fn restore_signals() {
    // SAFETY: restores the default dispositions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
}

/// Who holds a lock, as its tag says: `user@host;pid;start-time;unix-seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) who: String,
    pub(crate) process: ProcessId,
    pub(crate) since: u64,
}

impl Holder {
    fn me(now: u64) -> Holder {
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Holder {
            who: format!("{user}@{}", this_host()),
            process: ProcessId::current().unwrap_or(ProcessId {
                pid: std::process::id(),
                start_time: 0,
            }),
            since: now,
        }
    }

    fn value(&self) -> String {
        format!(
            "{};{};{};{}",
            self.who, self.process.pid, self.process.start_time, self.since
        )
    }

    fn parse(value: &str) -> Option<Holder> {
        let mut parts = value.rsplitn(4, ';');
        let since = parts.next()?.parse().ok()?;
        let start_time = parts.next()?.parse().ok()?;
        let pid = parts.next()?.parse().ok()?;
        Some(Holder {
            who: parts.next()?.to_string(),
            process: ProcessId { pid, start_time },
            since,
        })
    }

    /// `user@host (pid N) since TIME (M min ago)`.
    pub(crate) fn describe(&self, now: u64) -> String {
        format!(
            "{} (pid {}) since {} ({} min ago)",
            self.who,
            self.process.pid,
            crate::image::manifest::rfc3339(self.since as i64),
            now.saturating_sub(self.since) / 60
        )
    }

    /// Why the lock may be taken over, if it may.
    fn stale(&self, now: u64) -> Option<String> {
        if now.saturating_sub(self.since) >= STALE.as_secs() {
            return Some(format!("older than {} min", STALE.as_secs() / 60));
        }
        let host = self.who.rsplit_once('@').map(|(_, h)| h);
        if host == Some(this_host().as_str()) && !self.process.is_alive() {
            return Some("its process is gone".into());
        }
        None
    }
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The lock's tag value on `group`, as EC2 has it now.
fn read(client: &Client, group: &str) -> Result<Option<String>> {
    let ids = [group];
    Ok(
        ec2::describe_security_groups(client, &[("group-id", &ids)])?
            .into_iter()
            .next()
            .and_then(|g| g.tags.get(LOCK_TAG).cloned()),
    )
}

/// Whether the lock's tag `value` may be taken: the refusal when not, else the warning to
/// print when taking it over.
fn may_take(value: &str, what: &str, break_lock: bool, now: u64) -> Result<String> {
    match Holder::parse(value) {
        Some(h) => match h.stale(now) {
            Some(why) => Ok(format!(
                "warning: taking over the lock of {what} held by {} ({why})",
                h.describe(now)
            )),
            None if break_lock => Ok(format!(
                "warning: --break-lock: taking over the lock of {what} held by {}",
                h.describe(now)
            )),
            None => bail!(
                "{what} is being deployed by {}: wait for it to end, or pass --break-lock if that run is gone",
                h.describe(now)
            ),
        },
        None => Ok(format!(
            "warning: taking over the lock of {what} (unreadable tag {LOCK_TAG}={value})"
        )),
    }
}

/// Refuses early (before an AMI is made) when another run holds the lock of the app/env
/// whose security group is `group`; [`acquire`] decides for good.
pub(crate) fn refuse_if_held(
    client: &Client,
    group: &str,
    what: &str,
    break_lock: bool,
) -> Result<()> {
    match read(client, group)? {
        Some(value) => may_take(&value, what, break_lock, now_secs()).map(drop),
        None => Ok(()),
    }
}

/// A held lock: release it with [`Lock::release`] on every path.
#[derive(Debug)]
pub(crate) struct Lock {
    group: String,
    value: String,
}

/// Takes the lock of the app/env whose security group is `group` (see the module
/// documentation); `what` names the environment in messages.
pub(crate) fn acquire(
    client: &Client,
    group: &str,
    what: &str,
    break_lock: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<Lock> {
    let now = now_secs();
    if let Some(value) = read(client, group)? {
        progress(&may_take(&value, what, break_lock, now)?);
    }
    let value = Holder::me(now).value();
    ec2::create_tags(client, &[group], &[(LOCK_TAG, &value)])?;
    catch_signals();
    std::thread::sleep(SETTLE);
    match read(client, group)? {
        Some(v) if v == value => Ok(Lock {
            group: group.to_string(),
            value,
        }),
        other => {
            restore_signals();
            let by = other
                .as_deref()
                .and_then(Holder::parse)
                .map(|h| h.describe(now_secs()))
                .unwrap_or_else(|| "another run".into());
            bail!("{what} is being deployed by {by}, which took the lock at the same time: wait for it to end")
        }
    }
}

impl Lock {
    /// Removes the tag while it is still ours (a run that took it over keeps it).
    pub(crate) fn release(self, client: &Client) -> Result<()> {
        restore_signals();
        match read(client, &self.group) {
            Ok(Some(v)) if v == self.value => {
                ec2::delete_tag(client, &self.group, LOCK_TAG, &self.value)
            }
            // Gone with its group (destroy), or taken over.
            Ok(_) => Ok(()),
            Err(e) if has_code(&e, "InvalidGroup.NotFound") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip() {
        let h = Holder {
            who: "ann@build;box".into(),
            process: ProcessId {
                pid: 42,
                start_time: 7,
            },
            since: 1_764_762_000,
        };
        assert_eq!(Holder::parse(&h.value()), Some(h.clone()));
        assert_eq!(Holder::parse("garbage"), None);
        assert!(h.stale(h.since + STALE.as_secs()).is_some());
        // Another host's, recent: held.
        let other = Holder {
            who: "ann@elsewhere.invalid".into(),
            ..h.clone()
        };
        assert_eq!(other.stale(other.since + 60), None);
        // This host's, its process gone: taken over.
        let gone = Holder {
            who: format!("ann@{}", this_host()),
            ..h
        };
        assert!(gone.stale(gone.since + 60).is_some());
        // This very process: held.
        let me = Holder::me(100);
        assert_eq!(me.stale(160), None);
    }
}
