//! Where fuse keeps its state on the host: a cache (kernel builds, jlink runtimes, probes) and a
//! data directory (the image store). Both live outside any project so every project shares them.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The cache root: `$FUSE_CACHE_DIR`, else `$XDG_CACHE_HOME/fuse`, else `~/.cache/fuse`.
/// Everything in it can be deleted at any time; it is rebuilt on demand.
pub fn cache_dir() -> PathBuf {
    from_env("FUSE_CACHE_DIR", "XDG_CACHE_HOME", ".cache")
}

/// The data root holding the image store: `$FUSE_HOME`, else `$XDG_DATA_HOME/fuse`, else
/// `~/.local/share/fuse`.
pub(crate) fn data_dir() -> PathBuf {
    from_env("FUSE_HOME", "XDG_DATA_HOME", ".local/share")
}

/// Per-user state of running instances (`fuse run --detach`, `fuse ps`): `$FUSE_RUNTIME_DIR`,
/// else `$XDG_RUNTIME_DIR/fuse`, else `/tmp/fuse-<uid>`. Nothing in it outlives its VM.
///
/// Created 0700 when missing. One that exists must be a directory of ours, 0700, and not a
/// symlink: in a shared `/tmp` anyone can make `/tmp/fuse-<uid>` first, and whoever owns it
/// could read the logs, plant state or reach the QMP sockets that control our VMs.
pub(crate) fn runtime_dir() -> Result<PathBuf> {
    let dir = runtime_dir_path();
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("Cannot create {}: {SET_RUNTIME_DIR}", parent.display()))?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        // Made by an earlier fuse, another one right now, or someone else: checked below.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("Cannot create {}: {SET_RUNTIME_DIR}", dir.display()))
        }
    }
    // Never follows a symlink, and never changes what it finds: a chmod of someone else's
    // directory (or of what a symlink points at) is what an attacker would want.
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("Cannot read {}: {SET_RUNTIME_DIR}", dir.display()))?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    check_private_dir(&dir, &meta, me)?;
    Ok(dir)
}

/// How to get out of every runtime-directory error.
const SET_RUNTIME_DIR: &str = "set FUSE_RUNTIME_DIR to a directory of your own";

/// Refuses anything but a real directory owned by `me` with mode 0700.
fn check_private_dir(dir: &Path, meta: &std::fs::Metadata, me: u32) -> Result<()> {
    let path = dir.display();
    if meta.file_type().is_symlink() {
        bail!("{path} is a symbolic link: remove it or {SET_RUNTIME_DIR}");
    }
    if !meta.is_dir() {
        bail!("{path} is not a directory: remove it or {SET_RUNTIME_DIR}");
    }
    if meta.uid() != me {
        bail!(
            "{path} is owned by uid {}, not you (uid {me}): remove it or {SET_RUNTIME_DIR}",
            meta.uid()
        );
    }
    let mode = meta.mode() & 0o777;
    if mode != 0o700 {
        bail!("{path} has mode {mode:04o}, not 0700: run `chmod 700 {path}` or {SET_RUNTIME_DIR}");
    }
    Ok(())
}

fn runtime_dir_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("FUSE_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("fuse");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/fuse-{uid}"))
}

fn from_env(own: &str, xdg: &str, home_relative: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(own).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os(xdg).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("fuse");
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(home_relative).join("fuse")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn check(dir: &Path, me: u32) -> Result<()> {
        check_private_dir(dir, &std::fs::symlink_metadata(dir).unwrap(), me)
    }

    #[test]
    fn only_a_private_directory_of_ours_is_accepted() {
        let root = tempfile::tempdir().unwrap();
        let me = root.path().metadata().unwrap().uid();
        let dir = root.path().join("state");
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        check(&dir, me).unwrap();

        let err = check(&dir, me + 1).unwrap_err().to_string();
        assert!(
            err.contains(&format!("is owned by uid {me}, not you (uid {})", me + 1)),
            "{err}"
        );
        assert!(err.ends_with("remove it or set FUSE_RUNTIME_DIR to a directory of your own"));

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = check(&dir, me).unwrap_err().to_string();
        assert!(
            err.contains("has mode 0755, not 0700: run `chmod 700 "),
            "{err}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();

        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = check(&link, me).unwrap_err().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");

        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = check(&file, me).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }
}
