//! fuse's state on the host, shared by building and running: the kernel cache, sysroots for
//! other architectures, where things live (and that it is ours alone), locks, process
//! identities, digests and file helpers.

pub(crate) mod digest;
pub(crate) mod fs;
pub(crate) mod kernel;
pub(crate) mod lock;
pub(crate) mod paths;
pub(crate) mod process;
pub(crate) mod serde_text;
pub(crate) mod sysroot;

/// Seconds since the epoch (0 on a clock before it).
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
