//! The epoch an image's file times derive from (see `fuse_rootfs::times`): the same inputs give
//! the same epoch, so images stay bit-for-bit reproducible, and it moves forward with releases,
//! so the times servers turn into `Last-Modified` and `ETag` do too.
//!
//! In order: `SOURCE_DATE_EPOCH` (the reproducible-builds convention, which CI sets, e.g. to
//! the commit's time); else the commit time of the git repository the app is in (the same for
//! every clone of that commit); else a fixed epoch, 2000-01-01.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::{Command, Stdio};

/// The environment variable of the reproducible-builds specification.
pub(crate) const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";
pub(crate) use crate::image::manifest::{FIXED_EPOCH, NOTE_EPOCH};

/// An epoch and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Epoch {
    pub(crate) seconds: u32,
    pub(crate) source: &'static str,
}

impl Epoch {
    /// The manifest note: `1733150000 (SOURCE_DATE_EPOCH)`.
    pub(crate) fn note(&self) -> (String, String) {
        (
            NOTE_EPOCH.to_string(),
            format!("{} ({})", self.seconds, self.source),
        )
    }
}

/// The epoch of an image built from `input`, `source_date_epoch` being the variable's value.
pub(crate) fn resolve(input: &Path, source_date_epoch: Option<&str>) -> Result<Epoch> {
    if let Some(value) = source_date_epoch.filter(|v| !v.is_empty()) {
        return match value.parse::<u32>() {
            Ok(seconds) => Ok(Epoch {
                seconds,
                source: SOURCE_DATE_EPOCH,
            }),
            Err(_) => bail!(
                "SOURCE_DATE_EPOCH={value:?} is not a number of seconds since 1970 (up to 2106): \
                 set it to e.g. $(git log -1 --format=%ct), or unset it"
            ),
        };
    }
    if let Some(seconds) = git_commit_time(input) {
        return Ok(Epoch {
            seconds,
            source: "git commit",
        });
    }
    Ok(Epoch {
        seconds: FIXED_EPOCH,
        source: "fixed",
    })
}

/// The committer time of HEAD in the git repository holding `input`, if it is in one and git
/// is installed. Only `git log` runs (no hooks, no fsmonitor); git itself refuses repositories
/// owned by another user (safe.directory).
fn git_commit_time(input: &Path) -> Option<u32> {
    let dir = if input.is_dir() {
        input
    } else {
        input.parent().filter(|p| !p.as_os_str().is_empty())?
    };
    let out = Command::new("git")
        .args(["-c", "core.fsmonitor=false", "--no-pager", "-C"])
        .arg(dir)
        .args(["log", "-1", "--format=%ct"])
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_date_epoch_wins_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(dir.path(), Some("1700000000")).unwrap();
        assert_eq!((e.seconds, e.source), (1_700_000_000, SOURCE_DATE_EPOCH));
        for bad in ["yesterday", "-1", "1.5", "99999999999"] {
            let err = resolve(dir.path(), Some(bad)).unwrap_err().to_string();
            assert!(err.starts_with("SOURCE_DATE_EPOCH="), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        // Empty counts as unset, as in most build tools.
        assert_eq!(resolve(dir.path(), Some("")).unwrap().source, "fixed");
    }

    #[test]
    fn an_app_outside_git_gets_the_fixed_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::write(&app, b"x").unwrap();
        assert_eq!(resolve(&app, None).unwrap().seconds, FIXED_EPOCH);
    }

    #[test]
    fn an_app_in_a_git_repository_gets_its_commit_time() {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .env("GIT_COMMITTER_DATE", "1600000000 +0000")
                .env("GIT_AUTHOR_DATE", "1500000000 +0000")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        };
        // git is there wherever this repository was cloned.
        assert!(git(&["init", "-q"]), "git init failed");
        std::fs::write(dir.path().join("app.py"), b"print(1)\n").unwrap();
        assert!(git(&["add", "app.py"]));
        assert!(git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "one"
        ]));
        let e = resolve(&dir.path().join("app.py"), None).unwrap();
        // The committer's time, not the author's.
        assert_eq!((e.seconds, e.source), (1_600_000_000, "git commit"));
    }
}
