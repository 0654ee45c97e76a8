//! The fuse packaging library: the `fuse` binary is a thin shim over [`cli::main`].
//!
//! - [`builder`]: app -> image (kernel, init, root filesystem, manifest) in the [`store`]
//! - [`run`]: boot an image under QEMU through `fuse_boot::vm`
//! - [`kernel`]: the minimal kernel, built from `kernel-config/` and cached content-addressed

pub mod builder;
pub mod cli;
pub mod config;
pub mod digest;
pub mod disk_image;
pub mod dotenv;
pub mod environments;
pub mod fsutil;
pub mod health;
pub mod instance_cli;
pub mod instances;
pub mod kernel;
pub mod layout;
pub mod lock;
pub mod manifest;
pub mod naming;
pub mod paths;
pub mod payload;
pub mod ports;
pub mod run;
pub mod runtimes;
pub mod store;
pub mod sysroot;
pub mod testing;
pub mod volumes;
