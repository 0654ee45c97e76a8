//! The kernel command line of an image, built in one place: the packager bakes it into the
//! UKI's `.cmdline` (and the manifest), the runner passes it on with only run-time extras added
//! (see `vm::machine`). It is part of the image's digest: changing a byte changes every image.

use fuse_rootfs::Arch;

/// The kernel's name for the serial console of the machine fuse gives `arch`: the 8250 UART
/// of `q35` (`ttyS0`), the PL011 of `virt` (`ttyAMA0`). The runner reads the app's output
/// from it.
pub fn console_device(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// The kernel command line of an image for `arch` whose root is `root` (`PARTUUID=<uuid>` of
/// the disk's root partition, or `/dev/vda` for a bare squashfs disk). The parameters, in order:
///
/// - `console=<dev>`: kernel messages, the init's and the app's output go to the serial
///   console, which the runner reads ([`console_device`]).
/// - `quiet`: no boot messages on the console, only the app's output (panics still print).
/// - `loglevel=1`: only emergency kernel messages on the console (`--verbose` appends
///   `loglevel=7` at run time).
/// - `panic=-1`: a panic reboots at once, and QEMU (`-no-reboot`) then exits instead of
///   hanging.
/// - `rdinit=/init`: the initramfs' fuse init is PID 1.
/// - `fuse.root=<root>`: where the init finds the root filesystem.
/// - `fuse.rootfstype=squashfs`: what the init mounts it as.
pub fn image_cmdline(arch: Arch, root: &str) -> String {
    let console = console_device(arch);
    format!(
        "console={console} quiet loglevel=1 panic=-1 rdinit=/init fuse.root={root} fuse.rootfstype=squashfs"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of every image depend on this line: it must not change by accident.
    #[test]
    fn test_image_cmdline_is_stable() {
        assert_eq!(
            image_cmdline(
                Arch::X86_64,
                "PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001"
            ),
            "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init \
             fuse.root=PARTUUID=0f3e1d2c-aaaa-8bbb-9ccc-000000000001 fuse.rootfstype=squashfs"
        );
        assert_eq!(
            image_cmdline(Arch::Aarch64, "/dev/vda"),
            "console=ttyAMA0 quiet loglevel=1 panic=-1 rdinit=/init fuse.root=/dev/vda \
             fuse.rootfstype=squashfs"
        );
    }
}
