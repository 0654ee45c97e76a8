//! Where fuse keeps its state on the host: a cache (kernel builds, jlink runtimes, probes) and a
//! data directory (the image store). Both live outside any project so every project shares them.

use std::path::PathBuf;

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
pub(crate) fn runtime_dir() -> PathBuf {
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
