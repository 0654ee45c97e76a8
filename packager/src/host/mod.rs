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
