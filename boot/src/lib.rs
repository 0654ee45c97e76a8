//! What boots.
pub mod accel;
pub mod console;
pub mod init;
pub mod initramfs;
pub mod qemu;
pub mod signals;
pub mod spec;
