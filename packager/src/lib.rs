//! The fuse packaging library: the `fuse` binary is a thin shim over [`cli::main`].
//!
//! - [`builder`]: app -> image (kernel, init, root filesystem, manifest) in the [`store`]
//! - [`run`]: boot an image under QEMU through `fuse_boot::qemu`
//! - [`kernel`]: the minimal kernel, built from `kernel-config/` and cached content-addressed

pub mod builder;
pub mod cli;
pub mod digest;
pub mod fsutil;
pub mod kernel;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod naming;
pub mod paths;
pub mod payload;
pub mod run;
pub mod runtimes;
pub mod store;
